"""TensorRT plan build for GPU nodes. GPU-VERIFIED-ONLY: this path cannot run on CPU-only machines.

Where TensorRT or a CUDA device is absent, `build_plan` reports `skipped: ...` and returns no bytes:
it never writes a placeholder plan. The builder code follows TensorRT's Python API (ONNX parser ->
builder config with FP16 when the GPU supports it -> serialized engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WORKSPACE_BYTES = 1 << 30


@dataclass
class PlanResult:
    status: str  # "built" or "skipped: <why>" or "failed: <why>"
    data: bytes | None = None


def gpu_present() -> bool:
    """A CUDA device the driver can see (asked of libcuda itself: serving never imports torch)."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def build_plan(onnx_path: Path, max_batch: int = 4) -> PlanResult:
    try:
        import tensorrt as trt  # noqa: F401  (only on GPU images)
    except ImportError:
        return PlanResult("skipped: TensorRT is not installed")
    if not gpu_present():
        return PlanResult("skipped: no GPU")
    return _build(onnx_path, max_batch)  # pragma: no cover - GPU only


def _build(onnx_path: Path, max_batch: int) -> PlanResult:  # pragma: no cover - GPU only
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        return PlanResult(f"failed: ONNX parse: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)[1:]
        profile.set_shape(tensor.name, [1, *dims], [max(1, max_batch // 2), *dims], [max_batch, *dims])
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        return PlanResult("failed: TensorRT could not build an engine")
    return PlanResult("built", bytes(engine))
