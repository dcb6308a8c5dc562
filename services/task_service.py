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

Rollouts (services.rollout_follower): the replica also follows its task's signed traffic policy; a
shadow or canary candidate is loaded beside the champion, and `predict` routes each study by its
place in the policy (serving.traffic), recording the evidence in the rollout ledger.

Hot-swap: a background thread polls the alias; a new version is loaded beside the old one, and the
version barrier (services.version_barrier) makes it the active one on every replica of the task at
once, only when all of them hold it. Each study arrives pinned to the task's active version
(`route["champion"]`, from the gateway) and is answered by exactly that version; a batch runs on one
version, so in-flight requests finish on the version they began with and no request sees a
half-loaded model. The previous version stays loaded (a rollback or a late study needs no load).
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
from services.version_barrier import BarrierMember, rollout_slot

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
        self._models = {self.model.version: self.model}  # every version held: the active one, the wanted, the previous
        self._wants, self._previous = self.model.version, None
        metrics.serving_version(task, None, self.model.version)
        batching = spec.get("batching", {})
        self._batch_configured = batching.get("max_batch_size", 4)
        self._batcher = AdaptiveBatcher(self._run_batch, self._batch_size_for(self.model),
                                        batching.get("batch_wait_timeout_s", 0.01),
                                        on_batch=metrics.BATCH_SIZE.labels(task).observe,
                                        shared_errors=(BackendUnavailable,))  # fmt: skip
        self._swap_lock = threading.RLock()
        self._input_names: dict[str, frozenset[str]] = {}
        self._rollout = None
        app = serve.get_replica_context().app_name
        self._barrier = BarrierMember(app, watch_interval_s, self._held, self._on_active)
        self._barrier.report()
        self._barrier.start()
        self._watcher = AliasWatcher(self._registry, task, "champion", self._on_alias_moved, watch_interval_s,
                                     on_same=lambda alias: self._trust.settled(alias, self.model.version))  # fmt: skip
        self._watcher.current = self.model.version
        self._watcher.start()
        from oncoserve.signing import Verifier
        from services.rollout_follower import RolloutFollower

        self._background: set[asyncio.Task] = set()
        self._rollout = RolloutFollower(task, self._store, self._bucket, Verifier.from_file(settings.signing_public_key_file),
                                        self._load, on_ready=self._reported)  # fmt: skip
        self._rollout.start(lambda: self.model.version, watch_interval_s)

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
            loaded = self._models.get(str(new))
            if loaded is None:
                try:
                    loaded = self._load(new, record)
                except Exception as exc:  # keep serving the old version; retry on the next poll
                    log.error("%s: cannot load version %s (%s); still serving %s", self.task, new, exc, self.model.version)
                    metrics.SWAPS.labels(self.task, "failed").inc()
                    self._watcher.current = old
                    return
                self._models[loaded.version] = loaded
            self._wants = loaded.version
        if not self._reported():
            self._activate(loaded.version)  # no barrier to agree with: this replica swaps on its own

    def _reported(self) -> bool:
        """Tell the barrier what this replica holds now; False when no barrier answered."""
        return self._barrier.report() is not None

    def _held(self) -> dict[str, tuple[list[str], str]]:
        """What the barrier is told, per slot: the values held ready, and the one this replica wants active."""
        with self._swap_lock:
            states = {self.task: (list(self._models), self._wants)}
        if self._rollout is not None:
            states[rollout_slot(self.task)] = self._rollout.held()
        return states

    def _on_active(self, slot: str, value: str) -> None:
        if slot == self.task:
            self._activate(value)
        elif slot == rollout_slot(self.task) and self._rollout is not None:
            self._rollout.activate(int(value))

    def _activate(self, version: str) -> None:
        """Make `version` (held) the default for unpinned calls and batches; the barrier decided it."""
        with self._swap_lock:
            loaded = self._models.get(version)
            if loaded is None or loaded is self.model:
                return
            self._batcher.max_batch_size = self._batch_size_for(loaded)
            self._batcher.reset_costs()  # whether sharing a call pays is measured again on the new version
            previous, self.model, self._previous = self.model, loaded, self.model.version
            for held in [v for v in self._models if v not in (loaded.version, self._wants, self._previous)]:
                del self._models[held]
            metrics.serving_version(self.task, previous.version, loaded.version)
            metrics.SWAPS.labels(self.task, "completed").inc()
            log.info("%s: now serving version %s (was %s)", self.task, loaded.version, previous.version)

    def _pinned(self, route: dict | None) -> LoadedModel:
        """The version the gateway pinned this study to (the barrier's active one), held by this replica."""
        version = (route or {}).get("champion")
        model = self.model
        if version is None or str(version) == model.version:
            return model
        held = self._models.get(str(version))
        if held is None:  # a replica started mid-swap holds only the new champion (services.version_barrier)
            metrics.VERSION_MISMATCH.labels(self.task).inc()
            return model
        return held

    # -- infer (batched) --------------------------------------------------------------------------
    def _run_batch(self, stacked: dict[str, np.ndarray], model: LoadedModel | None = None) -> tuple[str, dict[str, np.ndarray]]:
        """One model call (in a worker thread) for the batcher: the version it ran on, and the outputs."""
        model = model or self.model  # one version for the whole batch, even if a swap lands meanwhile
        t0 = time.perf_counter()
        try:
            out = model.backend.infer(stacked)
        except BackendUnavailable:
            metrics.BACKEND_ERRORS.labels(self.task, model.backend.name).inc()
            raise
        metrics.STAGE_SECONDS.labels(self.task, "infer", model.version).observe(time.perf_counter() - t0)
        return model.version, out

    # -- the methods the gateway calls ------------------------------------------------------------
    async def predict(self, prepared, age: float | None, route: dict | None = None) -> dict:
        """preprocess -> infer -> postprocess for one prepared study; returns its findings section.

        `route` (from the gateway): {"fraction", "case_ref", "site"}, where the study falls in the task's
        traffic policy (serving.traffic). A canary study is answered by the candidate (by the champion
        if the candidate fails, which is recorded); a shadowed study is answered by the champion and
        analysed by the candidate afterwards, off the response's path."""
        metrics.QUEUE_DEPTH.labels(self.task).inc()
        try:
            inputs = feeds(self.task, prepared, age)
            policy, candidate = self._rollout.pair_for((route or {}).get("rollout"))  # one pair for the whole study
            fraction = (route or {}).get("fraction")
            if candidate is not None and policy.candidate_answers(fraction):
                answered = await self._canary(policy, candidate, inputs, prepared, route)
                if answered is not None:
                    return answered
            t0 = time.perf_counter()
            result = await self._answer(self._pinned(route), inputs, prepared, batched=True)
            if candidate is not None and policy.shadows(fraction):
                champion_ms = (time.perf_counter() - t0) * 1000
                self._in_background(self._shadow(policy, candidate, inputs, prepared, result, champion_ms, route))
            return result
        finally:
            metrics.QUEUE_DEPTH.labels(self.task).dec()

    async def _answer(self, model: LoadedModel, inputs: dict, prepared, batched: bool) -> dict:
        t0 = time.perf_counter()
        if self._windowed(model):
            # A patch network: its windows are the batch (one study's windows per model call).
            version = model.version
            outputs = await asyncio.to_thread(infer, self.task, model.backend.infer, inputs, model.extras, self._window)
            metrics.STAGE_SECONDS.labels(self.task, "infer", version).observe(time.perf_counter() - t0)
        elif batched:
            version, outputs = await self._batcher.submit(inputs, on=model)
        else:  # a candidate: its own model call, outside the champion's batches
            version = model.version
            outputs = await asyncio.to_thread(model.backend.infer, inputs)
            metrics.STAGE_SECONDS.labels(self.task, "infer", version).observe(time.perf_counter() - t0)
        t1 = time.perf_counter()
        result = await asyncio.to_thread(postprocess, self.task, outputs, prepared, model.extras)
        t2 = time.perf_counter()
        metrics.STAGE_SECONDS.labels(self.task, "postprocess", version).observe(t2 - t1)
        metrics.STAGE_SECONDS.labels(self.task, "total", version).observe(t2 - t0)
        return {**result, "version": version}

    async def _canary(self, policy, candidate: LoadedModel, inputs: dict, prepared, route: dict) -> dict | None:
        """The candidate's answer, or None (the champion answers) when it fails; both recorded."""
        t0 = time.perf_counter()
        try:
            result = await self._answer(candidate, inputs, prepared, batched=False)
        except Exception as exc:
            log.error("%s: canary v%s failed on a study (%s: %s); the champion answers it", self.task, candidate.version,
                      type(exc).__name__, str(exc)[:200])  # fmt: skip
            metrics.ROLLOUT_STUDIES.labels(self.task, "canary", candidate.version, "canary_failed").inc()
            self._in_background(self._evidence(policy, route, {"answered_by": "champion", "candidate_ms": None,
                                                               "error": f"{type(exc).__name__}: {str(exc)[:300]}"}))  # fmt: skip
            return None
        metrics.ROLLOUT_STUDIES.labels(self.task, "canary", candidate.version, "canary_answered").inc()
        self._in_background(self._evidence(policy, route, {"answered_by": "candidate", "error": None,
                                                           "candidate_ms": round((time.perf_counter() - t0) * 1000, 1)}))  # fmt: skip
        return {**result, "rollout": {"mode": "canary", "policy_seq": policy.seq}}

    def _in_background(self, coroutine) -> None:
        """Evidence and shadow runs go on after the answer; a strong reference keeps each until it is done."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shadow(self, policy, candidate: LoadedModel, inputs: dict, prepared, champion: dict, champion_ms: float,
                      route: dict) -> None:  # fmt: skip
        """The candidate on a study the champion answered; only the comparison is kept."""
        from services.agreement import agreement

        t0 = time.perf_counter()
        entry = {"answered_by": "champion", "champion_ms": round(champion_ms, 1)}
        try:
            result = await self._answer(candidate, inputs, prepared, batched=False)
            entry |= {"candidate_ms": round((time.perf_counter() - t0) * 1000, 1), "error": None,
                      "agreement": await asyncio.to_thread(agreement, self.task, champion, result)}  # fmt: skip
            metrics.SHADOW_AGREEMENT.labels(self.task, candidate.version).observe(entry["agreement"]["agreement"])
        except Exception as exc:
            entry |= {"candidate_ms": None, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        metrics.ROLLOUT_STUDIES.labels(self.task, "shadow", candidate.version, "shadowed" if not entry["error"] else "shadow_failed").inc()
        await self._evidence(policy, route, entry, champion_version=champion["version"])

    async def _evidence(self, policy, route: dict, entry: dict, champion_version: str | None = None) -> None:
        from serving.rollout_ledger import record_evidence

        entry = {"time": time.time(), "case_ref": route.get("case_ref"), "site": route.get("site"), "mode": policy.mode,
                 "champion": champion_version or self.model.version, "candidate": policy.version, **entry}  # fmt: skip
        try:
            await asyncio.to_thread(record_evidence, self._store, self._bucket, self.task, policy.seq, entry)
        except Exception as exc:  # the study was answered; only its evidence is lost, and that is said
            log.error("%s: could not record rollout evidence (%s: %s)", self.task, type(exc).__name__, str(exc)[:200])

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
                "ready": model.backend.ready(), "untrusted_alias": self._trust.refused, "rollout": self._rollout.describe(),
                "held_versions": sorted(list(self._models), key=int), "wants": self._wants,
                **model.backend.metadata()}  # fmt: skip

    def check_health(self) -> None:
        """Serve's health probe: a replica whose backend cannot answer is replaced."""
        if self.model.backend.name in RUNTIMES and not self.model.backend.ready():
            raise ServingError(f"{self.task}: model not ready")

    def __del__(self):
        for follower in (getattr(self, "_watcher", None), getattr(self, "_rollout", None), getattr(self, "_barrier", None)):
            if follower is not None:
                follower.stop()


def task_deployment(task: str, options: dict):
    """The Serve deployment named after the task, with its autoscaling/resources from the config."""
    return serve.deployment(TaskService, name=task).options(**options)
