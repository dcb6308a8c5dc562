"""Paired comparison of two model versions on the same cases: bootstrap confidence intervals, per-site
figures and the cases where the versions disagree most.

Input is the per-case rows `training.evaluate` produces for each version on one set of cases; the
bootstrap resamples cases (the same resample for both versions), so the interval of the difference
accounts for the pairing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from imaging import metrics
from training.data import CLS_TASKS


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[list[dict]], float]
    higher_is_better: bool = True


def _mean(column: str) -> Callable[[list[dict]], float]:
    def fn(rows: list[dict]) -> float:
        values = [r[column] for r in rows if r.get(column) is not None and np.isfinite(r[column])]
        return float(np.mean(values)) if values else float("nan")

    return fn


def _auc(marker: str) -> Callable[[list[dict]], float]:
    def fn(rows: list[dict]) -> float:
        known = [r for r in rows if r[f"label_{marker}"] >= 0]
        y = np.array([r[f"label_{marker}"] for r in known])
        if len(set(y.tolist())) < 2:
            return float("nan")  # AUC needs both classes
        return metrics.auc(y, np.array([r[f"p_{marker}"] for r in known]))

    return fn


def _ece(marker: str) -> Callable[[list[dict]], float]:
    def fn(rows: list[dict]) -> float:
        known = [r for r in rows if r[f"label_{marker}"] >= 0]
        if not known:
            return float("nan")
        return metrics.ece(np.array([r[f"label_{marker}"] for r in known]), np.array([r[f"p_{marker}"] for r in known]))

    return fn


def _c_index(rows: list[dict]) -> float:
    if len(rows) < 2 or not any(r["os_event"] for r in rows):
        return float("nan")
    try:
        return metrics.c_index(np.array([r["os_days"] for r in rows]), np.array([r["risk"] for r in rows]),
                               np.array([r["os_event"] for r in rows]))  # fmt: skip
    except ZeroDivisionError:  # a resample with no comparable pair (lifelines raises)
        return float("nan")


METRICS: dict[str, list[Metric]] = {
    "segmentation": [Metric("dice_WT", _mean("dice_WT")), Metric("dice_TC", _mean("dice_TC")),
                     Metric("dice_ET", _mean("dice_ET")), Metric("hd95_WT", _mean("hd95_WT"), False)],
    "localization": [Metric("hit_rate", _mean("hit")), Metric("box_iou", _mean("box_iou")),
                     Metric("centre_distance_mm", _mean("centre_distance_mm"), False)],
    "classification": [Metric(f"{m}_auc", _auc(m)) for m in CLS_TASKS] + [Metric(f"{m}_ece", _ece(m), False) for m in ("grade", "idh")],
    "survival": [Metric("c_index", _c_index)],
}  # fmt: skip


def case_disagreement(task: str, a: dict, b: dict) -> float:
    """How differently the two versions treated one case (larger = more different)."""
    if task == "segmentation":
        return abs(a["dice_WT"] - b["dice_WT"])
    if task == "localization":
        return abs(a["box_iou"] - b["box_iou"]) + abs(a["hit"] - b["hit"])
    if task == "classification":
        return max(abs(a[f"p_{m}"] - b[f"p_{m}"]) for m in CLS_TASKS)
    if task == "survival":
        return abs(a["risk_rank"] - b["risk_rank"])
    raise ValueError(f"no comparison for task {task!r}")


@dataclass
class Interval:
    value: float
    low: float
    high: float

    def to_json(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high]}


@dataclass
class MetricComparison:
    name: str
    higher_is_better: bool
    a: Interval
    b: Interval
    difference: Interval  # b - a

    @property
    def verdict(self) -> str:
        """'better' / 'worse' only when the 95 % interval of the difference excludes zero."""
        d = self.difference
        if not (np.isfinite(d.low) and np.isfinite(d.high)) or d.low <= 0 <= d.high:
            return "no clear difference"
        improved = (d.low > 0) == self.higher_is_better
        return "better" if improved else "worse"

    def to_json(self) -> dict:
        return {"name": self.name, "higher_is_better": self.higher_is_better, "a": self.a.to_json(),
                "b": self.b.to_json(), "difference": self.difference.to_json(), "verdict": self.verdict}  # fmt: skip


def _interval(point: float, samples: list[float]) -> Interval:
    finite = np.array([s for s in samples if np.isfinite(s)])
    if len(finite) < max(10, len(samples) // 2):  # too many undefined resamples (e.g. one class only)
        return Interval(point, float("nan"), float("nan"))
    return Interval(point, float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5)))


def _with_ranks(task: str, rows: list[dict]) -> list[dict]:
    if task != "survival" or not rows:
        return rows
    order = np.argsort(np.argsort([r["risk"] for r in rows]))
    return [r | {"risk_rank": float(k) / max(len(rows) - 1, 1)} for r, k in zip(rows, order)]


def paired_rows(rows_a: list[dict], rows_b: list[dict]) -> tuple[list[dict], list[dict]]:
    """The cases both versions were scored on, in the same order."""
    by_id = {r["case_id"]: r for r in rows_b}
    common = [r for r in rows_a if r["case_id"] in by_id]
    return common, [by_id[r["case_id"]] for r in common]


def compare(task: str, rows_a: list[dict] | None, rows_b: list[dict], n_boot: int = 1000, seed: int = 0, top_k: int = 5) -> dict:
    """Compare version A with B on their common cases; with no A (a task's first version), B alone."""
    if task not in METRICS:
        raise ValueError(f"no comparison for task {task!r}")
    a, b = paired_rows(rows_a, rows_b) if rows_a is not None else (None, list(rows_b))
    if not b:
        raise ValueError("the two versions share no scored case" if rows_a is not None else "no scored case")
    b = _with_ranks(task, b)
    a = _with_ranks(task, a) if a is not None else None
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(b), len(b)) for _ in range(n_boot)]
    compared = []
    for m in METRICS[task]:
        sb = [m.fn([b[i] for i in idx]) for idx in draws]
        entry = {"name": m.name, "higher_is_better": m.higher_is_better, "b": _interval(m.fn(b), sb).to_json()}
        if a is not None:
            sa = [m.fn([a[i] for i in idx]) for idx in draws]
            va, vb = m.fn(a), m.fn(b)
            c = MetricComparison(m.name, m.higher_is_better, _interval(va, sa), _interval(vb, sb),
                                 _interval(vb - va, [y - x for x, y in zip(sa, sb)]))  # fmt: skip
            entry = c.to_json()
        compared.append(entry)
    site_of = lambda r: r.get("site") or "unknown"  # noqa: E731
    per_site = {}
    for site in sorted({site_of(r) for r in b}):
        idx = [i for i, r in enumerate(b) if site_of(r) == site]
        per_site[site] = {"n_cases": len(idx)}
        for m in METRICS[task]:
            per_site[site][m.name] = [m.fn([a[i] for i in idx]) if a is not None else None, m.fn([b[i] for i in idx])]
    disagreements = []
    if a is not None:
        scored = sorted(((case_disagreement(task, x, y), x, y) for x, y in zip(a, b)), key=lambda t: -t[0])
        disagreements = [{"case_id": x["case_id"], "site": x.get("site"), "disagreement": float(d), "a": x, "b": y}
                         for d, x, y in scored[:top_k]]  # fmt: skip
    return {"task": task, "n_cases": len(b), "n_boot": n_boot, "metrics": compared, "per_site": per_site,
            "disagreements": disagreements}  # fmt: skip
