"""Load for the benchmark: closed-loop clients for a fixed time (the soak, the hot-swap), and the
resident memory of the Serve processes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
import psutil


@dataclass
class Sample:
    sent: float  # seconds since the run started
    done: float
    status: int
    version: str | None = None


@dataclass
class LoadRun:
    samples: list[Sample] = field(default_factory=list)
    memory: list[tuple[float, float]] = field(default_factory=list)  # (seconds, Serve RSS MB)


def serve_rss_mb(settings) -> float:
    """Resident memory (MB) of the Serve replicas and proxies of this stack's Ray (not another stack's)."""
    from pipelines.stack import EmbeddedStack
    from pipelines.stack.process import session_alive

    record = EmbeddedStack(settings).records().get("ray")
    total = 0
    for pid in session_alive(record) if record else []:
        try:
            proc = psutil.Process(pid)
            if any(tag in " ".join(proc.cmdline()) for tag in ("ServeReplica", "ProxyActor")):
                total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


async def closed_loop(settings, url: str, files: list[dict], seconds: float, concurrency: int,
                      memory_every_s: float = 15.0, on_tick=None) -> LoadRun:  # fmt: skip
    """`concurrency` clients, each sending its next request when the last one answers, until `seconds`
    have passed. `on_tick(elapsed)` runs once a second (the hot-swap moves the alias from it)."""
    run, t0 = LoadRun(), time.perf_counter()
    deadline = t0 + seconds

    async def client(http: httpx.AsyncClient, k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            sent = time.perf_counter() - t0
            try:
                r = await http.post(url, files=files[i % len(files)], timeout=300)
                status, version = r.status_code, (r.json().get("model_version") if r.status_code == 200 else None)
            except httpx.HTTPError:
                status, version = 0, None  # no answer at all counts as a failure
            run.samples.append(Sample(sent, time.perf_counter() - t0, status, version))
            i += concurrency

    async def monitor() -> None:
        next_memory = 0.0
        while time.perf_counter() < deadline:
            elapsed = time.perf_counter() - t0
            if elapsed >= next_memory:
                run.memory.append((elapsed, await asyncio.to_thread(serve_rss_mb, settings)))
                next_memory += memory_every_s
            if on_tick is not None:
                await asyncio.to_thread(on_tick, elapsed)
            await asyncio.sleep(1.0)  # a sampling period, not synchronisation
        run.memory.append((time.perf_counter() - t0, await asyncio.to_thread(serve_rss_mb, settings)))

    async with httpx.AsyncClient() as http:
        await asyncio.gather(monitor(), *(client(http, k) for k in range(concurrency)))
    return run
