"""ONNX export (dynamic batch axis) with a parity check against torch on a real input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from training.data import CaseArrays
from training.errors import TrainingError
from training.tasks import TaskDef

OPSET = 17
PARITY_TOLERANCE = 1e-3
# Beside model.onnx: the parity input and torch's output for it (keys input.<name> / output.<name>);
# `oncoserve compile` checks every candidate runtime against it (serving/runtimes.py reads this name).
REFERENCE_FILE = "reference.npz"


@dataclass
class ExportResult:
    path: Path
    opset: int
    parity_max_abs_diff: float
    inputs: list[dict]
    outputs: list[dict]

    @property
    def parity_ok(self) -> bool:
        return self.parity_max_abs_diff <= PARITY_TOLERANCE


def _io_spec(values) -> list[dict]:
    spec = []
    for v in values:
        dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
        spec.append({"name": v.name, "datatype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type), "shape": dims})
    return spec


def export_onnx(task: TaskDef, model: torch.nn.Module, extras: dict, example: CaseArrays, out: Path) -> ExportResult:
    graph = task.export_module(model, extras).eval()
    inputs = task.export_inputs(example)
    dynamic = {name: {0: "batch"} for name in task.input_names + task.output_names}
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(inputs) != len(task.input_names):
        raise TrainingError(f"{task.name}: {len(inputs)} example inputs for inputs {task.input_names}")
    try:
        torch.onnx.export(
            graph, inputs, str(out), input_names=task.input_names, output_names=task.output_names,
            dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
        )  # fmt: skip
    except Exception as exc:  # the exporter raises many types; the user needs the task and the reason
        raise TrainingError(f"{task.name}: ONNX export failed: {str(exc).splitlines()[0][:300]}") from exc
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    with torch.no_grad():
        expected = graph(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed = {name: t.numpy() for name, t in zip(task.input_names, inputs)}
    got = session.run(None, feed)
    np.savez_compressed(out.parent / REFERENCE_FILE, **{f"input.{k}": v for k, v in feed.items()},
                        **{f"output.{n}": e.numpy() for n, e in zip(task.output_names, expected)})  # fmt: skip
    diff = 0.0
    for e, g in zip(expected, got):  # every output, MC-dropout's too (its masks are fixed in the graph)
        # Absolute for outputs within [-1, 1] (probabilities), relative beyond (a risk, a distance).
        scale = max(1.0, float(np.max(np.abs(e.numpy()))))
        diff = max(diff, float(np.max(np.abs(e.numpy() - g))) / scale)
    return ExportResult(out, OPSET, diff, _io_spec(proto.graph.input), _io_spec(proto.graph.output))
