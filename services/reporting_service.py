"""The `reporting` Serve deployment: findings in, grounded report out.

Lifecycle like the model deployments: load the `champion` reporting version (knowledge base + prompt
templates) from the registry — or, when none is registered yet, the knowledge base packaged with the
code, labelled `packaged-<kb version>` — build the retriever and the configured generator, answer
`report(findings)`, and hot-swap when the alias moves. Guard outcomes and format compliance are
Prometheus counters.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ray import serve

from services import metrics
from services.reporting import generators, kb
from services.reporting import model as reporting_model
from services.reporting.compose import Reporter

log = logging.getLogger("ray.serve")
TASK = "reporting"


@dataclass(frozen=True)
class LoadedReporter:
    version: str
    reporter: Reporter


class ReportingService:
    def __init__(self, settings_fields: dict, spec: dict, watch_interval_s: float = 2.0):
        from oncoserve.settings import Settings
        from serving.alias_watch import AliasWatcher
        from serving.registry import Registry

        from oncoserve.object_store import object_store
        from services.trusted_champion import TrustedChampion

        self.spec = spec
        from oncoserve.credentials import use_mlflow_account

        settings = Settings(**settings_fields)
        use_mlflow_account(settings.mlflow_accounts_file, "reader")  # serving only reads the registry
        self._registry = Registry(settings.mlflow_url)
        self._generator = generators.build(spec.get("generator"))  # one per replica, shared across versions
        self._trust = TrustedChampion(settings, TASK, self._registry, object_store(settings))
        record = self._trust.initial()  # UntrustedRecord when an alias exists that the platform never signed
        self.current = self._load(str(record["version"]) if record else None, record)
        self._watcher = AliasWatcher(self._registry, TASK, "champion", self._on_alias_moved, watch_interval_s,
                                     on_same=lambda alias: self._trust.settled(alias, self.current.version))  # fmt: skip
        self._watcher.current = None if self.current.version.startswith("packaged-") else self.current.version
        self._watcher.start()

    def _load(self, version: str | None, record: dict | None = None) -> LoadedReporter:
        t0 = time.perf_counter()
        if version is None:
            knowledge, prompt_version, prompt_dir = kb.load(), generators.PROMPT_VERSION, generators.PROMPT_DIR
            label = f"packaged-{knowledge.version}"
            log.warning("reporting: no champion in the registry; using the packaged knowledge base (%s)", label)
        else:
            model_dir = reporting_model.download_verified(self._registry, version,
                                                          Path(tempfile.mkdtemp(prefix="oncoserve-reporting-")),
                                                          record["artifact_sha256"] if record else None)  # fmt: skip
            knowledge, prompt_version, prompt_dir = reporting_model.load(model_dir)
            label = str(version)
        retriever = None
        if self.spec.get("retrieval", True):
            from services.reporting.retrieval import Retriever

            retriever = Retriever(knowledge)
        reporter = Reporter(knowledge, retriever, self._generator, prompt_version, prompt_dir)
        metrics.STAGE_SECONDS.labels(TASK, "load", label).observe(time.perf_counter() - t0)
        metrics.serving_version(TASK, None, label)
        return LoadedReporter(label, reporter)

    def _on_alias_moved(self, old: str | None, new: str | None) -> None:
        record = None
        if new is not None:
            record = self._trust.admit(new)
            if record is None:  # not signed by the platform: keep serving, look again on the next poll
                self._watcher.current = old
                return
        try:
            loaded = self._load(new, record)
        except Exception as exc:  # keep the serving version; retry on the next poll
            log.error("reporting: cannot load version %s (%s); still serving %s", new, exc, self.current.version)
            metrics.SWAPS.labels(TASK, "failed").inc()
            self._watcher.current = old
            return
        previous, self.current = self.current, loaded
        metrics.serving_version(TASK, previous.version, loaded.version)
        metrics.SWAPS.labels(TASK, "completed").inc()

    async def report(self, findings: dict) -> dict:
        current = self.current
        t0 = time.perf_counter()
        result = await asyncio.to_thread(current.reporter.report, findings)
        metrics.STAGE_SECONDS.labels(TASK, "total", current.version).observe(time.perf_counter() - t0)
        guard = result.data["guard"]
        outcome = "passed" if guard["passed"] else ("error" if any(p.startswith("generator failed") for p in guard["problems"]) else "rejected")
        metrics.REPORT_GUARD.labels(guard["checked"], outcome).inc()
        metrics.REPORT_FORMAT.labels(guard["checked"], "compliant" if guard["format_ok"] else "noncompliant").inc()
        return {"version": current.version, "report": result.data, "markdown": result.markdown, "fhir": result.fhir}

    def describe(self) -> dict:
        return {"task": TASK, "version": self.current.version, "backend": _generator_name(self._generator), "ready": True,
                "untrusted_alias": self._trust.refused, "inputs": [], "outputs": []}  # fmt: skip

    def __del__(self):
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher.stop()


def _generator_name(generator) -> str:
    return "template" if generator is None else generator.name


def reporting_deployment(options: dict):
    return serve.deployment(ReportingService, name=TASK).options(**options)
