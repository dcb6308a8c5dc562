"""The latency gate runs the model on the serving contract's input: a model that cannot answer it fails
the gate with the runtime's reason (it used to raise, and the platform API answered 500)."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from pipelines.gates import _latency_gate
from serving.contract import CONTRACT


def _identity_model(path, batch) -> None:
    dims = [batch, *CONTRACT["localization"]["inputs"]["image"]]
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["heatmap"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, dims)])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_a_model_that_errors_on_the_contract_input_fails_the_latency_gate(tmp_path):
    _identity_model(tmp_path / "model.onnx", batch=2)  # a fixed batch of two: a study's batch of one is refused
    result = _latency_gate(tmp_path / "model.onnx", "localization", budget_ms=3000, runs=1)
    assert not result.passed and result.value is None
    assert "the model failed on the contract's reference input" in result.detail and "image" in result.detail


def test_a_model_that_answers_is_timed(tmp_path):
    _identity_model(tmp_path / "model.onnx", batch="batch")
    result = _latency_gate(tmp_path / "model.onnx", "localization", budget_ms=3000, runs=2)
    assert result.passed and result.value >= 0.0
