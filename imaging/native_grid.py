"""Segmentation back on a study's own grid: probabilities are resampled, then turned into labels.

Resampling labels by nearest neighbour (what a model-grid label map allows) gives staircase borders at
the native resolution; nnU-Net resamples the class probabilities (linearly) and takes the argmax there.
Done over the whole native volume that is 4 channels x every native voxel, so only the box where the
model sees any tumour (foreground evidence above 1 %) is resampled: outside it every neighbour a voxel
interpolates from is background at >= 99 %, so its label is background exactly as a full resample's.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from imaging.postprocess import REGION_CHANNELS, probabilities_to_labels
from imaging.preprocess import Grid

EVIDENCE = 0.01  # below this foreground probability everywhere around it, a voxel is background


def _foreground_evidence(probs: np.ndarray) -> np.ndarray:
    return probs.max(axis=0) if probs.shape[0] == len(REGION_CHANNELS) else 1.0 - probs[0]


def labels_on_grid(probs: np.ndarray, grid: Grid, target: Grid) -> np.ndarray:
    """(K, X, Y, Z) probabilities on the model `grid` -> uint8 BraTS labels on `target` (any orientation
    and spacing), by linear interpolation of each channel and labelling there."""
    out = np.zeros(tuple(int(s) for s in target.shape), np.uint8)
    core = _foreground_evidence(probs) > EVIDENCE
    if not core.any():
        return out
    idx = np.argwhere(core)
    lo, hi = idx.min(0) - 1, idx.max(0) + 1  # model-grid box (with the interpolation's one-voxel reach)
    to_model = np.linalg.inv(grid.affine) @ target.affine  # target voxel -> model-grid voxel
    to_target = np.linalg.inv(to_model)
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
    mapped = corners @ to_target[:3, :3].T + to_target[:3, 3]
    t_lo = np.maximum(np.floor(mapped.min(0)).astype(int) - 1, 0)
    t_hi = np.minimum(np.ceil(mapped.max(0)).astype(int) + 1, np.array(out.shape) - 1)
    if np.any(t_hi < t_lo):  # the tumour lies outside the target's field of view
        return out
    shape = tuple(int(s) for s in t_hi - t_lo + 1)
    matrix = to_model[:3, :3]
    offset = matrix @ t_lo + to_model[:3, 3]
    if np.allclose(matrix, np.diag(np.diag(matrix))):
        matrix = np.diag(matrix)  # axis-aligned grids: scipy's faster separable path
    regions = probs.shape[0] == len(REGION_CHANNELS)
    resampled = np.stack([
        ndimage.affine_transform(probs[k].astype(np.float32, copy=False), matrix, offset=offset, output_shape=shape,
                                 order=1, mode="constant", cval=1.0 if (k == 0 and not regions) else 0.0)
        for k in range(probs.shape[0])
    ])  # fmt: skip
    out[tuple(slice(int(a), int(b) + 1) for a, b in zip(t_lo, t_hi))] = probabilities_to_labels(resampled)
    return out
