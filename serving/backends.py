"""Inference backends: one interface, several implementations, chosen by configuration.

- EmbeddedBackend: the model in this process on a CPU runtime (onnxruntime or OpenVINO; `auto` takes the
  one `oncoserve compile` measured fastest for the version).
- TritonBackend: a Triton (or any Open Inference Protocol v2) server over tritonclient gRPC,
  model names and versions from the compiled repository.
- FallbackBackend: the primary, and the embedded backend when the primary is down (a config switch).
A backend that cannot answer raises BackendUnavailable naming itself (the API turns it into a 503).
Built once per replica (`from_version`), then `infer` is called many times.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np

from serving.datatypes import NP_TO_V2
from serving.runtimes import RUNTIMES, describe_onnx, open_session


class BackendUnavailable(RuntimeError):
    """The backend cannot serve right now (server down, model not ready)."""

    def __init__(self, backend: str, reason: str):
        super().__init__(f"inference backend {backend} unavailable: {reason}")
        self.backend, self.reason = backend, reason

    def __reduce__(self):  # crosses process boundaries (Ray Serve replicas -> gateway)
        return type(self), (self.backend, self.reason)


class InferenceBackend(Protocol):
    name: str
    task: str
    version: str

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def ready(self) -> bool: ...

    def metadata(self) -> dict: ...

    @property
    def max_batch_size(self) -> int | None: ...  # rows per call the backend accepts (None: no limit)


class EmbeddedBackend:
    """The model in this process, on a CPU runtime: onnxruntime or OpenVINO (serving/runtimes.py).

    `from_version(..., runtime="auto")` serves with the runtime `oncoserve compile` measured fastest
    for that version (its verified runtime.json); naming a runtime overrides the measurement."""

    def __init__(self, model_path: Path, task: str, version: str, threads: int = 1, runtime: str = "onnxruntime"):
        self.session = open_session(runtime, model_path, threads)
        self.name = runtime
        self.task, self.version = task, str(version)
        self._metadata = describe_onnx(model_path)

    @classmethod
    def from_version(cls, registry, store, bucket: str, prefix: str, task: str, version: str,
                     cache_dir: Path | None = None, threads: int = 1,
                     expected: dict[str, str] | None = None, runtime: str = "auto") -> "EmbeddedBackend":  # fmt: skip
        """Load the compiled, sha256-verified model.onnx of a registry version (`expected`: signed digests)."""
        from serving.artifacts import compiled_runtime, load_compiled_onnx

        cache_dir = cache_dir or Path(tempfile.mkdtemp(prefix="oncoserve-models-"))
        path = load_compiled_onnx(registry, store, bucket, prefix, task, version, cache_dir / task / str(version) / "model.onnx",
                                  expected)
        if runtime == "auto":
            runtime = compiled_runtime(registry, store, bucket, prefix, task, version, expected)
        return cls(path, task, version, threads, runtime)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session.run(inputs)

    def ready(self) -> bool:
        return True

    def metadata(self) -> dict:
        """Tensor names, OIP v2 datatypes and shapes (-1 for dynamic axes)."""
        return self._metadata

    @property
    def max_batch_size(self) -> int | None:
        """Rows one call may carry: None for a dynamic batch axis, else the graph's fixed batch size."""
        fixed = [t["shape"][0] for t in self._metadata["inputs"] if t["shape"] and t["shape"][0] > 0]
        return min(fixed) if fixed else None


OnnxRuntimeBackend = EmbeddedBackend  # the round-1 name, kept for scripts that import it


