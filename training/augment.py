"""Training-time augmentation: modality dropout (robustness to missing sequences) and tumour-centred crops."""

from __future__ import annotations

import numpy as np


def modality_dropout(image: np.ndarray, presence: np.ndarray, rng: np.random.Generator, p: float = 0.3):
    """With probability p, blank a random non-empty subset of the present modalities (at least one stays).

    Blanked modalities look exactly like missing ones at inference: a zero channel and presence 0.
    """
    present = np.flatnonzero(presence > 0)
    if len(present) < 2 or rng.random() >= p:
        return image, presence
    n_drop = int(rng.integers(1, len(present)))
    drop = rng.choice(present, size=n_drop, replace=False)
    image, presence = image.copy(), presence.copy()
    image[drop] = 0.0
    presence[drop] = 0.0
    return image, presence


def tumour_crop(image: np.ndarray, seg: np.ndarray, size: int, rng: np.random.Generator, p_tumour: float = 0.8):
    """A cubic crop of `size`, centred on a random tumour voxel with probability p_tumour (else anywhere)."""
    shape = np.array(seg.shape)
    tumour = np.argwhere(seg > 0)
    if tumour.size and rng.random() < p_tumour:
        centre = tumour[rng.integers(len(tumour))]
    else:
        centre = np.array([rng.integers(0, s) for s in shape])
    lo = np.clip(centre - size // 2, 0, shape - size)
    sl = tuple(slice(int(a), int(a) + size) for a in lo)
    return image[(slice(None), *sl)], seg[sl]
