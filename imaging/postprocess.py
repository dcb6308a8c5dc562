"""Model outputs -> findings, shared by training's evaluation and serving (one code path).

- Segmentation: class (or region) probabilities -> BraTS labels; stray voxel clusters removed, multifocal tumour kept.
- Localization: a tumour heatmap -> bounding box and centre.
- Survival: a Cox risk score and the Breslow baseline -> a survival curve, median and risk group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from imaging.labels import CLASS_TO_LABEL

# Clusters smaller than this (in mL) are noise; a real satellite lesion is larger.
MIN_COMPONENT_ML = 0.1


def probabilities_to_labels(probs: np.ndarray) -> np.ndarray:
    """Model probabilities -> uint8 BraTS labels: (4, X, Y, Z) class probabilities (background, NCR, ED,
    ET; softmax) by argmax, or (3, X, Y, Z) region probabilities (WT, TC, ET; sigmoid) by regions_to_labels."""
    if probs.shape[0] == len(REGION_CHANNELS):
        return regions_to_labels(probs)
    return CLASS_TO_LABEL[np.argmax(probs, axis=0)]


REGION_CHANNELS = ("WT", "TC", "ET")


def regions_to_labels(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Nested region probabilities -> labels, the BraTS hierarchy enforced: ED where the whole tumour is,
    NCR where the tumour core is too, ET where enhancing tumour is inside that core."""
    wt = probs[0] > threshold
    tc = wt & (probs[1] > threshold)
    et = tc & (probs[2] > threshold)
    labels = np.zeros(probs.shape[1:], np.uint8)
    labels[wt], labels[tc], labels[et] = 2, 1, 4
    return labels


def remove_stray_voxels(labels: np.ndarray, voxel_ml: float, min_ml: float = MIN_COMPONENT_ML) -> np.ndarray:
    """Drop tumour clusters below `min_ml`; every cluster above it stays (multifocal tumours are real)."""
    tumour = labels > 0
    components, n = ndimage.label(tumour, structure=ndimage.generate_binary_structure(3, 3))
    if n == 0:
        return labels
    sizes = ndimage.sum_labels(tumour, components, index=np.arange(1, n + 1)) * voxel_ml
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = sizes >= min_ml
    return np.where(keep[components], labels, 0).astype(labels.dtype)


def volumes_ml(labels: np.ndarray, voxel_ml: float) -> dict[str, float]:
    ncr, ed, et = (float((labels == v).sum()) * voxel_ml for v in (1, 2, 4))
    return {"NCR": round(ncr, 2), "ED": round(ed, 2), "ET": round(et, 2),
            "WT": round(ncr + ed + et, 2), "TC": round(ncr + et, 2)}  # fmt: skip


@dataclass
class Localization:
    found: bool
    bbox_vox: np.ndarray  # [x0,y0,z0,x1,y1,z1], inclusive, on the heatmap's grid
    centroid_vox: np.ndarray  # [x,y,z]
    score: float


def heatmap_to_box(heatmap: np.ndarray, threshold: float = 0.5) -> Localization:
    """Box around every heatmap cluster above threshold; centre = probability-weighted centroid."""
    mask = heatmap >= threshold
    if not mask.any():
        peak = np.array(np.unravel_index(np.argmax(heatmap), heatmap.shape), dtype=float)
        return Localization(False, np.concatenate([peak, peak]), peak, float(heatmap.max()))
    components, n = ndimage.label(mask)
    sizes = ndimage.sum_labels(mask, components, index=np.arange(1, n + 1))
    # Ignore specks far smaller than the main finding; keep multifocal disease in the box.
    keep = np.isin(components, 1 + np.flatnonzero(sizes >= 0.05 * sizes.max()))
    idx = np.argwhere(keep)
    weights = heatmap[keep]
    centroid = (idx * weights[:, None]).sum(0) / weights.sum()
    return Localization(True, np.concatenate([idx.min(0), idx.max(0)]).astype(float), centroid, float(weights.mean()))


@dataclass
class SurvivalCurve:
    days: np.ndarray
    probability: np.ndarray
    median_days: float | None


def survival_curve(risk: float, baseline_days: np.ndarray, baseline_hazard: np.ndarray) -> SurvivalCurve:
    """S(t) = exp(-H0(t) * exp(risk)); the median is the first time S(t) <= 0.5 (None if never reached)."""
    surv = np.exp(-np.asarray(baseline_hazard) * np.exp(risk))
    below = np.flatnonzero(surv <= 0.5)
    median = float(baseline_days[below[0]]) if below.size else None
    return SurvivalCurve(np.asarray(baseline_days, dtype=float), surv, median)


def breslow_baseline(days: np.ndarray, events: np.ndarray, risk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Breslow's estimator of the cumulative baseline hazard at each distinct event time."""
    days, events, risk = (np.asarray(a, dtype=float) for a in (days, events, risk))
    times = np.unique(days[events > 0])
    hazard = np.empty_like(times)
    total = 0.0
    for i, t in enumerate(times):
        at_risk = np.exp(risk[days >= t]).sum()
        total += ((days == t) & (events > 0)).sum() / max(at_risk, 1e-12)
        hazard[i] = total
    return times, hazard