class TritonBackend:
    """Triton (or another OIP v2 server) over gRPC with binary tensors."""

    name = "triton"

    def __init__(self, url: str, task: str, version: str, timeout_s: float = 60.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.url, self.task, self.version, self.timeout_s = url, task, str(version), timeout_s
        # A whole preprocessed study (4 x 96 x 112 x 96 float32) is 16.5 MB, beyond gRPC's 4 MB default.
        limit = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self.client = grpcclient.InferenceServerClient(url=url, channel_args=limit)

    def _unavailable(self, exc: Exception) -> BackendUnavailable:
        message = getattr(exc, "message", lambda: str(exc))()
        return BackendUnavailable(f"triton at {self.url}", str(message)[:300])

    def ready(self) -> bool:
        try:
            return bool(self.client.is_model_ready(self.task, self.version, client_timeout=5))
        except Exception:
            return False

    def metadata(self) -> dict:
        from tritonclient.utils import InferenceServerException

        try:
            meta = self.client.get_model_metadata(self.task, self.version, as_json=True, client_timeout=10)
        except InferenceServerException as exc:
            raise self._unavailable(exc) from None
        return {key: [{"name": t["name"], "datatype": t["datatype"], "shape": [int(d) for d in t["shape"]]}
                      for t in meta.get(key, [])] for key in ("inputs", "outputs")}  # fmt: skip

    @property
    def max_batch_size(self) -> int | None:
        """The served model config's max_batch_size (0 there: no batch axis, one request per call);
        None when the server does not say (a plain OIP v2 server has no model config)."""
        if not hasattr(self, "_max_batch"):
            try:
                config = self.client.get_model_config(self.task, self.version, as_json=True, client_timeout=10)
                self._max_batch = max(1, int(config.get("config", config).get("max_batch_size", 0)))
            except Exception:  # noqa: BLE001 - unknown is not a failure: the replica's own limit applies
                return None
        return self._max_batch

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tritonclient.utils import InferenceServerException

        requests = []
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            item = self._grpc.InferInput(name, list(array.shape), NP_TO_V2[array.dtype])
            item.set_data_from_numpy(array)
            requests.append(item)
        try:
            result = self.client.infer(self.task, requests, model_version=self.version, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise self._unavailable(exc) from None
        response = result.get_response()
        return {out.name: result.as_numpy(out.name) for out in response.outputs}


class FallbackBackend:
    """Serve from `primary`; when it is unavailable, answer from `fallback` and count it."""

    def __init__(self, primary: InferenceBackend, fallback: InferenceBackend):
        self.primary, self.fallback = primary, fallback
        self.task, self.version = primary.task, primary.version
        self.name = f"{primary.name}+fallback:{fallback.name}"
        self.fallbacks = 0

    def ready(self) -> bool:
        return self.primary.ready() or self.fallback.ready()

    def metadata(self) -> dict:
        try:
            return self.primary.metadata()
        except BackendUnavailable:
            return self.fallback.metadata()

    @property
    def max_batch_size(self) -> int | None:
        limits = [b.max_batch_size for b in (self.primary, self.fallback) if b.max_batch_size is not None]
        return min(limits) if limits else None

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self.primary.infer(inputs)
        except BackendUnavailable:
            self.fallbacks += 1
            return self.fallback.infer(inputs)


def build_backend(kind: str, registry, store, bucket: str, prefix: str, task: str, version: str, *,
                  threads: int = 1, triton_url: str | None = None, fallback_to_embedded: bool = False,
                  timeout_s: float = 60.0, cache_dir: Path | None = None,
                  expected: dict[str, str] | None = None) -> InferenceBackend:  # fmt: skip
    """The backend a deployment config asks for, serving one registry version of a task.

    kind: auto (embedded, the runtime measured at compile), onnxruntime, openvino (embedded, that runtime),
    or triton (a Triton server; `fallback_to_embedded` adds the `auto` embedded backend behind it)."""
    if kind == "auto" or kind in RUNTIMES:
        return EmbeddedBackend.from_version(registry, store, bucket, prefix, task, version, cache_dir, threads, expected, kind)
    if kind != "triton":
        raise ValueError(f"unknown inference backend {kind!r} (auto, {', '.join(RUNTIMES)} or triton)")
    if not triton_url:
        raise ValueError("the triton backend needs a URL (host:port of Triton's gRPC endpoint)")
    triton = TritonBackend(triton_url, task, version, timeout_s)
    if not fallback_to_embedded:
        return triton
    embedded = EmbeddedBackend.from_version(registry, store, bucket, prefix, task, version, cache_dir, threads, expected)
    return FallbackBackend(triton, embedded)
