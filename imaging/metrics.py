"""Metrics shared by training, evaluation and promotion gates.

Segmentation: Dice and HD95 per BraTS region (WT, TC, ET). Localization: box IoU, centre distance in
mm, hit rate. Classification: AUC, balanced accuracy, F1, expected calibration error. Survival:
Harrell's c-index. Conventions follow BraTS: two empty masks score Dice 1 and HD95 0; one empty mask
scores Dice 0 and HD95 = the volume's diagonal (a finite worst case, so averages stay defined).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from imaging.labels import REGIONS, region_mask


# -- segmentation ------------------------------------------------------------------------------------
def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = pred.astype(bool), truth.astype(bool)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> float:
    """95th percentile of the symmetric surface distances, in mm."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return float(np.linalg.norm(np.array(pred.shape) * np.array(spacing)))
    sp, st = _surface(pred), _surface(truth)
    dist_to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    distances = np.concatenate([dist_to_truth[sp], dist_to_pred[st]])
    return float(np.percentile(distances, 95))


def segmentation_scores(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> dict[str, float]:
    """{dice_WT, dice_TC, dice_ET, hd95_WT, hd95_TC, hd95_ET} for label maps in the BraTS convention."""
    scores = {}
    for region in REGIONS:
        p, t = region_mask(pred, region), region_mask(truth, region)
        scores[f"dice_{region}"] = dice(p, t)
        scores[f"hd95_{region}"] = hd95(p, t, spacing)
    return scores


# -- localization ------------------------------------------------------------------------------------
def bbox(mask: np.ndarray) -> np.ndarray | None:
    """[x0,y0,z0,x1,y1,z1] (inclusive voxel indices) of a mask's non-zero voxels, or None if empty."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    return np.concatenate([idx.min(0), idx.max(0)]).astype(float)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    lo, hi = np.maximum(a[:3], b[:3]), np.minimum(a[3:], b[3:])
    inter = np.prod(np.clip(hi - lo + 1, 0, None))
    vol = lambda box: np.prod(np.clip(box[3:] - box[:3] + 1, 0, None))  # noqa: E731
    union = vol(a) + vol(b) - inter
    return float(inter / union) if union > 0 else 0.0


def centre_distance_mm(a: np.ndarray, b: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    return float(np.linalg.norm((np.asarray(a, float) - np.asarray(b, float)) * np.asarray(spacing)))


def centre_in_box(centre: np.ndarray, box: np.ndarray) -> bool:
    c, box = np.asarray(centre, float), np.asarray(box, float)
    return bool(np.all(c >= box[:3] - 0.5) and np.all(c <= box[3:] + 0.5))


# -- classification ----------------------------------------------------------------------------------
def auc(y_true: np.ndarray, p_positive: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half; equal to sklearn's roc_auc_score, and
    fast enough to bootstrap)."""
    from scipy.stats import rankdata

    y = np.asarray(y_true) == 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")  # undefined with one class present
    ranks = rankdata(np.asarray(p_positive, dtype=float))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(y_true, y_pred))


def f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, zero_division=0))


def brier(y_true: np.ndarray, p_positive: np.ndarray) -> float:
    """Mean squared error of binary probabilities (0 is perfect; always saying 0.5 scores 0.25)."""
    return float(np.mean((np.asarray(p_positive, dtype=float) - np.asarray(y_true, dtype=float)) ** 2))


def ece(y_true: np.ndarray, p_positive: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of binary probabilities (confidence of the predicted class, equal-width bins)."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(p_positive, dtype=float)
    pred = (p >= 0.5).astype(float)
    conf = np.where(pred == 1, p, 1 - p)
    correct = (pred == y).astype(float)
    edges = np.linspace(0.5, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf >= lo) & ((conf < hi) if hi < 1.0 else (conf <= hi))
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(total)


# -- survival ----------------------------------------------------------------------------------------
def c_index(durations: np.ndarray, risk: np.ndarray, events: np.ndarray) -> float:
    """Harrell's concordance: higher risk should mean shorter survival."""
    from lifelines.utils import concordance_index

    return float(concordance_index(durations, -np.asarray(risk, dtype=float), events))


# -- uncertainty of a figure -------------------------------------------------------------------------
def bootstrap_ci(statistic, *arrays: np.ndarray, n: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(*arrays)` over cases (resampled with replacement,
    paired across the arrays); resamples where the statistic is undefined (nan) are left out."""
    arrays = tuple(np.asarray(a) for a in arrays)
    size = len(arrays[0])
    if size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        pick = rng.integers(0, size, size)
        value = statistic(*(a[pick] for a in arrays))
        if np.isfinite(value):
            values.append(value)
    if len(values) < n // 2:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))
