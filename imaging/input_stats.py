"""What a study looks like before any normalisation: the statistics input drift is measured on.

Training records them for the cases a version learnt from (its `input_reference`); serving records them
for every study it analyses (services.monitoring). They are computed on the study as it arrived, so
what preprocessing cancels (a scanner's intensity scale, its contrast curve, its noise) is still seen:
  spacing_mm, fov_mm, missing_modalities           the grid and the protocol
  <modality>_p99                                   intensity scale (99th percentile of the foreground)
  <modality>_contrast                              median / 99th percentile of the foreground
  <modality>_cv                                    coefficient of variation of the foreground
  <modality>_noise                                 median absolute high-pass residual / foreground median
Foreground: voxels above 10 % of the volume's 99.5th percentile (skull-stripped or whole head alike).
Volumes over MAX_VOXELS are read with a stride (every 2nd voxel per axis for a 1 mm study), so the
gateway spends about 0.1 s per sequence on them, after the answer.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from imaging.study import MODALITIES, Study

PER_MODALITY = ("p99", "contrast", "cv", "noise")
FEATURES = ("spacing_mm", "fov_mm", "missing_modalities", *(f"{m}_{s}" for m in MODALITIES for s in PER_MODALITY))


MAX_VOXELS = 1_200_000  # above this a volume is read with a stride: a 1 mm study costs ~0.1 s, not ~1.2 s


def _modality(data: np.ndarray) -> dict[str, float]:
    data = np.asarray(data, dtype=np.float32)
    stride = int(np.ceil((data.size / MAX_VOXELS) ** (1 / 3))) if data.size > MAX_VOXELS else 1
    data = data[::stride, ::stride, ::stride]
    top = float(np.percentile(data, 99.5))
    fg = data[data > 0.1 * top] if top > 0 else data.ravel()
    if fg.size < 10:
        return {}
    p50, p99 = float(np.percentile(fg, 50)), float(np.percentile(fg, 99))
    residual = data - ndimage.uniform_filter(data, size=3)
    noise = float(np.median(np.abs(residual[data > 0.1 * top]))) if top > 0 else 0.0
    return {"p99": p99, "contrast": p50 / p99 if p99 else 0.0, "cv": float(fg.std() / fg.mean()) if fg.mean() else 0.0,
            "noise": noise / p50 if p50 else 0.0}  # fmt: skip


def input_statistics(study: Study) -> dict[str, float]:
    """The study's statistics by feature name (a modality that is missing has none of its own)."""
    present = {m: study.images[m] for m in MODALITIES if m in study.images}
    first = next(iter(present.values()))
    spacing = np.sqrt((np.asarray(first.affine)[:3, :3] ** 2).sum(axis=0))
    out = {"spacing_mm": round(float(spacing.mean()), 4), "fov_mm": round(float(max(np.asarray(first.data.shape[:3]) * spacing)), 2),
           "missing_modalities": float(len(MODALITIES) - len(present))}  # fmt: skip
    for modality, volume in present.items():
        for name, value in _modality(volume.data).items():
            out[f"{modality}_{name}"] = round(value, 6)
    return out


MAX_REFERENCE = 500  # values kept per feature in a version's reference


def input_reference(statistics: list[dict[str, float]], source: str) -> dict:
    """A version's input reference (extras.json `input_reference`): its cases' values per feature."""
    features: dict[str, list[float]] = {}
    for stats in statistics:
        for name, value in stats.items():
            features.setdefault(name, []).append(float(value))
    return {"source": source, "n_cases": len(statistics), "features": {n: v[:MAX_REFERENCE] for n, v in sorted(features.items())}}
