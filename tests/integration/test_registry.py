"""Registry, gates, roles, audit, rollback and compilation on the real stack (MLflow, S3, Ray).

The tests run in order and share the registry: A (a trained segmentation version) becomes champion,
B (A with its output pushed to background, honestly worse) is refused, forced in by an admin, rolled back.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from mlflow import MlflowClient
from onnx import helper, numpy_helper

from oncoserve.audit import AuditLog
from oncoserve.auth import Identity, TokenStore
from oncoserve.object_store import object_store
from serving.artifacts import TamperedArtifact, load_compiled_onnx
from serving.registry import Registry
from serving.runtimes import Trial, load_reference, open_session
from tests.conftest import oncoserve

pytestmark = pytest.mark.integration
TASK = "segmentation"
# What a user who wants B through would point the CLI at: no floors, no regression check. The server
# enforces its own gates (tests.conftest.TEST_GATES: a one-epoch champion is weak, but B, all
# background, loses on WT), so this file must change nothing.
PASS_ALL_GATES = """
version = 1
[defaults]
latency_budget_ms = 1e9
[segmentation]
floors = {}
regression_tolerance = {}
"""


@pytest.fixture(scope="module")
def env(live_stack, trained, tmp_path_factory, monkeypatch_module):
    gates = tmp_path_factory.mktemp("gates") / "pass.toml"
    gates.write_text(PASS_ALL_GATES)
    monkeypatch_module.setenv("ONCOSERVE_GATES_FILE", str(gates))  # client side: must have no effect
    store = TokenStore(live_stack.tokens_file)
    admin = Identity("test-admin", "admin")
    tokens = {role: store.create(f"t-{role}", role, admin) for role in ("viewer", "data-scientist", "platform")}
    tokens["admin"] = (live_stack.home / "token").read_text()
    # The stack is shared: other modules (the web console test) may have promoted this task before.
    return {"tokens": tokens, "a": trained[TASK], "settings": live_stack, "since": time.time(), "client_gates": gates}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def register_worse_copy(settings, version: str, keep_reference: bool = False) -> str:
    """B: A's graph with +50 added to the background logit before the softmax (every voxel background)."""
    registry = Registry(settings.mlflow_url)
    src = registry.download(TASK, version)
    work = Path(tempfile.mkdtemp()) / "model"
    shutil.copytree(src, work)
    model = onnx.load(str(work / "model.onnx"))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    shift = np.zeros((1, 4, 1, 1, 1), np.float32)
    shift[0, 0] = 50.0
    model.graph.initializer.append(numpy_helper.from_array(shift, "background_shift"))
    model.graph.node.insert(list(model.graph.node).index(softmax),
                            helper.make_node("Add", [softmax.input[0], "background_shift"], ["shifted_logits"]))  # fmt: skip
    softmax.input[0] = "shifted_logits"
    onnx.save(model, str(work / "model.onnx"))
    if keep_reference:  # the exported reference now belongs to another graph: compile must refuse it
        return _register(settings, version, work)
    # What export writes for this graph: the same reference input, this graph's own output for it.
    inputs, _ = load_reference(work / "reference.npz")
    outputs = open_session("onnxruntime", work / "model.onnx").run(inputs)
    np.savez_compressed(work / "reference.npz", **{f"input.{k}": v for k, v in inputs.items()},
                        **{f"output.{k}": v for k, v in outputs.items()})  # fmt: skip
    return _register(settings, version, work)


def _register(settings, version: str, work: Path) -> str:
    registry = Registry(settings.mlflow_url)
    client = MlflowClient(settings.mlflow_url)
    info = registry.version(TASK, version)
    run = client.create_run(client.get_run(info.run_id).info.experiment_id, run_name="worse-copy")
    client.log_artifacts(run.info.run_id, str(work), "model")
    tags = {k: v for k, v in info.tags.items() if not k.startswith("compiled_")}
    mv = client.create_model_version(TASK, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags)
    return str(mv.version)


