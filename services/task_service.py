"""One Ray Serve deployment per task (localization, segmentation, classification, survival).

Every task deployment has the same lifecycle, in this order:
  load         the task's `champion` version from the registry (compiled, sha256-verified ONNX) into the
               configured inference backend; again in the background whenever the alias moves (hot-swap),
               but only when the platform's signed promotion record names that version
               (services.trusted_champion: an alias moved any other way is refused and counted)
  preprocess   the model inputs from the study the gateway prepared once (services.task_logic.feeds)
  infer        through the backend, requests already waiting share a model call (services.batcher: a
               lone request never waits for a batch to fill, and calls stop being shared when the
               measured cost per row shows sharing does not pay); a segmentation
               patch network as a sliding window over the study (imaging.sliding_window), its windows
               batched per model call
  postprocess  outputs -> this task's findings section, back on the input's grid
Each stage is timed into `oncoserve_stage_seconds{task, stage, version}`.

Hot-swap: a background thread polls the alias; a new version is loaded beside the old one and then
swapped in with one reference assignment. A batch takes the model reference once when it starts, so
in-flight requests finish on the version they began with and no request sees a half-loaded model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray import serve

from imaging import sliding_window
from serving.backends import BackendUnavailable, InferenceBackend, build_backend
from serving.runtimes import RUNTIMES
from services import metrics
from services.batcher import AdaptiveBatcher, batch_limit
from services.task_logic import TASKS, ServingError, feeds, infer, postprocess

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class LoadedModel:
    version: str
    backend: InferenceBackend
    extras: dict


class TaskService:
    """The body of a task deployment (wrapped by `serve.deployment` in `task_deployment`)."""

    def __init__(self, task: str, settings_fields: dict, spec: dict, watch_interval_s: float = 2.0):
        from oncoserve.object_store import object_store
        from oncoserve.settings import Settings
        from serving.alias_watch import AliasWatcher
        from serving.registry import Registry

        if task not in TASKS:
            raise ServingError(f"unknown task {task!r}")
        self.task, self.spec = task, spec
        self._window = spec.get("sliding_window") or {}  # segmentation: overlap, mirror, batch
        from oncoserve.credentials import use_mlflow_account

        settings = Settings(**settings_fields)
        use_mlflow_account(settings.mlflow_accounts_file, "reader")  # serving only reads the registry
        self._registry, self._store = Registry(settings.mlflow_url), object_store(settings)
        self._bucket, self._prefix = settings.bucket_models, settings.triton_repo_prefix
        self._cache = Path(tempfile.mkdtemp(prefix=f"oncoserve-{task}-"))
        from oncoserve.signing import UntrustedRecord
        from services.trusted_champion import TrustedChampion

        self._trust = TrustedChampion(settings, task, self._registry, self._store)
        try:
            record = self._trust.initial()
        except UntrustedRecord as exc:
            raise ServingError(f"{task}: {exc}") from None
        if record is None:
            raise ServingError(f"{task} has no `champion` version; promote one (oncoserve models promote)")
        self.model = self._load(str(record["version"]), record)
        metrics.serving_version(task, None, self.model.version)
        batching = spec.get("batching", {})
        self._batch_configured = batching.get("max_batch_size", 4)
        self._batcher = AdaptiveBatcher(self._run_batch, self._batch_size_for(self.model),
                                        batching.get("batch_wait_timeout_s", 0.01),
                                        on_batch=metrics.BATCH_SIZE.labels(task).observe,
                                        shared_errors=(BackendUnavailable,))  # fmt: skip
        self._swap_lock = threading.Lock()
        self._input_names: dict[str, frozenset[str]] = {}
        self._watcher = AliasWatcher(self._registry, task, "champion", self._on_alias_moved, watch_interval_s,
                                     on_same=lambda alias: self._trust.settled(alias, self.model.version))  # fmt: skip
        self._watcher.current = self.model.version
        self._watcher.start()

    # -- load -------------------------------------------------------------------------------------
    def _load(self, version: str, record: dict) -> LoadedModel:
        """Load `version` with the digests its signed promotion record names (not the registry's tag)."""
        t0 = time.perf_counter()
        backend_spec = self.spec.get("backend", {})
        backend = build_backend(backend_spec.get("kind", "auto"), self._registry, self._store, self._bucket,
                                self._prefix, self.task, version, threads=backend_spec.get("threads", 1),
                                triton_url=backend_spec.get("triton_url"),
                                fallback_to_embedded=backend_spec.get("fallback_to_embedded", False),
                                timeout_s=backend_spec.get("timeout_s", 60.0), cache_dir=self._cache,
                                expected=record["artifact_sha256"])  # fmt: skip
        extras = json.loads(self._registry.artifact_text(self.task, version, "extras.json") or "{}")
        metrics.STAGE_SECONDS.labels(self.task, "load", str(version)).observe(time.perf_counter() - t0)
        return LoadedModel(str(version), backend, extras)

    def _batch_size_for(self, model: LoadedModel) -> int:
        size = batch_limit(self._batch_configured, model.backend.max_batch_size)
        if size < self._batch_configured:
            log.warning("%s: batches of at most %d (version %s's backend accepts no more; configured %d)",
                        self.task, size, model.version, self._batch_configured)  # fmt: skip
        return size

    def _on_alias_moved(self, old: str | None, new: str | None) -> None:
        """Runs in the watcher thread: load beside the serving model, then swap the reference."""
        if new is None:
            log.warning("%s: the champion alias was removed; still serving version %s", self.task, self.model.version)
            return
        record = self._trust.admit(new)
        if record is None:  # not signed by the platform: keep serving, look again on the next poll
            self._watcher.current = old
            return
        with self._swap_lock:
            try:
                loaded = self._load(new, record)
            except Exception as exc:  # keep serving the old version; retry on the next poll
                log.error("%s: cannot load version %s (%s); still serving %s", self.task, new, exc, self.model.version)
                metrics.SWAPS.labels(self.task, "failed").inc()
                self._watcher.current = old
                return
            self._batcher.max_batch_size = self._batch_size_for(loaded)
            self._batcher.reset_costs()  # whether sharing a call pays is measured again on the new version
            previous, self.model = self.model, loaded
            metrics.serving_version(self.task, previous.version, loaded.version)
            metrics.SWAPS.labels(self.task, "completed").inc()
            log.info("%s: now serving version %s (was %s)", self.task, loaded.version, previous.version)

    # -- infer (batched) --------------------------------------------------------------------------
    def _run_batch(self, stacked: dict[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
        """One model call (in a worker thread) for the batcher: the version it ran on, and the outputs."""
        model = self.model  # one version for the whole batch, even if a swap lands meanwhile
        t0 = time.perf_counter()
        try:
            out = model.backend.infer(stacked)
        except BackendUnavailable:
            metrics.BACKEND_ERRORS.labels(self.task, model.backend.name).inc()
            raise
        metrics.STAGE_SECONDS.labels(self.task, "infer", model.version).observe(time.perf_counter() - t0)
        return model.version, out

    # -- the methods the gateway calls ------------------------------------------------------------
    async def predict(self, prepared, age: float | None) -> dict:
        """preprocess -> infer -> postprocess for one prepared study; returns its findings section."""
        metrics.QUEUE_DEPTH.labels(self.task).inc()
        try:
            t0 = time.perf_counter()
            inputs = feeds(self.task, prepared, age)
            model = self.model
            if self._windowed(model):
                # A patch network: its windows are the batch (one study's windows per model call).
                version = model.version
                outputs = await asyncio.to_thread(infer, self.task, model.backend.infer, inputs, model.extras, self._window)
                metrics.STAGE_SECONDS.labels(self.task, "infer", version).observe(time.perf_counter() - t0)
            else:
                version, outputs = await self._batcher.submit(inputs)
            t1 = time.perf_counter()
            extras = self.model.extras if self.model.version == version else self._extras_of(version)
            result = await asyncio.to_thread(postprocess, self.task, outputs, prepared, extras)
            t2 = time.perf_counter()
        finally:
            metrics.QUEUE_DEPTH.labels(self.task).dec()
        metrics.STAGE_SECONDS.labels(self.task, "postprocess", version).observe(t2 - t1)
        metrics.STAGE_SECONDS.labels(self.task, "total", version).observe(t2 - t0)
        return {**result, "version": version}

    def _windowed(self, model: LoadedModel) -> bool:
        return self.task == "segmentation" and sliding_window.WindowSpec.of_version(model.extras) is not None

    async def infer_raw(self, inputs: dict[str, np.ndarray]) -> dict:
        """Raw model inference (Open Inference Protocol v2): tensors in, tensors out."""
        model = self.model
        expected = self._input_names.get(model.version)
        if expected is None:  # once per version: metadata() is a network call on the Triton backend
            expected = self._input_names[model.version] = frozenset(t["name"] for t in model.backend.metadata()["inputs"])
        if set(inputs) != expected:
            raise ValueError(f"model {self.task} takes inputs {sorted(expected)}, got {sorted(inputs)}")
        metrics.QUEUE_DEPTH.labels(self.task).inc()
        try:
            version, outputs = await self._batcher.submit(inputs)
        finally:
            metrics.QUEUE_DEPTH.labels(self.task).dec()
        return {"version": version, "outputs": outputs}

    def describe(self) -> dict:
        model = self.model
        return {"task": self.task, "version": model.version, "backend": model.backend.name,
                "ready": model.backend.ready(), "untrusted_alias": self._trust.refused, **model.backend.metadata()}  # fmt: skip

    def _extras_of(self, version: str) -> dict:
        return json.loads(self._registry.artifact_text(self.task, version, "extras.json") or "{}")

    def check_health(self) -> None:
        """Serve's health probe: a replica whose backend cannot answer is replaced."""
        if self.model.backend.name in RUNTIMES and not self.model.backend.ready():
            raise ServingError(f"{self.task}: model not ready")

    def __del__(self):
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher.stop()


def task_deployment(task: str, options: dict):
    """The Serve deployment named after the task, with its autoscaling/resources from the config."""
    return serve.deployment(TaskService, name=task).options(**options)
