"""Rollouts on the served stack: a shadow candidate's evidence, a sticky canary, and canaries the platform
withdraws on its own (one over its latency limit, one whose runtime errors on every study); set through
the real CLI (platform API: role, signature, audit).

Named to run after test_serving.py, whose hot-swap test leaves a second compiled localization version
(the candidate here; one is trained when this module runs alone). Every test puts the policy back to
champion-only, which the next module's requests rely on.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from oncoserve.audit import AuditLog
from serving.traffic import study_fraction
from tests.conftest import oncoserve
from tests.helpers import wait_until

pytestmark = pytest.mark.integration
TASK = "localization"


@pytest.fixture(scope="module")
def candidate(served, tiny_dataset):
    """A compiled localization version other than the champion."""
    from pipelines.platform_client import PlatformClient

    registry = served["registry"]
    champion = registry.alias(TASK, "champion")
    compiled = [v.version for v in registry.versions(TASK) if v.tags.get("compiled_sha256") and v.version != champion]
    if compiled:
        return compiled[-1]
    run = oncoserve("train", TASK, "--data", str(tiny_dataset), "--epochs", "1")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    version = run.stdout.split(f"registered model {TASK} version")[-1].split()[0]
    PlatformClient(served["settings"]).compile(TASK, version, force=True, reason="rollout tests: a candidate")
    return version


@pytest.fixture(scope="module")
def failing_version(served, candidate, tmp_path_factory):
    """A version that registers, compiles and loads but errors on every study: its graph was exported with
    a fixed batch of two (a real export mistake), so the runtime refuses a study's batch of one. Its
    reference input is a batch of two, so compile's parity check passes as it would for such an export."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from mlflow import MlflowClient

    from oncoserve.credentials import use_mlflow_account
    from pipelines.platform_client import PlatformClient
    from serving.runtimes import REFERENCE_FILE, load_reference

    settings, registry = served["settings"], served["registry"]
    model_dir = tmp_path_factory.mktemp("failing") / "model"
    shutil.copytree(registry.download(TASK, candidate), model_dir)
    graph = onnx.load(str(model_dir / "model.onnx"))
    for value in [*graph.graph.input, *graph.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 2  # replaces the dynamic "batch" axis
    onnx.save(graph, str(model_dir / "model.onnx"))
    inputs, _ = load_reference(model_dir / REFERENCE_FILE)
    doubled = {name: np.concatenate([value, value]) for name, value in inputs.items()}
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, doubled)))
    np.savez_compressed(model_dir / REFERENCE_FILE, **{f"input.{k}": v for k, v in doubled.items()},
                        **{f"output.{k}": v for k, v in outputs.items()})  # fmt: skip
    use_mlflow_account(settings.mlflow_accounts_file, "training")
    client = MlflowClient(settings.mlflow_url)
    source = registry.version(TASK, candidate)
    run = client.create_run(client.get_run(source.run_id).info.experiment_id, tags={"purpose": "rollout test: a failing version"})
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    client.set_terminated(run.info.run_id, "FINISHED")
    tags = {k: v for k, v in source.tags.items() if not k.startswith("compiled_")}
    version = str(client.create_model_version(TASK, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags).version)
    PlatformClient(settings).compile(TASK, version, force=True, reason="rollout tests: a version that fails at runtime")
    return version


@pytest.fixture()
def policy_off(served):
    yield
    off = oncoserve("rollout", "set", TASK, "--off", "--reason", "rollout tests: back to champion only")
    assert off.returncode == 0, off.stdout + off.stderr
    assert wait_until(lambda: following(served)["mode"] == "champion", timeout_s=60, interval_s=0.2)


def following(served) -> dict:
    return httpx.get(f"{served['url']}/v1/models", timeout=30).json()["rollouts"][TASK]


def set_policy(served, *args: str) -> int:
    """`oncoserve rollout set` and wait until the replica follows the new policy; its seq."""
    done = oncoserve("rollout", "set", TASK, *args, "--reason", "rollout tests")
    assert done.returncode == 0, done.stdout + done.stderr
    seq = int(done.stdout.split("traffic policy seq")[1].split(":")[0])
    assert wait_until(lambda: following(served)["seq"] == seq and following(served)["candidate_loaded"], timeout_s=60, interval_s=0.2)
    return seq


