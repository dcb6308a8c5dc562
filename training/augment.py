"""Training-time augmentation: modality dropout (robustness to missing sequences), tumour-centred crops,
and nnU-Net's spatial and intensity augmentation of segmentation patches (MONAI transforms).

Every random choice comes from the caller's numpy generator, so an epoch is reproducible from its seed.
"""

from __future__ import annotations

import numpy as np

AUGMENTATIONS = ("standard", "none")


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


def _intensity():
    """Per-patch intensity changes a new scanner brings: contrast (gamma), noise, blur, low resolution.
    Probabilities after nnU-Net's defaults."""
    from monai import transforms as T

    return T.Compose([
        T.RandAdjustContrastd(["image"], prob=0.15, gamma=(0.7, 1.5)),
        T.RandGaussianNoised(["image"], prob=0.15, std=0.1),
        T.RandGaussianSmoothd(["image"], prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        T.RandSimulateLowResolutiond(["image"], prob=0.125, zoom_range=(0.5, 1.0)),
    ])  # fmt: skip


def _spatial():
    """Rotation, scaling, elastic deformation and mirroring, applied alike to image and labels."""
    from monai import transforms as T

    keys = ["image", "seg"]
    return T.Compose([
        T.RandAffined(keys, prob=0.2, rotate_range=(np.pi / 12,) * 3, scale_range=(0.15,) * 3,
                      mode=("bilinear", "nearest"), padding_mode="zeros"),
        T.Rand3DElasticd(keys, prob=0.1, sigma_range=(5.0, 7.0), magnitude_range=(40.0, 80.0),
                         mode=("bilinear", "nearest"), padding_mode="zeros"),
        T.RandFlipd(keys, prob=0.5, spatial_axis=0),
        T.RandFlipd(keys, prob=0.5, spatial_axis=1),
        T.RandFlipd(keys, prob=0.5, spatial_axis=2),
    ])  # fmt: skip


class PatchAugmentation:
    """Spatial + intensity augmentation of one (C, x, y, z) patch and its (x, y, z) class labels.

    Intensity changes stay inside each channel's own non-zero voxels: a missing (zero) modality stays
    zero, as it is at inference, and so does the skull-stripped background."""

    def __init__(self) -> None:
        self.intensity, self.spatial = _intensity(), _spatial()

    def __call__(self, image: np.ndarray, seg: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        self.intensity.set_random_state(seed=int(rng.integers(2**31 - 1)))
        self.spatial.set_random_state(seed=int(rng.integers(2**31 - 1)))
        inside = image != 0
        changed = np.asarray(self.intensity({"image": image.astype(np.float32)})["image"])
        image = np.where(inside, changed, 0.0).astype(np.float32)
        out = self.spatial({"image": image, "seg": seg[None].astype(np.float32)})
        return np.asarray(out["image"], np.float32), np.rint(np.asarray(out["seg"])[0]).astype(seg.dtype)
