"""Tokens, roles, the audit log, the serving contract, gate arithmetic and the Triton config."""

from __future__ import annotations

import json

import pytest
from google.protobuf import text_format

from oncoserve.audit import AuditLog
from oncoserve.auth import AuthError, Identity, TokenStore, require
from pipelines.gates import _metric_gates, _regression_gates, load_gates
from serving.compile import CompileOptions, model_config
from serving.contract import signature_problems
from serving.tensorrt import build_plan

SEG_SIGNATURE = {
    "inputs": [{"name": "image", "datatype": "FLOAT", "shape": ["batch", 4, 96, 112, 96]}],
    "outputs": [{"name": "probabilities", "datatype": "FLOAT", "shape": ["batch", 4, 96, 112, 96]}],
}


def test_tokens_are_stored_hashed_and_roles_nest(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    with pytest.raises(ValueError, match="first token must be an admin"):
        store.create("x", "viewer", None)
    admin_token = store.create("root", "admin", None)
    admin = store.authenticate(admin_token)
    assert admin == Identity("root", "admin")
    assert admin_token not in (tmp_path / "tokens.json").read_text()
    assert (tmp_path / "tokens.json").stat().st_mode & 0o777 == 0o600
    with pytest.raises(AuthError, match="needs role admin"):
        store.create("y", "viewer", Identity("ds", "data-scientist"))
    ds = store.authenticate(store.create("ds", "data-scientist", admin))
    assert require(ds, "viewer", "x") == ds
    with pytest.raises(AuthError) as err:
        require(ds, "platform", "promoting to champion")
    assert err.value.kind == "forbidden"
    store.revoke("ds", admin)
    with pytest.raises(AuthError, match="not valid"):
        store.authenticate("osv_nope")
    with pytest.raises(AuthError) as err:
        require(None, "viewer", "reading")
    assert err.value.kind == "unauthenticated"


def test_audit_merges_phases_and_flags_an_interrupted_action(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    done = log.begin("ann", "platform", "promote", task="segmentation", version="3", to="champion")
    log.finish(done, "completed")
    crashed = log.begin("ann", "platform", "promote", task="segmentation", version="4", to="champion")
    log.event("bob", "data-scientist", "register", task="survival", version="1")
    entries = {e["action_id"]: e for e in log.entries()}
    assert entries[done]["status"] == "completed" and entries[done]["actor"] == "ann"
    assert entries[crashed]["status"] == "incomplete"  # intent on disk, no outcome: never a silent move
    assert len(entries) == 3
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["action_id"] for line in lines)
    with pytest.raises(ValueError):
        log.finish(done, "maybe")


def test_signature_must_match_the_serving_contract():
    assert signature_problems("segmentation", SEG_SIGNATURE) == []
    fixed_batch = json.loads(json.dumps(SEG_SIGNATURE))
    fixed_batch["inputs"][0]["shape"][0] = 1
    assert "image: batch axis is not dynamic" in signature_problems("segmentation", fixed_batch)
    assert "input 'presence' missing" in signature_problems("classification", SEG_SIGNATURE)
    small = json.loads(json.dumps(SEG_SIGNATURE))
    small["inputs"][0]["shape"] = ["batch", 4, 64, 64, 64]
    assert any("expected [4, 96, 112, 96]" in p for p in signature_problems("localization", small))


def _patch_signature(patch, out_channels=4, in_channels=4):
    return {"inputs": [{"name": "image", "datatype": "FLOAT", "shape": ["batch", in_channels, *patch]}],
            "outputs": [{"name": "probabilities", "datatype": "FLOAT", "shape": ["batch", out_channels, *patch]}]}


def test_a_segmentation_patch_network_meets_the_contract_within_the_grid():
    assert signature_problems("segmentation", _patch_signature([64, 64, 64])) == []
    assert signature_problems("segmentation", _patch_signature([64, 64, 64], out_channels=3)) == []  # regions
    assert any("larger than the model grid" in p for p in signature_problems("segmentation", _patch_signature([128, 64, 64])))
    assert any("not a multiple of 8" in p for p in signature_problems("segmentation", _patch_signature([60, 64, 64])))
    assert any("probabilities: shape" in p for p in signature_problems("segmentation", _patch_signature([64, 64, 64], out_channels=2)))
    assert any("expected [4, px, py, pz]" in p for p in signature_problems("segmentation", _patch_signature([64, 64, 64], in_channels=3)))
    mismatched = _patch_signature([64, 64, 64])
    mismatched["outputs"][0]["shape"] = ["batch", 4, 32, 64, 64]
    assert signature_problems("segmentation", mismatched)


def test_metric_and_regression_gate_arithmetic():
    spec = {"floors": {"dice_WT": 0.8}, "ceilings": {"hd95_WT": 10.0}, "regression_tolerance": {"dice_WT": 0.02, "hd95_WT": 2.0}}
    gates = {g.name: g for g in _metric_gates({"dice_WT": 0.85, "hd95_WT": 12.0}, spec, "s")}
    assert gates["floor:dice_WT"].passed and not gates["ceiling:hd95_WT"].passed
    assert not _metric_gates({}, spec, "s")[0].passed  # a missing figure never passes
    reg = {g.name: g for g in _regression_gates({"dice_WT": 0.79, "hd95_WT": 11.0}, {"dice_WT": 0.80, "hd95_WT": 10.0}, spec, "3", "s")}
    assert reg["no_regression:dice_WT"].passed  # within 0.02
    assert reg["no_regression:hd95_WT"].passed  # within 2 mm
    worse = {g.name: g for g in _regression_gates({"dice_WT": 0.70, "hd95_WT": 13.0}, {"dice_WT": 0.80, "hd95_WT": 10.0}, spec, "3", "s")}
    assert not worse["no_regression:dice_WT"].passed and not worse["no_regression:hd95_WT"].passed


def test_the_images_added_value_over_age_alone_can_be_gated_on_its_interval():
    """The gate gates.toml shows for survival: the lower bound of c_index_over_age_only's interval."""
    spec = {"floors": {"c_index_over_age_only": 0.0}, "floor_evidence": "ci_low"}
    resolved = {"c_index_over_age_only": 0.062, "c_index_over_age_only_ci_low": 0.026, "c_index_over_age_only_ci_high": 0.10}
    noise = {"c_index_over_age_only": 0.022, "c_index_over_age_only_ci_low": -0.086, "c_index_over_age_only_ci_high": 0.135}
    assert _metric_gates(resolved, spec, "s")[0].passed  # the benchmark's 200 new patients
    assert not _metric_gates(noise, spec, "s")[0].passed  # its 36-case split: the same model, unresolved


def test_packaged_gates_file_is_versioned_and_covers_every_trainable_task():
    gates = load_gates()
    assert gates["version"] >= 1
    assert {"segmentation", "localization", "classification", "survival"} <= set(gates)


def test_triton_config_parses_and_carries_batching_and_gpu_options():
    from tritonclient.grpc import model_config_pb2

    text = text_format.MessageToString(model_config("segmentation", SEG_SIGNATURE, CompileOptions()))
    parsed = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert parsed.input[0].name == "image" and list(parsed.input[0].dims) == [4, 96, 112, 96]
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 2000
    gpu = model_config("segmentation", SEG_SIGNATURE, CompileOptions(gpu=True, tensorrt_accelerator=True))
    assert gpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert gpu.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"


def test_triton_config_can_name_the_openvino_backend_for_cpu_nodes():
    from tritonclient.grpc import model_config_pb2

    from serving.compile import CompileError, triton_backend

    assert triton_backend(CompileOptions(), "openvino") == "onnxruntime"  # the default names onnxruntime
    assert triton_backend(CompileOptions(triton_cpu_backend="measured"), "openvino") == "openvino"
    assert triton_backend(CompileOptions(triton_cpu_backend="measured"), "onnxruntime") == "onnxruntime"
    text = text_format.MessageToString(model_config("segmentation", SEG_SIGNATURE, CompileOptions(), "openvino"))
    parsed = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert parsed.backend == "openvino" and parsed.default_model_filename == "model.onnx" and not parsed.platform
    assert parsed.max_batch_size == 4 and parsed.input[0].name == "image"
    with pytest.raises(CompileError, match="CPU nodes"):
        triton_backend(CompileOptions(gpu=True, triton_cpu_backend="openvino"), "onnxruntime")
    with pytest.raises(CompileError, match="not one of"):
        triton_backend(CompileOptions(triton_cpu_backend="tvm"), "onnxruntime")


def test_tensorrt_build_reports_skipped_without_writing_a_plan(tmp_path):
    result = build_plan(tmp_path / "model.onnx")
    assert result.status.startswith("skipped:") and result.data is None


def test_a_floor_is_judged_on_the_evidence_the_gates_file_asks_for():
    from pipelines.gates import _metric_gates

    metrics = {"idh_auc": 0.82, "idh_auc_ci_low": 0.55, "idh_auc_ci_high": 0.98, "ood_auroc": 0.95, "n_cases": 9}
    spec = {"floors": {"idh_auc": 0.70}}
    point = _metric_gates(metrics, spec, "held-out", {"floor_evidence": "point"})[0]
    assert point.passed and point.value == 0.82 and "95 % CI 0.550-0.980, n = 9" in point.detail
    strict = _metric_gates(metrics, spec, "held-out", {"floor_evidence": "ci_low"})[0]
    assert not strict.passed and strict.value == 0.55 and "lower bound" in strict.threshold
    # A metric without an interval cannot show its lower bound: not met under ci_low.
    assert not _metric_gates(metrics, {"floors": {"ood_auroc": 0.9}}, "s", {"floor_evidence": "ci_low"})[0].passed
    few = _metric_gates(metrics, spec, "held-out", {"min_test_cases": 30})[0]
    assert not few.passed and "fewer than the 30 test cases" in few.detail
    # Per task, the task's own setting wins over the defaults.
    assert _metric_gates(metrics, {**spec, "floor_evidence": "point"}, "s", {"floor_evidence": "ci_low"})[0].passed
    with pytest.raises(ValueError, match="floor_evidence"):
        _metric_gates(metrics, spec, "s", {"floor_evidence": "vibes"})
