"""Findings -> the report: retrieve, compose, optionally generate with an LLM, guard, fall back.

The result is the `report` key of the findings: structured sections with citations, the Markdown text,
which generator wrote it and what the guard decided, the prompt and knowledge-base versions, and a
FHIR R4 DiagnosticReport.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from services.reporting import fhir, guard, template
from services.reporting.facts import Facts, from_findings
from services.reporting.generators import PROMPT_DIR, PROMPT_VERSION, Generator, GeneratorError, load_prompt
from services.reporting.kb import KnowledgeBase


@dataclass
class Report:
    data: dict  # the findings' `report`
    markdown: str
    fhir: dict


def _facts_text(f: Facts, sections: list[template.Section]) -> str:
    return "\n".join(f"- {s.title}: {s.text}" for s in sections)


class Reporter:
    def __init__(self, kb: KnowledgeBase, retriever=None, generator: Generator | None = None,
                 prompt_version: str = PROMPT_VERSION, prompt_dir: Path = PROMPT_DIR):  # fmt: skip
        self.kb, self.retriever, self.generator = kb, retriever, generator
        self.prompt_version = prompt_version
        self.prompt = load_prompt(prompt_version, prompt_dir)

    def _citations(self, facts: Facts, sections: list[template.Section]) -> dict[str, str]:
        """The template's fixed citations plus the passages retrieval finds for this diagnosis."""
        ids = [c for s in sections for c in s.citations]
        if self.retriever is not None:
            query = f"{facts.diagnosis.integrated}; prognosis and median survival; {facts.markers['mgmt'].label} MGMT"
            for passage, _score in self.retriever.search(query, k=3):
                if passage.id not in ids:
                    ids.append(passage.id)
                    if passage.doc == "prognosis":
                        sections[2].citations.append(passage.id)
        return {pid: self.kb.by_id(pid).text for pid in dict.fromkeys(ids)}

    def report(self, findings: dict) -> Report:
        facts = from_findings(findings)
        sections = template.compose(facts)
        passages = self._citations(facts, sections)
        references = {pid: f"{self.kb.by_id(pid).title}. {self.kb.by_id(pid).sources}" for pid in passages}
        draft = template.to_markdown(facts.case_id, sections, references)
        exempt = template.reference_lines(references)
        generator_name, guard_result, text = "template", guard.check(draft, facts, list(passages.values()), exempt), draft
        if self.generator is not None:
            prompt = self.prompt.format(disclaimer=template.DISCLAIMER, facts=_facts_text(facts, sections),
                                        passages="\n".join(f"[{k}] {v}" for k, v in passages.items()), draft=draft)  # fmt: skip
            try:
                generated = self.generator.generate(prompt)
                verdict = guard.check(generated, facts, list(passages.values()), exempt)
            except GeneratorError as exc:
                generated, verdict = None, guard.GuardResult(False, [f"generator failed: {exc}"], False)
            if verdict.passed:
                generator_name, guard_result, text = self.generator.name, verdict, generated
            else:
                generator_name, guard_result = f"template (fallback from {self.generator.name})", verdict
        conclusion = facts.diagnosis.integrated + (" Study flagged as out of distribution." if facts.ood_flag else "")
        if facts.implausible:
            conclusion += " Implausible findings: " + ", ".join(facts.implausible) + "."
        data = {
            "generator": generator_name,
            "guard": {**guard_result.to_json(), "checked": self.generator.name if self.generator else "template"},
            "prompt_version": self.prompt_version,
            "knowledge_base_version": self.kb.version,
            "sections": [{"title": s.title, "text": s.text, "citations": s.citations} for s in sections],
            "integrated_diagnosis": facts.diagnosis.integrated,
            "citations": [{"id": pid, "text": t} for pid, t in passages.items()],
            "references": exempt,
            "disclaimer": template.DISCLAIMER,
        }
        return Report(data, text, fhir.build(facts, text, conclusion))


def sections_of(markdown: str) -> list[str]:
    return re.findall(r"^##\s+(.+?)\s*$", markdown, re.MULTILINE)
