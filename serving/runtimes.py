"""CPU runtimes for a compiled model.onnx, and choosing between them by measurement.

Two runtimes open the same ONNX file: onnxruntime (CPU execution provider) and OpenVINO (its CPU
plugin reads ONNX directly). Which is faster depends on the network and the CPU (OpenVINO's 3D
convolutions are often quicker on x86; onnxruntime has the smaller start-up). `oncoserve compile`
therefore runs each candidate on the version's reference input (`reference.npz`, written at export
beside model.onnx), refuses any whose outputs differ from the exported reference by more than the
tolerance, times the rest, and records the fastest passing one (`runtime.json`): a small
Model-Analyzer-like step whose table goes in the compile output and the model card.

Both sessions keep to the threads they are given and never spin-wait: on a CPU node several replicas
share the cores, and a spinning runtime steals them from its neighbours.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from serving.datatypes import ONNX_TO_V2

RUNTIMES = ("onnxruntime", "openvino")
DEFAULT_TOLERANCE = 1e-3  # the export parity tolerance (training/export.py), scaled the same way
REFERENCE_FILE = "reference.npz"  # keys input.<name> / output.<name>


class RuntimeUnavailable(RuntimeError):
    """A runtime cannot open this model (not installed, or it refuses the graph)."""


def describe_onnx(path: Path) -> dict:
    """Tensor names, v2 datatypes and shapes (-1 for dynamic axes) from the ONNX graph itself."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def describe(values) -> list[dict]:
        return [{"name": v.name, "datatype": ONNX_TO_V2[onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)],
                 "shape": [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]}
                for v in values if v.name not in initializers]  # fmt: skip

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


class OnnxRuntimeSession:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for a bad file
            raise RuntimeUnavailable(f"onnxruntime cannot open {Path(path).name}: {str(exc)[:300]}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._output_shapes: dict[tuple, list[tuple[tuple[int, ...], np.dtype]]] = {}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call through an IO binding: the inputs are bound where they lie (a view into a request body
        stays a view) and ORT writes the outputs straight into arrays allocated here for this call.
        Output shapes are learnt once per input shape, from an ordinary first call."""
        key = tuple((name, array.shape, array.dtype.str) for name, array in sorted(inputs.items()))
        shapes = self._output_shapes.get(key)
        if shapes is None:
            outputs = self.session.run(self.output_names, inputs)
            self._output_shapes[key] = [(o.shape, o.dtype) for o in outputs]
            return dict(zip(self.output_names, outputs))
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        outputs = {name: np.empty(shape, dtype) for name, (shape, dtype) in zip(self.output_names, shapes)}
        for name, array in outputs.items():
            binding.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
        try:
            self.session.run_with_iobinding(binding)
        except Exception:  # noqa: BLE001 - e.g. an output whose shape depends on the data: the plain call decides
            self._output_shapes.pop(key, None)  # another thread may have dropped it already
            return dict(zip(self.output_names, self.session.run(self.output_names, inputs)))
        return outputs


class OpenVinoSession:
    """OpenVINO's CPU plugin on the ONNX graph: one latency-tuned stream, fp32 (no bf16 down-cast)."""

    name = "openvino"

    def __init__(self, path: Path, threads: int = 1):
        try:
            import openvino as ov
        except ImportError:
            raise RuntimeUnavailable("openvino is not installed") from None
        config = {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}  # fmt: skip
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with its frontend's message
            raise RuntimeUnavailable(f"openvino cannot open {Path(path).name}: {str(exc)[:300]}") from None
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: calls from several threads take turns

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            result = self._request.infer(inputs)
            # The result arrays are views into the request's buffers, which the next call overwrites.
            return {port.get_any_name(): np.array(result[port]) for port in self.compiled.outputs}


def open_session(runtime: str, path: Path, threads: int = 1):
    if runtime == "onnxruntime":
        return OnnxRuntimeSession(path, threads)
    if runtime == "openvino":
        return OpenVinoSession(path, threads)
    raise ValueError(f"unknown runtime {runtime!r} (one of {', '.join(RUNTIMES)})")


def load_reference(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The exported reference input and the torch output for it."""
    with np.load(path) as data:
        inputs = {k.split(".", 1)[1]: data[k] for k in data.files if k.startswith("input.")}
        outputs = {k.split(".", 1)[1]: data[k] for k in data.files if k.startswith("output.")}
    return inputs, outputs


def parity(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    """Largest difference over every output: absolute within [-1, 1], relative to the magnitude beyond."""
    missing = set(expected) - set(got)
    if missing:
        return float("inf")
    diff = 0.0
    for name, e in expected.items():
        g = np.asarray(got[name])
        if g.shape != e.shape:
            return float("inf")
        scale = max(1.0, float(np.max(np.abs(e)))) if e.size else 1.0
        d = float(np.max(np.abs(e.astype(np.float64) - g.astype(np.float64)))) / scale if e.size else 0.0
        diff = max(diff, d if np.isfinite(d) else float("inf"))
    return diff


@dataclass
class Trial:
    runtime: str
    passed: bool
    max_abs_diff: float | None = None
    p50_ms: float | None = None
    runs: int = 0
    error: str | None = None


@dataclass
class RuntimeChoice:
    runtime: str | None  # None: no candidate passed parity
    tolerance: float
    threads: int
    trials: list[Trial] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RuntimeChoice":
        data = json.loads(text)
        return cls(data["runtime"], data["tolerance"], data["threads"], [Trial(**t) for t in data["trials"]])

    def table(self) -> list[str]:
        """Markdown rows: one per candidate runtime, the chosen one marked."""
        rows = ["| runtime | parity (max diff) | p50 (ms) | verdict |", "|---|---|---|---|"]
        for t in self.trials:
            diff = "-" if t.max_abs_diff is None else f"{t.max_abs_diff:.2e}"
            p50 = "-" if t.p50_ms is None else f"{t.p50_ms:.1f}"
            verdict = "chosen" if t.runtime == self.runtime else ("passed" if t.passed else f"refused: {t.error}")
            rows.append(f"| {t.runtime} | {diff} | {p50} | {verdict} |")
        return rows


def choose_runtime(model_path: Path, reference: Path, runtimes: tuple[str, ...] = RUNTIMES, threads: int = 1,
                   runs: int = 5, tolerance: float = DEFAULT_TOLERANCE,
                   opener: Callable = open_session) -> RuntimeChoice:  # fmt: skip
    """Parity-check then time each runtime on the reference input; the fastest that passes is chosen."""
    inputs, expected = load_reference(reference)
    trials = []
    for runtime in runtimes:
        try:
            session = opener(runtime, model_path, threads)
            got = session.run(inputs)  # the first call also warms the runtime up
        except Exception as exc:  # unavailable, or it cannot run this model: refused, and the table says why
            trials.append(Trial(runtime, False, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
            continue
        diff = parity(got, expected)
        if not diff <= tolerance:
            trials.append(Trial(runtime, False, diff, error=f"parity {diff:.2e} > {tolerance:.0e}"))
            continue
        times = []
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            session.run(inputs)
            times.append((time.perf_counter() - t0) * 1000)
        trials.append(Trial(runtime, True, diff, float(np.median(times)), len(times)))
    passing = [t for t in trials if t.passed]
    best = min(passing, key=lambda t: t.p50_ms).runtime if passing else None
    return RuntimeChoice(best, tolerance, threads, trials)
