"""`oncoserve pipeline run` end to end on a private embedded stack (tiny data, few epochs).

In order: a first run registers, compares, compiles and promotes one version per task; an identical
re-run registers nothing; a deliberately worse config is stopped at the gate and leaves the champion
alone; a run killed mid-way and re-run completes without duplicate versions. Then `models compare`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oncoserve.audit import AuditLog
from oncoserve.object_store import object_store
from serving.registry import Registry
from tests.conftest import TASKS, private_stack
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

# Floors anyone passes; what the worse config must fail is the no-regression gate against the champion.
GATES = """
version = 1
[defaults]
parity_max_abs_diff = 1e-3
latency_budget_ms = 10000
latency_runs = 1
[segmentation]
floors = { dice_WT = 0.0 }
regression_tolerance = { dice_WT = 0.02 }
[localization]
floors = { box_iou = 0.0 }
[classification]
floors = {}
[survival]
floors = {}
"""


def write_config(folder: Path, name: str, **overrides) -> Path:
    doc = {
        "version": 1, "name": name, "data": "../data", "tasks": TASKS,
        # Four segmentation epochs tell a trained model from an untrained one: measured, the champion's
        # dice_WT on the comparison data was 0.123 and the worse config's 0.025, so the no-regression gate
        # (tolerance 0.02) refuses it with a margin of 0.08 (ten epochs cost 3.5 more minutes).
        "training": {"seed": 1, "epochs": {"localization": 1, "segmentation": 4, "classification": 1, "survival": 1}},
        "evaluation_sets": [{"name": "site-b", "path": "../site-b"}],
        "gates": "gates.toml", "compare": {"bootstrap": 200},
    } | overrides  # fmt: skip
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def pipeline_env(tmp_path_factory):
    """A private stack (its own registry, so the aliases moved here touch no other test) + data + configs."""
    from imaging.phantoms import synthesise

    root = tmp_path_factory.mktemp("pipeline")
    synthesise(root / "data", n=8, seed=2, sites=2)
    synthesise(root / "site-b", n=3, seed=11, sites=1)
    (root / "configs").mkdir()
    (root / "configs" / "gates.toml").write_text(GATES)
    with private_stack("osp-", "pipeline-admin", gates=GATES) as settings:  # the platform's gates
        yield {"root": root, "configs": root / "configs", "settings": settings, "registry": Registry(settings.mlflow_url)}


def pipeline(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "oncoserve")
    return subprocess.run([exe, "pipeline", "run", *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def keyed_versions(registry: Registry, task: str, key: str) -> list[str]:
    return [v.version for v in registry.versions(task) if v.tags.get("pipeline_key") == key]


def test_a_definition_naming_other_gates_is_refused_before_training(pipeline_env):
    (pipeline_env["configs"] / "lenient.toml").write_text(GATES.replace("regression_tolerance = { dice_WT = 0.02 }", ""))
    cfg = write_config(pipeline_env["configs"], "own-gates", gates="lenient.toml")
    run = pipeline("--config", str(cfg), "--promote", "champion", timeout=120)
    assert run.returncode == 1 and "the platform's gates decide" in " ".join(run.stderr.split()), run.stdout + run.stderr
    assert all(not pipeline_env["registry"].versions(t) for t in TASKS)  # nothing trained or registered


def test_first_run_registers_compares_compiles_and_promotes(pipeline_env):
    cfg, out = write_config(pipeline_env["configs"], "first"), pipeline_env["root"] / "first.json"
    run = pipeline("--config", str(cfg), "--promote", "champion", "--summary", str(out))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["status"] == "completed" and set(summary["tasks"]) == set(TASKS)
    registry, settings = pipeline_env["registry"], pipeline_env["settings"]
    store = object_store(settings)
    for task, t in summary["tasks"].items():
        assert t["new_version"] and keyed_versions(registry, task, t["pipeline_key"]) == [t["version"]]
        assert {s["status"] for s in t["steps"].values()} == {"done"}, t["steps"]
        info = registry.version(task, t["version"])
        assert info.aliases == ["champion"] and registry.aliases(task) == {"champion": t["version"]}
        # Scored on the evaluation set, compiled into the Triton repository, comparison attached to the run.
        assert "n_cases" in json.loads(info.tags["eval.site-b"])
        digests = json.loads(info.tags["compiled_sha256"])
        assert f"{task}/{t['version']}/model.onnx" in digests
        store.stat_object(settings.bucket_models, f"{settings.triton_repo_prefix}/{task}/{t['version']}/model.onnx")
        report = Path(t["comparison"])
        assert report.exists() and "no champion to compare with" in report.read_text() and "site-b/" in report.read_text()
        attached = [a.path for a in registry.client.list_artifacts(info.run_id, f"compare/v{t['version']}")]
        assert any(p.endswith("report.md") for p in attached) and any(p.endswith(".png") for p in attached)
    assert "summary JSON" in run.stdout and "Traceback" not in run.stderr


def test_identical_rerun_registers_nothing(pipeline_env):
    registry = pipeline_env["registry"]
    before = {t: [v.version for v in registry.versions(t)] for t in TASKS}
    out = pipeline_env["root"] / "again.json"
    run = pipeline("--config", str(pipeline_env["configs"] / "first.yaml"), "--promote", "champion", "--summary", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert {t: [v.version for v in registry.versions(t)] for t in TASKS} == before
    summary = json.loads(out.read_text())
    for t in summary["tasks"].values():
        assert not t["new_version"] and t["steps"]["train"]["status"] == "exists"
        assert "already exists for this data, config and code" in t["steps"]["train"]["detail"]
        assert t["steps"]["compile"]["status"] == "exists" and t["steps"]["promote"]["status"] == "exists"
    assert "already exists" in run.stdout


def test_worse_config_is_stopped_at_the_gate(pipeline_env):
    registry = pipeline_env["registry"]
    champion = registry.alias("segmentation", "champion")
    # Same data, but a learning rate that leaves the network untrained (one epoch: at lr 1e-9 ten would
    # leave it just as untrained, at ten times the cost).
    cfg = write_config(pipeline_env["configs"], "worse", tasks=["segmentation"],
                       training={"seed": 1, "epochs": {"segmentation": 1}, "lr": {"segmentation": 1e-9}})  # fmt: skip
    out = pipeline_env["root"] / "worse.json"
    run = pipeline("--config", str(cfg), "--promote", "champion", "--summary", str(out))
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-2000:]
    t = json.loads(out.read_text())["tasks"]["segmentation"]
    failing = [g["name"] for g in t["gates"] if not g["passed"]]
    assert failing == ["no_regression:dice_WT"], t["gates"]
    assert t["steps"]["promote"]["status"] == "refused" and t["steps"]["compile"]["status"] == "skipped"
    assert registry.alias("segmentation", "champion") == champion != t["version"]
    assert "refused" in run.stderr and "no_regression:dice_WT" in run.stderr
    report = Path(t["comparison"]).read_text()
    assert f"v{champion} (A) vs v{t['version']} (B)" in report and "| dice_WT |" in report
    refusals = [e for e in AuditLog(pipeline_env["settings"].audit_file).entries()
                if e.get("action") == "promote" and e.get("version") == t["version"]]  # fmt: skip
    assert [e["status"] for e in refusals] == ["refused"]


def test_killed_run_resumes_without_duplicates(pipeline_env):
    registry = pipeline_env["registry"]
    cfg = write_config(pipeline_env["configs"], "resume", tasks=["localization", "survival"],
                       training={"seed": 5, "epochs": {"localization": 1, "survival": 1}})  # fmt: skip
    exe = str(Path(sys.executable).parent / "oncoserve")
    out = pipeline_env["root"] / "resume.json"
    first = subprocess.Popen([exe, "pipeline", "run", "--config", str(cfg), "--summary", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    before = {t: len(registry.versions(t)) for t in ("localization", "survival")}
    try:
        # Kill it once localization is registered (survival is then training or about to).
        assert wait_until(lambda: len(registry.versions("localization")) > before["localization"], timeout_s=300, interval_s=0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert not out.exists()
    run = pipeline("--config", str(cfg), "--summary", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    summary = json.loads(out.read_text())
    loc, surv = summary["tasks"]["localization"], summary["tasks"]["survival"]
    assert loc["steps"]["train"]["status"] == "exists" and not loc["new_version"]
    for task, t in (("localization", loc), ("survival", surv)):
        assert keyed_versions(registry, task, t["pipeline_key"]) == [t["version"]]
        assert len(registry.versions(task)) == before[task] + 1
    # A run the kill interrupted is marked KILLED, not left RUNNING.
    runs = registry.client.search_runs([registry.client.get_experiment_by_name("oncoserve-survival").experiment_id],
                                       f"tags.pipeline_key = '{surv['pipeline_key']}'")  # fmt: skip
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"} and sum(r.info.status == "FINISHED" for r in runs) == 1


def test_models_compare_report(pipeline_env):
    registry = pipeline_env["registry"]
    versions = [v.version for v in registry.versions("segmentation")]
    exe = str(Path(sys.executable).parent / "oncoserve")
    out = pipeline_env["root"] / "cmp"
    run = subprocess.run([exe, "models", "compare", "segmentation", versions[0], versions[-1], "--data",
                          str(pipeline_env["root"] / "site-b"), "--out", str(out), "--bootstrap", "100"],
                         capture_output=True, text=True, timeout=300, env=os.environ.copy())  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["n_cases"] == 3 and {m["name"] for m in doc["metrics"]} >= {"dice_WT", "hd95_WT"}
    dice = next(m for m in doc["metrics"] if m["name"] == "dice_WT")
    assert dice["a"]["ci95"][0] <= dice["a"]["value"] <= dice["a"]["ci95"][1]
    assert (out / "report.md").exists() and (out / "per_case_dice_WT.png").stat().st_size > 1000
    attached = registry.client.list_artifacts(registry.version("segmentation", versions[-1]).run_id, f"compare/v{versions[0]}-v{versions[-1]}")
    assert attached
    bad = subprocess.run([exe, "models", "compare", "segmentation", versions[0], "999"], capture_output=True, text=True,
                         timeout=120, env=os.environ.copy())  # fmt: skip
    assert bad.returncode == 1 and "segmentation version 999 is not in the registry" in bad.stderr and "Traceback" not in bad.stderr


def test_bad_pipeline_requests_are_messages(pipeline_env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ntasks: [dancing]\ntraining: {epochs: {segmentation: -1}}\n")
    run = pipeline("--config", str(bad), "--data", str(pipeline_env["root"] / "data"))
    assert run.returncode == 1 and "tasks:" in run.stderr and "training.epochs" in run.stderr
    missing = pipeline("--data", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "not found" in missing.stderr
    nodata = pipeline("--config", str(pipeline_env["configs"] / "first.yaml"), "--promote", "everywhere")
    assert nodata.returncode == 1 and "--promote must be candidate or champion" in nodata.stderr
    for result in (run, missing, nodata):
        assert "Traceback" not in result.stderr