def predict_many(served, case_dir, case_ids: list[str]) -> dict[str, dict]:
    files = {p.name.split("_")[-1].split(".")[0]: (p.name, p.read_bytes(), "application/gzip")
             for p in sorted(case_dir.glob("*.nii.gz")) if not p.name.endswith("_seg.nii.gz")}  # fmt: skip

    def one(case_id: str) -> tuple[str, dict]:
        r = httpx.post(f"{served['url']}/v1/{TASK}:predict", headers=served["auth"], files=files,
                       data={"case_id": case_id}, timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text[:300]
        return case_id, r.json()

    with ThreadPoolExecutor(max_workers=3) as pool:  # bounded: three in flight
        return dict(pool.map(one, case_ids))


def report(seq: int) -> dict:
    done = oncoserve("rollout", "report", TASK, "--seq", str(seq), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_a_shadow_candidate_answers_every_study_but_only_its_evidence_is_kept(served, candidate, tiny_dataset, policy_off):
    champion = served["registry"].alias(TASK, "champion")
    same = oncoserve("rollout", "set", TASK, "--shadow", champion)
    assert same.returncode == 1 and "champion already" in same.stdout + same.stderr
    seq = set_policy(served, "--shadow", candidate)
    case_dir = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[1]
    answers = predict_many(served, case_dir, [f"shadow-{i}" for i in range(10)])
    assert {a["model_version"] for a in answers.values()} == {champion}  # only the champion's answers come back
    assert not any("rollout" in a for a in answers.values())
    assert wait_until(lambda: report(seq)["overall"]["studies"] >= 10, timeout_s=120, interval_s=0.5)
    body = report(seq)
    overall = body["overall"]
    assert overall["studies"] == 10 and overall["errors"] == 0, overall  # exactly the studies sent
    assert overall["agreement"]["agreement"]["n"] == 10 and 0.0 <= overall["agreement"]["agreement"]["mean"] <= 1.0
    low, high = overall["agreement"]["found_agree"]["ci95"]
    assert low <= overall["agreement"]["found_agree"]["mean"] <= high
    assert body["policy"]["mode"] == "shadow" and body["policy"]["version"] == candidate and body["in_force"]
    metrics = httpx.get(f"{served['url']}/metrics", timeout=30).text
    assert f'oncoserve_rollout_studies_total{{candidate="{candidate}",mode="shadow",outcome="shadowed",task="{TASK}"}}' in metrics
    assert "oncoserve_shadow_agreement_bucket" in metrics
    printed = oncoserve("rollout", "report", TASK)
    assert printed.returncode == 0 and "10 studies, 0 candidate errors" in printed.stdout, printed.stdout
    audit = [e for e in AuditLog(served["settings"].audit_file).entries() if e.get("action") == "rollout_set" and e.get("version") == candidate]
    assert audit and audit[-1]["status"] == "completed" and audit[-1]["mode"] == "shadow"


def test_a_canary_answers_its_weight_of_studies_the_same_study_always_on_the_same_version(served, candidate, tiny_dataset, policy_off):
    champion = served["registry"].alias(TASK, "champion")
    seq = set_policy(served, "--canary", candidate, "--weight", "0.3")
    case_dir = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[2]
    ids = [f"canary-{i}" for i in range(100)]
    answers = predict_many(served, case_dir, ids)
    on_candidate = {i for i, a in answers.items() if a["model_version"] == candidate}
    assert {a["model_version"] for a in answers.values()} <= {champion, candidate}
    assert 20 <= len(on_candidate) <= 40, len(on_candidate)
    assert on_candidate == {i for i in ids if study_fraction(i) < 0.3}  # the study's place decides, nothing else
    again = predict_many(served, case_dir, ids[:15])
    assert all(again[i]["model_version"] == answers[i]["model_version"] for i in ids[:15])
    assert all(answers[i]["rollout"] == {"mode": "canary", "policy_seq": seq} for i in on_candidate)
    expected = len(on_candidate) + len(on_candidate & set(ids[:15]))
    assert wait_until(lambda: report(seq)["overall"]["studies"] >= expected, timeout_s=60, interval_s=0.5)
    assert report(seq)["overall"]["studies"] == expected and report(seq)["overall"]["errors"] == 0


def test_a_canary_over_its_limits_is_withdrawn_by_the_platform_and_audited(served, candidate, tiny_dataset, policy_off):
    # Every study takes more than a millisecond: a p95 limit of 1 ms is a canary that must be withdrawn.
    seq = set_policy(served, "--canary", candidate, "--weight", "1.0", "--max-p95-ms", "1", "--min-studies", "3")
    case_dir = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[3]
    answers = predict_many(served, case_dir, [f"limit-{i}" for i in range(3)])
    assert {a["model_version"] for a in answers.values()} == {candidate}
    assert wait_until(lambda: following(served)["mode"] == "champion" and following(served)["seq"] > seq, timeout_s=90, interval_s=0.5)
    champion = served["registry"].alias(TASK, "champion")
    after = predict_many(served, case_dir, [f"limit-{i}" for i in range(3)])
    assert {a["model_version"] for a in after.values()} == {champion}
    withdrawn = [e for e in AuditLog(served["settings"].audit_file).entries() if e.get("action") == "rollout_withdraw"]
    assert withdrawn and withdrawn[-1]["actor"] == "platform (automatic)" and withdrawn[-1]["status"] == "completed"
    assert f"canary v{candidate} withdrawn: candidate p95 latency" in withdrawn[-1]["reason"]
    shown = json.loads(oncoserve("rollout", "show", TASK, "--json").stdout)
    assert shown["policy"]["mode"] == "champion" and shown["history"][-1]["actor"] == "platform (automatic)"


def test_a_canary_whose_runtime_errors_is_withdrawn_with_no_failed_study(served, failing_version, tiny_dataset, policy_off):
    champion = served["registry"].alias(TASK, "champion")
    seq = set_policy(served, "--canary", failing_version, "--weight", "1.0", "--max-error-rate", "0.2", "--min-studies", "4")
    case_dir = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[4]
    answers = predict_many(served, case_dir, [f"broken-{i}" for i in range(6)])  # each must be a 200
    # The candidate failed every study; the champion answered each one instead (an error budget of 0 5xx).
    assert {a["model_version"] for a in answers.values()} == {champion}
    assert wait_until(lambda: following(served)["mode"] == "champion" and following(served)["seq"] > seq, timeout_s=90, interval_s=0.5)
    evidence = report(seq)["overall"]
    assert evidence["studies"] >= 4 and evidence["errors"] == evidence["studies"], evidence
    withdrawn = [e for e in AuditLog(served["settings"].audit_file).entries() if e.get("action") == "rollout_withdraw"]
    assert withdrawn[-1]["actor"] == "platform (automatic)" and withdrawn[-1]["status"] == "completed"
    assert f"canary v{failing_version} withdrawn: candidate error rate 1.00" in withdrawn[-1]["reason"]
    metrics = httpx.get(f"{served['url']}/metrics", timeout=30).text
    assert f'oncoserve_rollout_studies_total{{candidate="{failing_version}",mode="canary",outcome="canary_failed",task="{TASK}"}}' in metrics


def test_a_champion_that_fails_its_studies_is_rolled_back_to_previous_by_the_platform(served, failing_version, tiny_dataset):
    """The platform's guard (pipelines.champion_guard, defaults: more than 20 % of at least 5 studies within
    an hour of the promotion) takes the champion back to `previous`, signed and audited."""
    from pipelines.platform_client import PlatformClient

    registry = served["registry"]
    before = registry.alias(TASK, "champion")
    PlatformClient(served["settings"]).promote(TASK, failing_version, "champion", reason="rollout tests: a champion that fails", force=True)
    versions = lambda: httpx.get(f"{served['url']}/v1/models", timeout=10).json()["model_versions"][TASK]  # noqa: E731
    assert wait_until(lambda: versions() == failing_version, timeout_s=60, interval_s=0.2)
    case_dir = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[5]
    files = {p.name.split("_")[-1].split(".")[0]: (p.name, p.read_bytes(), "application/gzip")
             for p in sorted(case_dir.glob("*.nii.gz")) if not p.name.endswith("_seg.nii.gz")}  # fmt: skip
    codes = [httpx.post(f"{served['url']}/v1/{TASK}:predict", headers=served["auth"], files=files, data={"case_id": f"fails-{i}"},
                        timeout=120).status_code for i in range(5)]  # fmt: skip
    assert all(code >= 500 for code in codes), codes  # the new champion fails every study: a clear error, no answer
    assert wait_until(lambda: registry.alias(TASK, "champion") == before, timeout_s=90, interval_s=0.5)
    # The audit's outcome record follows the alias move (intent, move, outcome): wait for it, not only the move.
    rollbacks = lambda: [e for e in AuditLog(served["settings"].audit_file).entries() if e.get("action") == "rollback"]  # noqa: E731
    assert wait_until(lambda: bool(rollbacks()) and rollbacks()[-1]["status"] != "incomplete", timeout_s=30, interval_s=0.2)
    rollback = rollbacks()[-1]
    assert rollback["actor"] == "platform (automatic)" and rollback["status"] == "completed" and rollback["version"] == before
    assert rollback["reason"].startswith(f"champion v{failing_version} failed 5 of 5 studies since its promotion"), rollback["reason"]
    assert wait_until(lambda: versions() == before, timeout_s=60, interval_s=0.2)
    after = predict_many(served, case_dir, [f"recovered-{i}" for i in range(3)])
    assert {a["model_version"] for a in after.values()} == {before}
