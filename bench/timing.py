"""How the benchmarks time things and record a figure (every bench module imports these; they import
no other bench module)."""

from __future__ import annotations

import statistics
import time

REPEATS = 15


def figure(name: str, value: float, unit: str, target: str | None = None, met: bool | None = None) -> dict:
    """One figure of results.json / REPORT.md; `met` says whether `target` was reached (None: no target)."""
    met = None if met is None else bool(met)  # numpy comparisons give numpy bools, which json refuses
    return {"name": name, "value": round(float(value), 3), "unit": unit, "target": target, "met": met}


def p50_ms(fn, n: int = REPEATS) -> float:
    fn()  # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def interleaved_p50_ms(calls: dict, runs: int, warmup_rounds: int = 1, seed: int = 0) -> dict[str, float]:
    """p50 (ms) of each call, timed in rounds of one call each, so that drift on the shared 2-core machine
    (other tenants, thermal) hits every side alike instead of whichever happened to run during it. The
    order inside each round is shuffled (seeded), so no side always runs first (cold caches) or right
    after the same neighbour."""
    import random

    rng = random.Random(seed)
    for _ in range(warmup_rounds):  # connection pools, first-touch allocations, replica and session caches
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        order = list(calls.items())
        rng.shuffle(order)
        for name, call in order:
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}
