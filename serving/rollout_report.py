"""What the evidence recorded under a rollout policy says: agreement, errors and latency, overall, per
site and per day, each with a 95 % interval; and whether a canary breaches its limits.

An evidence entry (serving.rollout_ledger.record_evidence) is one study:
  {"time", "case_ref", "site", "mode": shadow|canary, "champion", "candidate", "answered_by",
   "champion_ms", "candidate_ms", "error": null or the candidate's failure,
   "agreement": {"agreement": headline in [0, 1], <measure>: value, ...}}   (shadow only)
Measures whose name ends in `_agree` are 0/1 per study (a Wilson interval); the others are means with a
normal-approximation interval (1.96 standard errors), which is what a reader of a few dozen studies
needs: how sure the figure is, not only the figure.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime, timezone

import numpy as np

Z95 = 1.959964


def wilson(successes: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound at 0/n and n/n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _mean_interval(values: list[float], proportion: bool) -> dict:
    n = len(values)
    mean = float(np.mean(values))
    if proportion:
        low, high = wilson(int(round(sum(values))), n)
    elif n > 1:
        half = Z95 * float(np.std(values, ddof=1)) / math.sqrt(n)
        low, high = mean - half, mean + half
    else:
        low, high = -math.inf, math.inf
    return {"mean": round(mean, 4), "ci95": [round(low, 4), round(high, 4)], "n": n}


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def _summary(entries: list[dict]) -> dict:
    errors = sum(1 for e in entries if e.get("error"))
    measures: dict[str, list[float]] = defaultdict(list)
    for entry in entries:
        for name, value in (entry.get("agreement") or {}).items():
            if value is not None:
                measures[name].append(float(value))
    return {"studies": len(entries), "errors": errors,
            "error_rate": {"mean": round(errors / len(entries), 4) if entries else 0.0, "ci95": [round(v, 4) for v in wilson(errors, len(entries))]},
            "agreement": {name: _mean_interval(values, name.endswith("_agree")) for name, values in sorted(measures.items())},
            "latency_ms": {"champion_p50": _percentile([e["champion_ms"] for e in entries if e.get("champion_ms") is not None], 50),
                           "candidate_p50": _percentile([e["candidate_ms"] for e in entries if e.get("candidate_ms") is not None], 50),
                           "candidate_p95": _percentile([e["candidate_ms"] for e in entries if e.get("candidate_ms") is not None], 95)}}  # fmt: skip


def summarise(entries: list[dict]) -> dict:
    """Overall, per site (studies without a site tag are `unknown`) and per UTC day (how the agreement moves)."""
    by_site: dict[str, list[dict]] = defaultdict(list)
    by_day: dict[str, list[dict]] = defaultdict(list)
    for entry in entries:
        by_site[entry.get("site") or "unknown"].append(entry)
        by_day[datetime.fromtimestamp(float(entry.get("time", 0.0)), timezone.utc).strftime("%Y-%m-%d")].append(entry)
    return {"overall": _summary(entries), "sites": {site: _summary(group) for site, group in sorted(by_site.items())},
            "days": {day: _summary(group) for day, group in sorted(by_day.items())}}  # fmt: skip


def breach(entries: list[dict], limits: dict) -> str | None:
    """Why a canary must be withdrawn, or None. Nothing is judged before `min_studies` studies."""
    if len(entries) < int(limits.get("min_studies") or 1):
        return None
    summary = _summary(entries)
    rate = summary["error_rate"]["mean"]
    if limits.get("max_error_rate") is not None and rate > float(limits["max_error_rate"]):
        return f"candidate error rate {rate:.2f} over {len(entries)} studies > {limits['max_error_rate']}"
    p95 = summary["latency_ms"]["candidate_p95"]
    if limits.get("max_p95_ms") is not None and p95 is not None and p95 > float(limits["max_p95_ms"]):
        return f"candidate p95 latency {p95:.0f} ms > {limits['max_p95_ms']} ms"
    headline = summary["agreement"].get("agreement")
    if limits.get("min_agreement") is not None and headline and headline["mean"] < float(limits["min_agreement"]):
        return f"agreement with the champion {headline['mean']:.3f} < {limits['min_agreement']}"
    return None
