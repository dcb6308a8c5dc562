"""Compile a registered version into the Triton model repository in S3.

    s3://<models bucket>/<prefix>/<task>/config.pbtxt
    s3://<models bucket>/<prefix>/<task>/<n>/model.onnx        (n = the registry version)
    s3://<models bucket>/<prefix>/<task>/<n>/model.plan        (TensorRT, only where built on a GPU)
    s3://<models bucket>/<prefix>/<task>/<n>/runtime.json      (the CPU runtime chosen by measurement)
    s3://<models bucket>/<prefix>/<task>/<n>/sha256.json

config.pbtxt is built as tritonclient's ModelConfig protobuf and printed in text format, so it always
parses; its version policy names the served versions explicitly (champion, previous and the version
compiled), never "the latest N", so compiling candidates cannot unload the champion or the rollback
target. The sha256 of every artifact is recorded at compile time on the registry version (tag
`compiled_sha256`), with the version's own config text (tag `compiled_config`), and verified before any
backend loads it (serving/artifacts.py; serving/triton_sync.py builds Triton's local repository from
verified files only).

Runtime selection: each CPU runtime (serving/runtimes.py) runs the version's exported reference input;
one whose outputs differ from torch's by more than the tolerance is refused, the others are timed, and
the fastest passing one goes in runtime.json (and the tags `compiled_runtime`, `compiled_runtime_table`)
for the embedded backend's `auto` kind. No runtime passing parity is a compile error, not a silent pick.
The runtime is measured once per version: a re-compile keeps the recorded runtime.json, so a promoted
version's files (and the digests its signed promotion record names) never change.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from minio.error import S3Error

from serving.artifacts import TamperedArtifact, fetch_verified
from serving.datatypes import ONNX_TO_V2, triton_type
from serving.registry import Registry
from serving.runtimes import DEFAULT_TOLERANCE, REFERENCE_FILE, RUNTIMES, RuntimeChoice, choose_runtime
from serving.tensorrt import build_plan


class CompileError(ValueError):
    """The version cannot be compiled as asked (the API answers 400 with this message)."""



@dataclass
class CompileOptions:
    max_batch_size: int = 4
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [2, 4])
    max_queue_delay_us: int = 2000
    instance_count: int = 1
    gpu: bool = False
    tensorrt_accelerator: bool = False  # ORT's TensorRT execution accelerator on GPU instances
    runtimes: tuple[str, ...] = RUNTIMES  # CPU runtimes to measure
    runtime_threads: int = 1  # threads each candidate gets: what one serving replica uses
    runtime_runs: int = 5  # timed runs per candidate (after one warm-up run that is also the parity run)
    runtime_tolerance: float = DEFAULT_TOLERANCE
    # The backend config.pbtxt names on CPU nodes: onnxruntime, openvino (Triton's OpenVINO backend reads
    # the same model.onnx), or measured (the runtime this version's measurement chose). GPU: onnxruntime.
    triton_cpu_backend: str = "onnxruntime"


@dataclass
class CompileResult:
    task: str
    version: str
    prefix: str
    files: dict[str, str]  # key -> sha256
    tensorrt: str  # "built" or "skipped: <why>"
    config_text: str
    runtime: RuntimeChoice | None = None


TRITON_CPU_BACKENDS = ("onnxruntime", "openvino", "measured")


def triton_backend(options: CompileOptions, measured: str | None) -> str:
    """The Triton backend for the compiled config: onnxruntime or openvino (see CompileOptions)."""
    if options.triton_cpu_backend not in TRITON_CPU_BACKENDS:
        raise CompileError(f"triton backend {options.triton_cpu_backend!r} is not one of {', '.join(TRITON_CPU_BACKENDS)}")
    wanted = measured if options.triton_cpu_backend == "measured" else options.triton_cpu_backend
    if wanted == "openvino" and options.gpu:
        raise CompileError("Triton's OpenVINO backend runs on CPU nodes; a --gpu compile serves with onnxruntime")
    return "openvino" if wanted == "openvino" else "onnxruntime"


def served_versions(registry: Registry, task: str) -> list[str]:
    """The versions serving may need loaded: champion and previous (the rollback target), oldest first."""
    aliases = registry.aliases(task)
    return sorted({aliases[a] for a in ("champion", "previous") if a in aliases}, key=int)


def model_config(task: str, signature: dict, options: CompileOptions, backend: str = "onnxruntime",
                 versions: list[str] | None = None):  # fmt: skip
    from tritonclient.grpc import model_config_pb2 as mc

    if backend == "openvino":  # the OpenVINO backend loads ONNX directly when the file is named
        config = mc.ModelConfig(name=task, backend="openvino", default_model_filename="model.onnx",
                                max_batch_size=options.max_batch_size)  # fmt: skip
    else:
        config = mc.ModelConfig(name=task, platform="onnxruntime_onnx", max_batch_size=options.max_batch_size)
    for kind, target in (("inputs", config.input), ("outputs", config.output)):
        for tensor in signature[kind]:
            entry = target.add()
            entry.name = tensor["name"]
            entry.data_type = mc.DataType.Value(triton_type(ONNX_TO_V2[tensor["datatype"]]))
            entry.dims.extend(int(d) for d in tensor["shape"][1:])  # Triton's dims exclude the batch axis
    config.dynamic_batching.preferred_batch_size.extend(options.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    group = config.instance_group.add()
    group.count = options.instance_count
    group.kind = mc.ModelInstanceGroup.KIND_GPU if options.gpu else mc.ModelInstanceGroup.KIND_CPU
    if versions:  # explicit, so no compile of another version can drop a served one
        config.version_policy.specific.versions.extend(int(v) for v in versions)
    if options.gpu and options.tensorrt_accelerator:
        accel = config.optimization.execution_accelerators.gpu_execution_accelerator.add()
        accel.name = "tensorrt"
        accel.parameters["precision_mode"] = "FP16"
        accel.parameters["max_workspace_size_bytes"] = str(1 << 30)
    return config


def select_runtime(model_dir: Path, options: CompileOptions) -> RuntimeChoice:
    """The fastest CPU runtime whose outputs match the exported reference (see the module docstring)."""
    reference = model_dir / REFERENCE_FILE
    if not reference.exists():  # exported before references were written: nothing to check against
        return RuntimeChoice("onnxruntime", options.runtime_tolerance, options.runtime_threads, [])
    choice = choose_runtime(model_dir / "model.onnx", reference, options.runtimes, options.runtime_threads,
                            options.runtime_runs, options.runtime_tolerance)  # fmt: skip
    if choice.runtime is None:
        reasons = "; ".join(f"{t.runtime}: {t.error}" for t in choice.trials)
        raise CompileError(f"no CPU runtime reproduces the exported reference output ({reasons})")
    return choice


def _measured_before(store, bucket: str, prefix: str, key: str, recorded: str | None) -> bytes | None:
    """A version's runtime.json from an earlier compile, if its bytes are the recorded ones.

    A version's compiled files never change once written: serving loads them against the digests of the
    signed promotion record, so a re-compile that re-measured (timings always differ a little) would
    make the promoted champion unloadable. The runtime is measured once per version."""
    if not recorded:
        return None
    try:
        data = fetch_verified(store, bucket, prefix, key, json.loads(recorded))
        choice = RuntimeChoice.from_json(data.decode())
    except (TamperedArtifact, S3Error, ValueError, KeyError, TypeError):
        return None  # never compiled with a runtime, or not what was recorded: measure again
    return data if choice.runtime in RUNTIMES else None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compile_version(registry: Registry, store, bucket: str, prefix: str, task: str, version: str,
                    options: CompileOptions | None = None) -> CompileResult:  # fmt: skip
    options = options or CompileOptions()
    info = registry.version(task, version)
    model_dir: Path = registry.download(task, version)
    onnx_bytes = (model_dir / "model.onnx").read_bytes()
    runtime_key = f"{task}/{version}/runtime.json"
    kept = _measured_before(store, bucket, prefix, runtime_key, info.tags.get("compiled_sha256"))
    runtime = RuntimeChoice.from_json(kept.decode()) if kept else select_runtime(model_dir, options)
    versions = sorted({*served_versions(registry, task), str(version)}, key=int)
    config = model_config(task, info.signature, options, triton_backend(options, runtime.runtime), versions)
    config_text = text_format.MessageToString(config)
    files = {f"{task}/{version}/model.onnx": onnx_bytes, f"{task}/config.pbtxt": config_text.encode(),
             runtime_key: kept or runtime.to_json().encode()}  # fmt: skip
    plan = build_plan(model_dir / "model.onnx") if options.gpu else None
    tensorrt = "skipped: not a GPU compile (use --gpu on a GPU node)" if plan is None else plan.status
    if plan is not None and plan.data is not None:
        files[f"{task}/{version}/model.plan"] = plan.data
    digests = {key: sha256_bytes(data) for key, data in files.items()}
    files[f"{task}/{version}/sha256.json"] = json.dumps(digests, indent=1).encode()
    for key, data in files.items():
        store.put_object(bucket, f"{prefix}/{key}", io.BytesIO(data), len(data))
    registry.set_tag(task, version, "compiled_sha256", json.dumps(digests))
    registry.set_tag(task, version, "compiled_config", config_text)  # its digest is in compiled_sha256
    registry.set_tag(task, version, "compiled_repository", f"s3://{bucket}/{prefix}")
    registry.set_tag(task, version, "compiled_runtime", runtime.runtime)
    registry.set_tag(task, version, "compiled_runtime_table", "\n".join(runtime.table()))
    return CompileResult(task, version, prefix, digests, tensorrt, config_text, runtime)
