"""Reporting: template sections and grounding, the guard against planted hallucinations, FHIR, and
the generator paths (a local chat-completions server of our own; the offline GGUF model)."""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.reporting import guard, kb, reference, template
from services.reporting.compose import Reporter, sections_of
from services.reporting.facts import diagnose, from_findings
from services.reporting.generators import GeneratorError, LlamaCpp, OpenAICompatible

FINDINGS = reference.BASE


@pytest.fixture(scope="module")
def knowledge():
    return kb.load()


@pytest.fixture(scope="module")
def reporter(knowledge):
    return Reporter(knowledge)


def numbers_in(text: str) -> set[float]:
    body = text.split("## References")[0]
    body = re.sub(r"\[[a-z0-9-]+#\d+\]", "", body)  # citation ids
    body = body.replace("1p/19q", "").replace("ref-gbm", "")
    return {float(n) for n in re.findall(r"\d+(?:\.\d+)?", body)}


def test_template_report_has_every_section_and_only_numbers_from_the_findings(reporter):
    report = reporter.report(FINDINGS)
    assert sections_of(report.markdown)[:5] == list(template.SECTIONS)
    assert template.DISCLAIMER in report.markdown
    facts = from_findings(FINDINGS)
    allowed = facts.numbers() | {float(n) for n in facts.grade_numbers}
    assert numbers_in(report.markdown) <= allowed, numbers_in(report.markdown) - allowed
    assert report.data["generator"] == "template" and report.data["guard"]["passed"] is True
    assert report.data["integrated_diagnosis"] == "Glioblastoma, IDH-wildtype"
    assert "left hemisphere" in report.markdown and "FLAIR" in report.markdown
    assert report.data["prompt_version"] == "report-v1" and report.data["knowledge_base_version"].startswith("kb-")
    assert all(c["id"] in {p.id for p in reporter.kb.passages} for c in report.data["citations"])


@pytest.mark.parametrize(
    "edit, problem",
    [
        *reference.PLANTED,
        (lambda t: t.replace("## Prognosis", "## Outlook"), "required sections missing: Prognosis"),
        (lambda t: t.replace(template.DISCLAIMER, ""), "closing statement"),
    ],
)
def test_guard_rejects_planted_hallucinations(reporter, edit, problem):
    report = reporter.report(FINDINGS)
    verdict = guard.check(edit(report.markdown), from_findings(FINDINGS), [c["text"] for c in report.data["citations"]],
                          report.data["references"])  # fmt: skip
    assert not verdict.passed and any(problem in p for p in verdict.problems), verdict.problems


def test_guard_accepts_published_figures_from_cited_passages(reporter, knowledge):
    report = reporter.report(FINDINGS)
    passage = knowledge.by_id("prognosis#1").text
    text = report.markdown.replace("## Suggested next steps", "In the pivotal trial median survival was 14.6 months.\n\n## Suggested next steps")
    assert guard.check(text, from_findings(FINDINGS), [passage], report.data["references"]).passed
    assert not guard.check(text, from_findings(FINDINGS), [], report.data["references"]).passed


def test_layered_diagnosis_follows_who_cns5():
    def markers(idh, codel, grade="LGG", p=0.9):
        f = copy.deepcopy(FINDINGS)
        c = f["classification"]
        for name, label, other in (("idh", idh, {"mutant": "wildtype", "wildtype": "mutant"}[idh]),
                                   ("codeletion_1p19q", codel, {"codeleted": "intact", "intact": "codeleted"}[codel]),
                                   ("grade", grade, {"LGG": "HGG", "HGG": "LGG"}[grade])):  # fmt: skip
            c[name] = {"label": label, "probabilities": {label: p, other: round(1 - p, 2)}, "uncertainty": 0.02}
        return from_findings(f).markers

    assert diagnose(markers("mutant", "codeleted")).integrated == "Oligodendroglioma, IDH-mutant and 1p/19q-codeleted"
    assert diagnose(markers("mutant", "intact", "HGG")).grade == "CNS WHO grade 3"
    assert diagnose(markers("mutant", "intact")).integrated == "Astrocytoma, IDH-mutant"
    assert diagnose(markers("wildtype", "intact", "HGG")).integrated == "Glioblastoma, IDH-wildtype"
    assert diagnose(markers("wildtype", "intact", "HGG", p=0.55)).integrated.startswith("Indeterminate; most likely")


