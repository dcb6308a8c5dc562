"""Findings that cannot be true, caught before anyone reads them as fact.

A model outside what it learned still answers: a one-epoch network reports a whole tumour larger than
the brain, a classifier fed an unfamiliar scanner answers 0.5 for everything. Each check here returns a
record {check, value, limit, detail}; they go to `findings.quality.implausible` and the report states
them instead of the figures they concern.
"""

from __future__ import annotations

import numpy as np

MAX_TUMOUR_BRAIN_FRACTION = 0.5  # a whole tumour over half the brain mask is not a presentation to report
TRAINING_RANGE_MARGIN = 0.5  # volumes within [lo * (1 - m), hi * (1 + m)] of the training range pass
UNINFORMATIVE_BAND = 0.05  # every marker probability within 0.5 +/- this: the classifier says nothing


def _record(check: str, value: float, limit: str, detail: str) -> dict:
    return {"check": check, "value": round(float(value), 3), "limit": limit, "detail": detail}


def segmentation_checks(volumes_ml: dict[str, float], brain_ml: float, training_ml: dict | None) -> list[dict]:
    """The whole tumour against the brain mask it sits in, and every region against the volumes the
    segmentation version saw in training (extras `training_volumes_ml`: region -> [min, max])."""
    out = []
    wt = volumes_ml.get("WT", 0.0)
    if brain_ml > 0 and wt > MAX_TUMOUR_BRAIN_FRACTION * brain_ml:
        out.append(_record("tumour_volume_vs_brain", wt / brain_ml, f"<= {MAX_TUMOUR_BRAIN_FRACTION} of the brain mask",
                           f"whole tumour {wt:.0f} mL in a brain mask of {brain_ml:.0f} mL"))  # fmt: skip
    for region, (lo, hi) in (training_ml or {}).items():
        v = volumes_ml.get(region)
        low, high = lo * (1 - TRAINING_RANGE_MARGIN), hi * (1 + TRAINING_RANGE_MARGIN)
        if v is not None and not low <= v <= high:
            out.append(_record(f"volume_{region}_vs_training", v, f"{low:.1f}-{high:.1f} mL",
                               f"{region} {v:.1f} mL; the model trained on {lo:.1f}-{hi:.1f} mL"))  # fmt: skip
    return out


def classification_checks(probabilities: np.ndarray) -> list[dict]:
    """Every marker at 0.5 +/- UNINFORMATIVE_BAND: an answer that is no answer."""
    spread = float(np.max(np.abs(np.asarray(probabilities, dtype=float) - 0.5)))
    if spread <= UNINFORMATIVE_BAND:
        return [_record("uninformative_probabilities", spread, f"> {UNINFORMATIVE_BAND} from 0.5 for some marker",
                        "every marker probability is within 0.5 +/- 0.05")]  # fmt: skip
    return []