def test_compile_writes_a_parseable_triton_repository(env):
    from tritonclient.grpc import model_config_pb2

    s, a = env["settings"], env["a"]
    run = oncoserve("compile", TASK, "--version", a, token=env["tokens"]["data-scientist"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "TensorRT plan: skipped" in run.stdout
    store = object_store(s)
    prefix = s.triton_repo_prefix
    text = store.get_object(s.bucket_models, f"{prefix}/{TASK}/config.pbtxt").read().decode()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    onnx_bytes = store.get_object(s.bucket_models, f"{prefix}/{TASK}/{a}/model.onnx").read()
    graph = onnx.load_model_from_string(onnx_bytes).graph
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 4
    assert a in [str(v) for v in config.version_policy.specific.versions]  # named, never "the latest N"
    tags = Registry(s.mlflow_url).version(TASK, a).tags
    assert hashlib.sha256(tags["compiled_config"].encode()).hexdigest() == json.loads(tags["compiled_sha256"])[f"{TASK}/config.pbtxt"]
    assert [i.name for i in config.input] == [i.name for i in graph.input]
    assert [o.name for o in config.output] == [o.name for o in graph.output]
    onnx_dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:]
    # A patch network: Triton's input is the window the version was trained on (its extras), not the grid.
    extras = json.loads((Registry(s.mlflow_url).download(TASK, a) / "extras.json").read_text())
    assert list(config.input[0].dims) == onnx_dims == [4, *extras["inference"]["roi"]] == [4, 64, 64, 64]
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    digests = json.loads(Registry(s.mlflow_url).version(TASK, a).tags["compiled_sha256"])
    assert f"{TASK}/{a}/model.onnx" in digests and f"{TASK}/{a}/runtime.json" in digests
    # Every CPU runtime was parity-checked and timed; the fastest passing one is recorded and printed.
    runtime = json.loads(store.get_object(s.bucket_models, f"{prefix}/{TASK}/{a}/runtime.json").read())
    trials = {t["runtime"]: t for t in runtime["trials"]}
    assert set(trials) == {"onnxruntime", "openvino"} and all(t["passed"] for t in trials.values()), trials
    assert all(t["max_abs_diff"] <= runtime["tolerance"] for t in trials.values())
    assert runtime["runtime"] == min(trials.values(), key=lambda t: t["p50_ms"])["runtime"]
    assert f"serving runtime: {runtime['runtime']}" in run.stdout and "parity" in run.stdout
    card = Registry(s.mlflow_url).model_card(TASK, a)
    assert "## Serving runtime" in card and f"Served on **{runtime['runtime']}**" in card
    # A re-compile keeps every file byte for byte (a promoted version loads against the signed digests).
    from serving.compile import compile_version

    again = compile_version(Registry(s.mlflow_url), store, s.bucket_models, prefix, TASK, a)
    assert again.files == digests and again.runtime.trials == [Trial(**t) for t in runtime["trials"]]


def test_a_version_whose_graph_no_longer_reproduces_its_reference_is_not_compiled(env):
    c = register_worse_copy(env["settings"], env["a"], keep_reference=True)
    run = oncoserve("compile", TASK, "--version", c, token=env["tokens"]["data-scientist"])
    assert run.returncode == 1, run.stdout + run.stderr
    assert "no CPU runtime reproduces the exported reference output" in run.stderr and "parity" in run.stderr
    assert "compiled_sha256" not in Registry(env["settings"].mlflow_url).version(TASK, c).tags
    audited = [e for e in AuditLog(env["settings"].audit_file).entries() if e["action"] == "compile" and str(e.get("version")) == c]
    assert [e["status"] for e in audited] == ["failed"] and "parity" in audited[0]["error"]


def test_tampered_artifact_is_refused_at_load(env, tmp_path):
    s, a = env["settings"], env["a"]
    registry, store = Registry(s.mlflow_url), object_store(s)
    key = f"{s.triton_repo_prefix}/{TASK}/{a}/model.onnx"
    good = load_compiled_onnx(registry, store, s.bucket_models, s.triton_repo_prefix, TASK, a, tmp_path / "ok.onnx")
    original = good.read_bytes()
    tampered = original[:-1] + bytes([original[-1] ^ 0xFF])
    store.put_object(s.bucket_models, key, io.BytesIO(tampered), len(tampered))
    try:
        with pytest.raises(TamperedArtifact, match="differs from the compiled"):
            load_compiled_onnx(registry, store, s.bucket_models, s.triton_repo_prefix, TASK, a, tmp_path / "bad.onnx")
        assert not (tmp_path / "bad.onnx").exists()
    finally:
        store.put_object(s.bucket_models, key, io.BytesIO(original), len(original))


def test_promotion_needs_a_token_and_the_right_role(env):
    a, tokens = env["a"], env["tokens"]
    no_token = oncoserve("models", "promote", TASK, a, "--to", "candidate", token="")
    assert no_token.returncode == 1 and "needs a token" in no_token.stderr, no_token.stderr
    bad = oncoserve("models", "promote", TASK, a, "--to", "candidate", token="osv_forged")
    assert bad.returncode == 1 and "not valid" in bad.stderr
    ds = oncoserve("models", "promote", TASK, a, "--to", "champion", token=tokens["data-scientist"])
    assert ds.returncode == 1 and "needs role platform" in ds.stderr
    ok = oncoserve("models", "promote", TASK, a, "--to", "candidate", token=tokens["data-scientist"])
    assert ok.returncode == 0, ok.stderr
    assert Registry(env["settings"].mlflow_url).alias(TASK, "candidate") == a


def test_good_version_passes_gates_and_becomes_champion(env):
    run = oncoserve("models", "promote", TASK, env["a"], "--to", "champion", "--reason", "first champion",
                    token=env["tokens"]["platform"])  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pass" in run.stdout and "FAIL" not in run.stdout
    assert Registry(env["settings"].mlflow_url).alias(TASK, "champion") == env["a"]


def test_worse_version_is_refused_with_the_failing_gate_named(env, tiny_dataset):
    b = register_worse_copy(env["settings"], env["a"])
    env["b"] = b
    run = oncoserve("models", "promote", TASK, b, "--to", "champion", "--eval-data", str(tiny_dataset),
                    token=env["tokens"]["platform"])  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no_regression:hd95_WT" in run.stderr and "refused" in run.stderr
    assert Registry(env["settings"].mlflow_url).alias(TASK, "champion") == env["a"]
    # The caller's ONCOSERVE_GATES_FILE (pass-all) changed nothing: the audit names the server's gates.
    from pipelines.platform_client import PlatformClient

    server = PlatformClient(env["settings"], token="").info()["gates_sha256"]
    refusal = [e for e in AuditLog(env["settings"].audit_file).entries() if e.get("version") == b and e["status"] == "refused"][-1]
    assert refusal["gates_sha256"] == server != hashlib.sha256(env["client_gates"].read_bytes()).hexdigest()
    assert refusal["eval_data"].startswith(f"s3://{env['settings'].bucket_data}/eval/")


def test_forcing_needs_admin_and_a_reason_and_is_audited(env, tiny_dataset):
    b, tokens = env["b"], env["tokens"]
    platform = oncoserve("models", "promote", TASK, b, "--to", "champion", "--force", "--reason", "x", token=tokens["platform"])
    assert platform.returncode == 1 and "needs role admin" in platform.stderr
    no_reason = oncoserve("models", "promote", TASK, b, "--to", "champion", "--force", token=tokens["admin"])
    assert no_reason.returncode == 1 and "needs --reason" in no_reason.stderr
    # A champion must be compiled (B's registered figures are A's: its compile gates pass without eval data).
    compiled = oncoserve("compile", TASK, "--version", b, token=tokens["data-scientist"])
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    forced = oncoserve("models", "promote", TASK, b, "--to", "champion", "--force", "--reason", "incident drill",
                       "--eval-data", str(tiny_dataset), token=tokens["admin"])  # fmt: skip
    assert forced.returncode == 0 and "FORCED" in forced.stdout, forced.stdout + forced.stderr
    registry = Registry(env["settings"].mlflow_url)
    assert registry.alias(TASK, "champion") == b and registry.alias(TASK, "previous") == env["a"]


def _config(path: Path):
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_triton_repository_holds_champion_and_previous_verified_whatever_else_is_compiled(env, tmp_path):
    """Defects: Triton read S3 unverified and kept the two newest versions, so compiling candidates
    unloaded the champion or the rollback target."""
    from serving.compile import served_versions

    s, a, b = env["settings"], env["a"], env["b"]
    registry, store = Registry(s.mlflow_url), object_store(s)
    assert served_versions(registry, TASK) == [a, b]  # previous and champion after the forced promotion
    # A third version compiled (a candidate): the repository's config names it beside the served ones ...
    c = register_worse_copy(s, a)
    compiled = oncoserve("compile", TASK, "--version", c, token=env["tokens"]["data-scientist"])
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    shared = store.get_object(s.bucket_models, f"{s.triton_repo_prefix}/{TASK}/config.pbtxt").read().decode()
    from tritonclient.grpc import model_config_pb2

    policy = text_format.Parse(shared, model_config_pb2.ModelConfig()).version_policy
    assert list(policy.specific.versions) == [int(a), int(b), int(c)] and not policy.HasField("latest")
    # ... and the local repository Triton reads holds exactly champion and previous, each file verified.
    dest, report = tmp_path / "models", tmp_path / "sync.json"
    run = oncoserve("models", "sync-triton", "--dest", str(dest), "--report", str(report), token=env["tokens"]["viewer"])
    assert run.returncode == 0, run.stdout + run.stderr
    config = _config(dest / TASK / "config.pbtxt")
    assert list(config.version_policy.specific.versions) == [int(a), int(b)] and config.platform == "onnxruntime_onnx"
    assert sorted(p.name for p in (dest / TASK).iterdir() if p.is_dir()) == sorted([a, b])
    for version in (a, b):
        digests = json.loads(registry.version(TASK, version).tags["compiled_sha256"])
        local = hashlib.sha256((dest / TASK / version / "model.onnx").read_bytes()).hexdigest()
        assert local == digests[f"{TASK}/{version}/model.onnx"]
    outcome = {t["task"]: t for t in json.loads(report.read_text())["tasks"]}[TASK]
    assert outcome["loaded"] == [a, b] and outcome["refused"] == {}
    # A tampered champion in S3 is never written: a copy verified before (same sha256 as recorded) stays,
    # a fetch of the tampered bytes is refused and the version left out, with the reason.
    key = f"{s.triton_repo_prefix}/{TASK}/{b}/model.onnx"
    original = store.get_object(s.bucket_models, key).read()
    tampered = original[:-1] + bytes([original[-1] ^ 0xFF])
    store.put_object(s.bucket_models, key, io.BytesIO(tampered), len(tampered))
    try:
        kept = oncoserve("models", "sync-triton", "--dest", str(dest), token=env["tokens"]["viewer"])
        assert kept.returncode == 0 and "refused" not in kept.stderr  # the local copy still matches the record
        assert list(_config(dest / TASK / "config.pbtxt").version_policy.specific.versions) == [int(a), int(b)]
        (dest / TASK / b / "model.onnx").unlink()  # lost: the next pass must fetch it again
        again = oncoserve("models", "sync-triton", "--dest", str(dest), token=env["tokens"]["viewer"])
        assert again.returncode == 0 and f"refused {TASK} v{b}" in again.stderr and "differs from the compiled" in again.stderr
        assert not (dest / TASK / b).exists() and list(_config(dest / TASK / "config.pbtxt").version_policy.specific.versions) == [int(a)]
        fresh = tmp_path / "fresh"
        oncoserve("models", "sync-triton", "--dest", str(fresh), token=env["tokens"]["viewer"])
        assert not (fresh / TASK / b).exists() and list(_config(fresh / TASK / "config.pbtxt").version_policy.specific.versions) == [int(a)]
    finally:
        store.put_object(s.bucket_models, key, io.BytesIO(original), len(original))
    healed = oncoserve("models", "sync-triton", "--dest", str(dest), token=env["tokens"]["viewer"])
    assert healed.returncode == 0 and list(_config(dest / TASK / "config.pbtxt").version_policy.specific.versions) == [int(a), int(b)]


def test_rollback_restores_the_previous_version(env):
    viewer = oncoserve("models", "rollback", TASK, token=env["tokens"]["viewer"])
    assert viewer.returncode == 1 and "needs role platform" in viewer.stderr
    run = oncoserve("models", "rollback", TASK, "--reason", "drill over", token=env["tokens"]["platform"])
    assert run.returncode == 0, run.stderr
    assert Registry(env["settings"].mlflow_url).alias(TASK, "champion") == env["a"]
    again = oncoserve("models", "rollback", TASK, token=env["tokens"]["platform"])
    assert again.returncode == 1 and "no `previous` version" in again.stderr


def test_every_action_appears_once_in_the_audit_log(env):
    entries = [e for e in AuditLog(env["settings"].audit_file).entries() if e.get("task") == TASK]
    assert all(e["status"] != "incomplete" for e in entries)
    summary = [(e["action"], str(e.get("version")), e["status"], bool(e.get("forced"))) for e in entries]
    a, b = env["a"], env["b"]
    assert summary.count(("register", a, "completed", False)) == 1
    expected = [("promote", a, "completed", False), ("promote", a, "completed", False),
                ("promote", b, "refused", False), ("promote", b, "completed", True), ("rollback", a, "completed", False)]  # fmt: skip
    mine = [e for e in entries if e.get("time", 0) >= env["since"]]
    assert [(e["action"], str(e.get("version")), e["status"], bool(e.get("forced"))) for e in mine
            if e["action"] in ("promote", "rollback")] == expected  # fmt: skip
    forced = next(e for e in mine if e.get("forced") and e["action"] == "promote")
    assert forced["actor"] == "test-admin" and forced["reason"] == "incident drill" and forced["from_version"] == a
    refused = next(e for e in mine if e["status"] == "refused")
    assert any(g["name"] == "no_regression:hd95_WT" and not g["passed"] for g in refused["gates"])
    cli = oncoserve("models", "audit", "--json", token=env["tokens"]["viewer"])
    assert cli.returncode == 0 and len([e for e in json.loads(cli.stdout) if e.get("task") == TASK]) == len(entries)


def test_list_and_show_give_versions_aliases_lineage_and_card(env):
    listed = oncoserve("models", "list", TASK, "--json", token=env["tokens"]["viewer"])
    assert listed.returncode == 0, listed.stderr
    rows = {r["version"]: r for r in json.loads(listed.stdout)}
    assert "champion" in rows[env["a"]]["aliases"] and rows[env["a"]]["lineage"]["dataset_hash"]
    shown = oncoserve("models", "show", TASK, env["a"], token=env["tokens"]["viewer"])
    assert shown.returncode == 0 and "Model card" in shown.stdout and "Intended use" in shown.stdout
    missing = oncoserve("models", "show", TASK, "999", token=env["tokens"]["viewer"])
    assert missing.returncode == 1 and "version 999 is not in the registry" in missing.stderr


def test_alias_watcher_sees_the_champion_move(env):
    from serving.alias_watch import AliasWatcher

    registry = Registry(env["settings"].mlflow_url)
    seen = []
    watcher = AliasWatcher(registry, TASK, "champion", lambda old, new: seen.append((old, new)))
    assert watcher.poll_once() and seen == [(None, env["a"])]
    assert watcher.poll_once() is False  # nothing moved
    registry.delete_alias(TASK, "champion")  # a move serving will refuse (unsigned); the watcher still sees it
    try:
        assert watcher.poll_once() and seen[-1] == (env["a"], None)
    finally:
        registry.set_alias(TASK, "champion", env["a"])
