"""A short, bounded load test against the served gateway on loopback (the 10-minute soak is `make bench`).

Named to run after test_serving.py: its concurrent load adds a segmentation replica, which the
autoscaling test there must start without.

Concurrent whole-study analyses: every request must succeed and the serving processes' memory must
level off after warm-up (onnxruntime grows its arena once per new batch shape, and the allocator in
steps). Latency percentiles and memory per round are written to test-artifacts/load.json, not asserted.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from services.app import MALLOC_ENV
from tests.helpers import study_files

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# After the warm-up, rounds of requests run until one leaves the serving processes' total memory within
# ROUND_GROWTH_MB (at most MAX_ROUNDS). Allocator and onnxruntime arena growth comes in steps that stop
# (the 10-minute soak in `make bench` shows the plateau); a leak of a few MB per request grows every round
# and fails. CI runs with one 36-request round saw +207 and +246 MB, in different replicas each time.
CONCURRENCY, WARMUP, ROUND, MAX_ROUNDS = 3, 24, 24, 4
ROUND_GROWTH_MB = 60  # a leak of 2.5 MB per request (less than one study's four volumes) exceeds it


def serve_rss_mb() -> dict[str, float]:
    """Resident memory (MB) of each Serve replica and proxy process on this machine."""
    out: dict[str, float] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "ServeReplica" in cmd or "ProxyActor" in cmd:
            out[f"{cmd.split()[0]}:{proc.info['pid']}"] = proc.info["memory_info"].rss / 2**20
    return out


async def run_load(url: str, cases: list[Path], n: int, concurrency: int, auth: dict) -> tuple[list[float], list[int]]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    latencies, statuses = [], []
    files = [study_files(c) for c in cases]

    async def client(http: httpx.AsyncClient) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            r = await http.post(f"{url}/v1/studies:analyze", headers=auth, files=files[i % len(files)], timeout=300)
            latencies.append(time.perf_counter() - t0)
            statuses.append(r.status_code)

    async with httpx.AsyncClient() as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return latencies, statuses


def test_bounded_load_has_no_errors_and_flat_memory(served, tiny_dataset):
    cases = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[:4]
    _, warm = asyncio.run(run_load(served["url"], cases, WARMUP, CONCURRENCY, served["auth"]))
    assert set(warm) == {200}
    replicas = [p for p in psutil.process_iter(["cmdline"]) if "ServeReplica" in " ".join(p.info["cmdline"] or [])]
    assert replicas and all(MALLOC_ENV.items() <= p.environ().items() for p in replicas), "replicas lack the allocator settings"
    rounds, latencies, seconds = [], [], 0.0
    while len(rounds) < MAX_ROUNDS:
        before = serve_rss_mb()
        t0 = time.perf_counter()
        lat, statuses = asyncio.run(run_load(served["url"], cases, ROUND, CONCURRENCY, served["auth"]))
        seconds += time.perf_counter() - t0
        after = serve_rss_mb()
        assert statuses.count(200) == ROUND, {s: statuses.count(s) for s in set(statuses)}
        latencies += lat
        rounds.append({k: round(after[k] - v) for k, v in before.items() if k in after})
        if before and sum(rounds[-1].values()) <= ROUND_GROWTH_MB:
            break
    ARTIFACTS.mkdir(exist_ok=True)
    record = {"requests_per_round": ROUND, "concurrency": CONCURRENCY, "rounds": len(rounds), "seconds": round(seconds, 1),
              "throughput_rps": round(len(latencies) / seconds, 2), "p50_ms": round(float(np.percentile(latencies, 50)) * 1000),
              "p99_ms": round(float(np.percentile(latencies, 99)) * 1000), "serve_rss_mb_before": round(sum(before.values())),
              "growth_mb_per_round": [sum(r.values()) for r in rounds], "growth_mb": rounds}  # fmt: skip
    (ARTIFACTS / "load.json").write_text(json.dumps(record, indent=1) + "\n")
    assert before and sum(rounds[-1].values()) <= ROUND_GROWTH_MB, f"serving memory grew in every round: {rounds}"
