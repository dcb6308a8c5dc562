"""Drift monitoring, platform side: each site's recent studies against the champion's training reference.

`report(task)` reads the monitoring records of the window (serving.monitoring_store), takes the input
reference the task's signed champion recorded at training (extras.json `input_reference`) and tests
every site (serving.drift: two-sample KS per input statistic; a site drifts when half of them do).
Each report sets `oncoserve_input_drift_score{task,site}` and `oncoserve_input_drifted{task,site}` on
the platform API's `/metrics` (the chart's Grafana dashboard plots them); the platform's beat runs it
for every task once a minute, and deletes stored payloads past their retention.
"""

from __future__ import annotations

import json
import time

from prometheus_client import CollectorRegistry, Gauge

from serving import monitoring_store
from serving.drift import ALPHA, MIN_STUDIES, SHARE_THRESHOLD, drift_by_site

REGISTRY = CollectorRegistry()
DRIFT_SCORE = Gauge("oncoserve_input_drift_score", "Share of input statistics whose KS test against the champion's "
                    "training reference rejects (p < 0.05), per site", ["task", "site"], registry=REGISTRY)  # fmt: skip
DRIFTED = Gauge("oncoserve_input_drifted", "1 when the site's drift score reaches the threshold with enough studies",
                ["task", "site"], registry=REGISTRY)  # fmt: skip
BEAT_DAYS = 7.0  # the window the periodic pass (and the gauges) cover
OUTPUT_DRIFT_SCORE = Gauge("oncoserve_output_drift_score", "Share of the champion's answer statistics (volumes, probabilities, "
                           "risk) whose KS test against its answers on its held-out test cases rejects, per site",
                           ["task", "site"], registry=REGISTRY)  # fmt: skip
STUDIES = Gauge("oncoserve_monitored_studies", "Studies in the drift window, per site", ["task", "site"], registry=REGISTRY)


class DriftMonitor:
    def __init__(self, registry, promoter, store, bucket: str, retention_days: float):
        self.registry, self.promoter, self.store, self.bucket = registry, promoter, store, bucket
        self.retention_days = retention_days
        self._records: dict[str, dict] = {}  # the beat's records already read (serving.monitoring_store.records)

    def reference(self, task: str) -> tuple[str, dict, dict | None]:
        """The champion, its input reference, and its output reference (its answers on its held-out test
        cases; None for a version trained before output monitoring)."""
        champion = self.promoter.signed_champion(task)
        if champion is None:
            raise ValueError(f"{task} has no champion: no training reference to compare studies with")
        extras = json.loads(self.registry.artifact_text(task, champion, "extras.json") or "{}")
        reference = extras.get("input_reference")
        if not reference:
            raise ValueError(f"{task} v{champion} recorded no input reference at training (trained before drift "
                             "monitoring); retrain to monitor its inputs")  # fmt: skip
        return champion, reference, extras.get("output_reference") or None

    def report(self, task: str, days: float = 7.0, records: list[dict] | None = None) -> dict:
        """`records`: the window's monitoring records when the caller has read them already."""
        champion, reference, outputs = self.reference(task)
        if records is None:
            records = monitoring_store.records(self.store, self.bucket, days)
        sites = drift_by_site(reference, records, outputs)
        for site, result in sites.items():
            if "output_drift" in result:
                OUTPUT_DRIFT_SCORE.labels(task, site).set(result["output_drift"]["score"])
            DRIFT_SCORE.labels(task, site).set(result["score"])
            DRIFTED.labels(task, site).set(float(result["drifted"]))
            STUDIES.labels(task, site).set(result["studies"])
        return {"task": task, "champion": champion, "days": days, "time": time.time(),
                "test": f"two-sample Kolmogorov-Smirnov per input statistic against the champion's training reference "
                        f"(n = {reference.get('n_cases')}); a feature drifts at p < {ALPHA}; a site drifts when at least "
                        f"{SHARE_THRESHOLD:.0%} of its features do, over at least {MIN_STUDIES} studies"
                        + ("; the answers (output_drift) the same way against the champion's answers on its held-out test cases" if outputs else ""),
                "reference": {"source": reference.get("source"), "n_cases": reference.get("n_cases")},
                "output_reference": {"source": outputs.get("source"), "n_cases": outputs.get("n_cases")} if outputs else None,
                "sites": sites}  # fmt: skip

    def beat(self, tasks) -> None:
        """The platform's periodic pass: every task's report (gauges), old payloads deleted."""
        records = monitoring_store.records(self.store, self.bucket, BEAT_DAYS, cache=self._records)  # once for every task
        for task in tasks:
            try:
                self.report(task, BEAT_DAYS, records)
            except ValueError:
                continue  # no champion or no reference: nothing to monitor against
        monitoring_store.prune_payloads(self.store, self.bucket, self.retention_days)
