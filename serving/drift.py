"""Input drift per site against a model version's training reference.

The test, stated: for every input statistic (imaging.input_stats), a two-sample Kolmogorov-Smirnov test
of the site's recent studies against the values the version's training cases had (`input_reference`
in its extras.json); a feature has drifted at p < ALPHA. A site's drift score is the share of its
features that drifted, and the site has drifted when that share reaches SHARE_THRESHOLD with at least
MIN_STUDIES studies: the rule evidently uses by default for a dataset (per-feature KS at 0.05, dataset
drift at half of the features). The reference is made at training (imaging.input_stats.input_reference).

The answers are tested the same way (`output_drift`) against the version's `output_reference`: its own
answers on its held-out test cases (region volumes, marker probabilities, OOD score, risk score, tumour found), so a
site whose studies get answers unlike any the version gave in evaluation is flagged even when its inputs
look familiar. Versions trained before this have no output reference; their outputs are only summarised.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy.stats import ks_2samp

ALPHA = 0.05
SHARE_THRESHOLD = 0.5
MIN_STUDIES = 5


def site_drift(reference: dict, studies: list[dict[str, float]]) -> dict:
    """The KS test of every feature with enough values on both sides, and the site's score."""
    tests = {}
    for name, ref in reference.get("features", {}).items():
        values = [s[name] for s in studies if name in s]
        if len(ref) < 3 or len(values) < 3:
            continue
        result = ks_2samp(np.asarray(ref, float), np.asarray(values, float))
        tests[name] = {"statistic": round(float(result.statistic), 4), "p_value": float(result.pvalue),
                       "drifted": bool(result.pvalue < ALPHA), "reference_median": round(float(np.median(ref)), 4),
                       "site_median": round(float(np.median(values)), 4)}  # fmt: skip
    score = float(np.mean([t["drifted"] for t in tests.values()])) if tests else 0.0
    top = sorted(tests, key=lambda n: -tests[n]["statistic"])[:5]
    return {"studies": len(studies), "score": round(score, 4), "threshold": SHARE_THRESHOLD,
            "drifted": bool(len(studies) >= MIN_STUDIES and score >= SHARE_THRESHOLD),
            "enough_studies": len(studies) >= MIN_STUDIES, "features_tested": len(tests),
            "features_drifted": sorted(n for n, t in tests.items() if t["drifted"]), "largest_shifts": top, "tests": tests}  # fmt: skip


def _outputs_summary(records: list[dict]) -> dict:
    out: dict[str, list[float]] = defaultdict(list)
    for record in records:
        for name, value in (record.get("outputs") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[name].append(float(value))
    return {name: {"median": round(float(np.median(v)), 4), "n": len(v)} for name, v in sorted(out.items())}


def drift_by_site(reference: dict, records: list[dict], output_reference: dict | None = None) -> dict[str, dict]:
    """Each site's drift (studies without a site are `unknown`), with its outputs summarised beside it and,
    given the version's output reference, tested (`output_drift`)."""
    by_site: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        if "inputs" in record:  # a study a task failed on has no statistics (pipelines.champion_guard counts it)
            by_site[record.get("site") or "unknown"].append(record)
    out = {}
    for site, group in sorted(by_site.items()):
        out[site] = {**site_drift(reference, [r["inputs"] for r in group]), "outputs": _outputs_summary(group),
                     "qc_flagged_share": round(float(np.mean([bool(r.get("qc_flags")) for r in group])), 4)}  # fmt: skip
        if output_reference:
            answers = [r.get("outputs") or {} for r in group]
            out[site]["output_drift"] = site_drift(output_reference, [a for a in answers if set(a) & set(output_reference["features"])])
    return out
