"""CPU runtime selection: parity against the exported reference first, then the clock."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.runtimes import (RUNTIMES, RuntimeChoice, RuntimeUnavailable, choose_runtime, describe_onnx, load_reference,
                              open_session, parity)  # fmt: skip


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 3, 3, padding=1)
        self.up = torch.nn.ConvTranspose3d(3, 3, 2, stride=2)

    def forward(self, x):
        return torch.softmax(self.up(torch.relu(self.conv(x))), dim=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small 3D conv net exported the way training/export.py does, with its reference.npz."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("runtime")
    net, x = _Net().eval(), torch.randn(1, 2, 8, 8, 8)
    torch.onnx.export(net, (x,), str(root / "model.onnx"), input_names=["image"], output_names=["probabilities"],
                      dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}}, opset_version=17, dynamo=False)  # fmt: skip
    with torch.no_grad():
        y = net(x).numpy()
    np.savez_compressed(root / "reference.npz", **{"input.image": x.numpy(), "output.probabilities": y})
    return root


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_each_runtime_reproduces_the_reference_within_the_tolerance(exported, runtime):
    inputs, expected = load_reference(exported / "reference.npz")
    session = open_session(runtime, exported / "model.onnx", threads=1)
    got = session.run(inputs)
    assert set(got) == {"probabilities"} and got["probabilities"].dtype == np.float32
    assert parity(got, expected) <= 1e-4
    # A dynamic batch axis: two studies in one call give each one's own output.
    both = session.run({"image": np.concatenate([inputs["image"], inputs["image"] * 0.5])})["probabilities"]
    assert both.shape == (2, *expected["probabilities"].shape[1:])
    assert np.allclose(both[0], expected["probabilities"][0], atol=1e-4)


def test_openvino_outputs_are_not_overwritten_by_the_next_call(exported):
    inputs, _ = load_reference(exported / "reference.npz")
    session = open_session("openvino", exported / "model.onnx")
    first = session.run(inputs)["probabilities"]
    kept = first.copy()
    session.run({"image": inputs["image"] * -3})
    assert np.array_equal(first, kept)


def test_onnxruntime_io_binding_writes_each_call_into_its_own_outputs_from_request_body_views(exported):
    """After the first call of a shape, onnxruntime runs through an IO binding: the input is a read-only
    view into a request body (as the OIP codec hands it over), the outputs are fresh arrays per call."""
    import onnxruntime as ort

    inputs, _ = load_reference(exported / "reference.npz")
    plain = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    session = open_session("onnxruntime", exported / "model.onnx")
    body = bytes(inputs["image"].tobytes())
    view = np.frombuffer(body, np.float32).reshape(inputs["image"].shape)
    assert not view.flags.writeable
    outputs = [session.run({"image": view})["probabilities"] for _ in range(3)]  # 1st learns shapes, then bound
    other = session.run({"image": view * -3})["probabilities"]
    expected = plain.run(None, {"image": inputs["image"]})[0]
    for out in outputs:
        assert np.array_equal(out, expected)  # the same kernels, so bit for bit
    assert not np.shares_memory(outputs[1], outputs[2]) and not np.shares_memory(outputs[2], other)
    assert np.array_equal(other, plain.run(None, {"image": inputs["image"] * -3})[0])


def test_the_fastest_runtime_that_passes_parity_is_chosen_and_every_trial_is_recorded(exported):
    choice = choose_runtime(exported / "model.onnx", exported / "reference.npz", runs=3)
    assert [t.runtime for t in choice.trials] == list(RUNTIMES)
    assert all(t.passed and t.runs == 3 and t.p50_ms > 0 for t in choice.trials)
    assert choice.runtime == min(choice.trials, key=lambda t: t.p50_ms).runtime
    again = RuntimeChoice.from_json(choice.to_json())
    assert again == choice
    assert sum("chosen" in row for row in choice.table()) == 1


class _Wrong:
    """A runtime that answers quickly and wrongly."""

    def __init__(self, real):
        self.real = real

    def run(self, inputs):
        return {k: v + 0.01 for k, v in self.real.run(inputs).items()}


def test_a_runtime_that_fails_parity_is_never_chosen_however_fast(exported):
    def opener(runtime, path, threads):
        real = open_session("onnxruntime", path, threads)
        return _Wrong(real) if runtime == "openvino" else real

    choice = choose_runtime(exported / "model.onnx", exported / "reference.npz", runs=1, opener=opener)
    wrong = next(t for t in choice.trials if t.runtime == "openvino")
    assert not wrong.passed and wrong.p50_ms is None and "parity" in wrong.error
    assert choice.runtime == "onnxruntime"
    assert any("refused: parity" in row for row in choice.table())


def test_no_runtime_passing_parity_chooses_none(exported):
    def opener(runtime, path, threads):
        if runtime == "openvino":
            raise RuntimeUnavailable("openvino is not installed")
        return _Wrong(open_session(runtime, path, threads))

    choice = choose_runtime(exported / "model.onnx", exported / "reference.npz", runs=1, opener=opener)
    assert choice.runtime is None and not any(t.passed for t in choice.trials)
    assert "not installed" in next(t.error for t in choice.trials if t.runtime == "openvino")


def test_parity_treats_a_missing_output_or_a_shape_change_as_a_failure():
    expected = {"p": np.zeros((1, 3), np.float32)}
    assert parity({}, expected) == float("inf")
    assert parity({"p": np.zeros((1, 4), np.float32)}, expected) == float("inf")
    assert parity({"p": np.full((1, 3), np.nan, np.float32)}, expected) == float("inf")
    # Beyond [-1, 1] the difference is relative to the magnitude (a risk score, a distance).
    assert parity({"p": np.array([[101.0]])}, {"p": np.array([[100.0]])}) == pytest.approx(0.01)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_file_that_is_not_onnx_is_refused_with_the_runtime_named(tmp_path, runtime):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(RuntimeUnavailable, match=runtime):
        open_session(runtime, bad)


def test_unknown_runtime_is_a_clear_error(exported):
    with pytest.raises(ValueError, match="unknown runtime 'tensorflow'"):
        open_session("tensorflow", exported / "model.onnx")


def test_metadata_comes_from_the_graph_with_v2_datatypes(exported):
    meta = describe_onnx(exported / "model.onnx")
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 2, 8, 8, 8]}]
    assert meta["outputs"][0]["name"] == "probabilities" and meta["outputs"][0]["shape"][0] == -1


def test_the_embedded_backend_reports_its_batch_limit(exported, tmp_path):
    """A dynamic batch axis has no limit; a graph exported with a fixed batch takes that many rows."""
    from serving.backends import EmbeddedBackend

    assert EmbeddedBackend(exported / "model.onnx", "segmentation", "1").max_batch_size is None
    net, x = _Net().eval(), torch.randn(2, 2, 8, 8, 8)
    torch.onnx.export(net, (x,), str(tmp_path / "fixed.onnx"), input_names=["image"], output_names=["probabilities"],
                      opset_version=17, dynamo=False)  # fmt: skip
    assert EmbeddedBackend(tmp_path / "fixed.onnx", "segmentation", "1").max_batch_size == 2