def test_fhir_diagnostic_report_validates(reporter):
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    resource = reporter.report(FINDINGS).fhir
    parsed = DiagnosticReport.model_validate(resource)
    assert parsed.status == "preliminary" and len(parsed.result) == len(parsed.contained) == 10
    volumes = {o["id"]: o["valueQuantity"]["value"] for o in resource["contained"] if "valueQuantity" in o}
    assert volumes["vol-et"] == 8.9 and json.dumps(resource)


class ChatServer(BaseHTTPRequestHandler):
    """A small server of our own speaking the OpenAI chat-completions protocol."""

    reply = ""
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        ChatServer.seen.append(body)
        if self.path != "/v1/chat/completions":
            self.send_response(404)
            self.end_headers()
            return
        payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": ChatServer.reply},
                                           "finish_reason": "stop"}]}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def chat_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_openai_compatible_generator_is_guarded(knowledge, chat_server):
    template_text = Reporter(knowledge).report(FINDINGS).markdown
    reporter = Reporter(knowledge, generator=OpenAICompatible(chat_server, "test-model"))
    ChatServer.reply = template_text.replace("necrotic core", "necrotic tumour core")  # a faithful rewrite
    good = reporter.report(FINDINGS)
    assert good.data["generator"] == "openai" and "necrotic tumour core" in good.markdown
    assert ChatServer.seen[-1]["model"] == "test-model" and "Facts (from the models)" in ChatServer.seen[-1]["messages"][0]["content"]
    ChatServer.reply = template_text.replace("edema 31.7 mL", "edema 61.7 mL")  # a hallucinated volume
    bad = reporter.report(FINDINGS)
    assert bad.data["generator"] == "template (fallback from openai)" and not bad.data["guard"]["passed"]
    assert "edema 31.7 mL" in bad.markdown and any("61.7 mL" in p for p in bad.data["guard"]["problems"])


def test_unreachable_chat_endpoint_falls_back_with_the_reason(knowledge):
    reporter = Reporter(knowledge, generator=OpenAICompatible("http://127.0.0.1:9", "m", timeout_s=2))
    report = reporter.report(FINDINGS)
    assert report.data["generator"] == "template (fallback from openai)"
    assert "generator failed" in report.data["guard"]["problems"][0]


def test_local_gguf_model_runs_end_to_end_and_is_guarded(knowledge):
    generator = LlamaCpp(max_tokens=96)
    text = generator.generate("Findings: a glioma. Report:")
    assert isinstance(text, str) and text.strip()
    report = Reporter(knowledge, generator=generator).report(FINDINGS)
    # A 270M base model rarely writes a compliant, grounded report: whatever it wrote went through the
    # guard, and the answer is either its text (passed) or the template with the reasons.
    assert report.data["guard"]["checked"] == "llamacpp"
    if report.data["guard"]["passed"]:
        assert report.data["generator"] == "llamacpp"
    else:
        assert report.data["generator"] == "template (fallback from llamacpp)" and report.data["guard"]["problems"]
        assert sections_of(report.markdown)[:5] == list(template.SECTIONS)


def test_bad_generator_config_is_refused():
    from services.reporting.generators import build

    assert build(None) is None and build({"kind": "template"}) is None
    with pytest.raises(GeneratorError, match="needs url and model"):
        build({"kind": "openai"})
    with pytest.raises(GeneratorError, match="unknown generator kind"):
        build({"kind": "gpt"})


