"""Prometheus metrics of the serving deployments.

Every replica is its own process. On one machine (the embedded stack) they share a
PROMETHEUS_MULTIPROC_DIR, set by `oncoserve serve up`, and the gateway's `/metrics` aggregates all of
them; without it (a Kubernetes pod scraped on its own) each process exports its own registry.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set only for the replicas (their runtime_env, services/app.py), never for a whole pod: Ray's own processes
# use prometheus_client too and die when the folder is missing. A replica on a node whose home lacks the
# folder (another pod, another worker node) makes it before the first metric is created.
if os.environ.get(MULTIPROC_ENV):
    os.makedirs(os.environ[MULTIPROC_ENV], exist_ok=True)
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("oncoserve_requests", "API requests by route and HTTP/gRPC status", ["route", "status"])
REQUEST_SECONDS = Histogram("oncoserve_request_seconds", "API request latency by route (gateway, end to end)", ["route"],
                            buckets=STAGE_BUCKETS)  # fmt: skip
STAGE_SECONDS = Histogram("oncoserve_stage_seconds", "Latency of each lifecycle stage",
                          ["task", "stage", "version"], buckets=STAGE_BUCKETS)  # fmt: skip
BATCH_SIZE = Histogram("oncoserve_batch_size", "Requests per model call (dynamic batching)", ["task"],
                       buckets=(1, 2, 3, 4, 6, 8, 16, 32, 64))  # fmt: skip
BACKEND_ERRORS = Counter("oncoserve_backend_errors", "Inference backend failures", ["task", "backend"])
QUEUE_DEPTH = Gauge("oncoserve_queue_depth", "Requests waiting or running in a replica", ["task"], multiprocess_mode="livesum")
MODEL_VERSION = Gauge("oncoserve_model_version_info", "1 for the model version a replica serves", ["task", "version"],
                      multiprocess_mode="livemax")  # fmt: skip
REPORT_GUARD = Counter("oncoserve_report_guard", "Report texts checked by the grounding guard, by generator and outcome",
                       ["generator", "outcome"])  # fmt: skip
REPORT_FORMAT = Counter("oncoserve_report_format", "Report texts by format compliance (required sections, closing statement)",
                        ["generator", "outcome"])  # fmt: skip
SWAPS = Counter("oncoserve_model_swaps", "Hot-swaps to a new champion, by outcome", ["task", "outcome"])
VERSION_MISMATCH = Counter("oncoserve_version_mismatch", "Studies pinned to a version the replica does not hold (a replica "
                           "started mid-swap), answered by its own champion", ["task"])  # fmt: skip
UNTRUSTED_ALIAS = Counter("oncoserve_untrusted_alias", "Champion alias moves refused: no valid signed promotion record for "
                          "that version (counted once per version refused)", ["task"])  # fmt: skip

ROLLOUT_STUDIES = Counter("oncoserve_rollout_studies", "Studies under a shadow or canary policy, by candidate version and outcome "
                          "(shadowed, canary_answered, canary_failed: answered by the champion instead)", ["task", "mode", "candidate", "outcome"])  # fmt: skip
SHADOW_AGREEMENT = Histogram("oncoserve_shadow_agreement", "Candidate-vs-champion agreement per shadowed study (services.agreement)",
                             ["task", "candidate"], buckets=(0.1, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0))  # fmt: skip
UNTRUSTED_ROLLOUT = Counter("oncoserve_untrusted_rollout", "Traffic policies refused: not signed by the platform, for another "
                            "task, or older than the one followed", ["task"])  # fmt: skip

MONITORING_ERRORS = Counter("oncoserve_monitoring_write_errors", "Monitoring records or payloads that could not be written")


def exposition() -> tuple[bytes, str]:
    """The metrics text of every serving process on this machine (or this process alone)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def serving_version(task: str, old: str | None, new: str) -> None:
    if old is not None and old != new:
        MODEL_VERSION.labels(task, old).set(0)
    MODEL_VERSION.labels(task, new).set(1)