def test_retrieval_finds_the_relevant_passages(knowledge):
    from services.reporting.retrieval import Retriever

    retriever = Retriever(knowledge)
    top = [p.doc for p, _ in retriever.search("IDH-mutant tumour with 1p/19q codeletion: which diagnosis?", k=2)]
    assert "who-cns5" in top or "markers" in top
    assert retriever.search("median overall survival with temozolomide", k=1)[0][0].doc == "prognosis"
    report = Reporter(knowledge, retriever=retriever).report(FINDINGS)
    assert any(c["id"].startswith("prognosis#") for c in report.data["citations"]) and report.data["guard"]["passed"]


def test_reporting_deployment_counts_guard_outcomes_and_fallbacks(knowledge, chat_server):
    """The Serve deployment's `report` (run here without Ray) counts every guard verdict."""
    import asyncio

    from services import metrics
    from services.reporting_service import LoadedReporter, ReportingService

    def count(generator: str, outcome: str) -> float:
        return metrics.REPORT_GUARD.labels(generator, outcome)._value.get()

    service = object.__new__(ReportingService)  # the deployment's body, without a registry behind it
    service.current = LoadedReporter("7", Reporter(knowledge, generator=OpenAICompatible(chat_server, "m")))
    ChatServer.reply = "The tumour is in the right temporal lobe and measures 80 mL."
    before = count("openai", "rejected")
    result = asyncio.run(service.report(FINDINGS))
    assert result["version"] == "7" and result["report"]["generator"] == "template (fallback from openai)"
    assert count("openai", "rejected") == before + 1
    assert metrics.REPORT_FORMAT.labels("openai", "noncompliant")._value.get() >= 1


def test_implausible_findings_are_stated_as_such_not_as_fact(reporter):
    from services import plausibility

    findings = copy.deepcopy(FINDINGS)
    findings["segmentation"]["volumes_ml"] = {"NCR": 900.0, "ED": 3000.0, "ET": 212.0, "WT": 4112.0, "TC": 1112.0}
    for marker in findings["classification"].values():
        marker["probabilities"] = {k: 0.5 for k in marker["probabilities"]}
    checks = plausibility.segmentation_checks(findings["segmentation"]["volumes_ml"], 1400.0, {"WT": [7.0, 320.0]})
    checks += plausibility.classification_checks([0.52, 0.49, 0.5, 0.47])
    assert [c["check"] for c in checks] == ["tumour_volume_vs_brain", "volume_WT_vs_training", "uninformative_probabilities"]
    findings["quality"]["implausible"] = checks
    report = reporter.report(findings)
    assert "4112" not in report.markdown and "not reported as measurements" in report.markdown
    assert "uninformative" in report.markdown and report.data["guard"]["passed"] is True
    assert "Implausible findings: tumour_volume_vs_brain" in json.dumps(report.fhir)  # the FHIR conclusion says it too
    plain = reporter.report(FINDINGS)  # the reference findings are plausible: the volumes are stated
    assert "Segmented volumes: necrotic core" in plain.markdown and "implausible" not in plain.markdown


def test_plausibility_checks_pass_ordinary_findings_and_name_what_fails():
    from services import plausibility

    ordinary = {"NCR": 5.0, "ED": 40.0, "ET": 8.0, "WT": 53.0, "TC": 13.0}
    assert plausibility.segmentation_checks(ordinary, 1400.0, {"WT": [7.0, 320.0], "TC": [1.0, 90.0], "ET": [0.0, 40.0]}) == []
    assert plausibility.segmentation_checks(ordinary, 1400.0, None) == []  # an older version: no training range recorded
    assert plausibility.classification_checks([0.9, 0.2, 0.5, 0.5]) == []
    empty = plausibility.segmentation_checks({**ordinary, "WT": 0.0, "TC": 0.0, "ET": 0.0}, 1400.0, {"WT": [7.0, 320.0]})
    assert [c["check"] for c in empty] == ["volume_WT_vs_training"] and "7.0-320.0 mL" in empty[0]["detail"]
    half = plausibility.segmentation_checks({**ordinary, "WT": 701.0}, 1400.0, None)
    assert half[0]["check"] == "tumour_volume_vs_brain" and half[0]["value"] == pytest.approx(0.501, abs=1e-3)
