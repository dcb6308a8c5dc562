"""What a study already is, measured before anything is done to it.

Every decision preprocessing takes is a figure with its threshold, recorded in the prediction:
- the background (noise floor) of each modality, from the corners of its field of view (air in any head
  scan): exact zeros in BraTS-style data, Rician noise in a scanner's output;
- skull-stripped or not: the volume of the reference's foreground (everything above the noise floor,
  holes filled). A stripped brain is 0.9-2.0 L (the MNI152 brain mask, CSF included, is 1.9 L); a head
  with scalp and neck is 3-6 L;
- aligned or not: the overlap (Dice) of each modality's foreground with the reference's, through the
  scanner affines. Same-session series of one head overlap at >= 0.95; a few mm or degrees of motion
  drop that below;
- bias field: the spread of the heavily smoothed log intensity inside the foreground, after the tissue
  contrast is smoothed away (a figure, recorded; N4 runs on the raw path regardless, see preprocess).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from imaging.sitk_bridge import resample
from imaging.study import Study, Volume

DETECTION_VERSION = "1"
CORNER_FRACTION = 0.08  # each corner block spans this fraction of every axis
NOISE_QUANTILE = 0.999  # of the background: the floor above which a voxel is signal
SKULL_STRIPPED_MAX_ML = 2600.0
ALIGNED_MIN_DICE = 0.95
BIAS_SMOOTH_MM = 20.0
COARSE_MM = 4.0  # detection figures on a grid of about this spacing (a subsample): litres need no finer


def noise_floor(data: np.ndarray) -> float:
    """The intensity below which a voxel is background, from the four darkest of the eight corners."""
    sizes = [max(2, int(round(s * CORNER_FRACTION))) for s in data.shape]
    corners = []
    for cx in (slice(0, sizes[0]), slice(-sizes[0], None)):
        for cy in (slice(0, sizes[1]), slice(-sizes[1], None)):
            for cz in (slice(0, sizes[2]), slice(-sizes[2], None)):
                corners.append(np.asarray(data[cx, cy, cz], dtype=np.float32).ravel())
    darkest = sorted(corners, key=lambda c: float(np.median(c)))[:4]
    values = np.concatenate(darkest)
    return max(float(np.quantile(values, NOISE_QUANTILE)), 0.0)


def foreground(data: np.ndarray, floor: float) -> np.ndarray:
    """Signal above the noise floor. With an exact-zero background this is "non-zero" (the BraTS rule);
    above a noise floor, isolated noise voxels are opened away and the largest body kept. Holes filled."""
    if floor <= 0:
        return ndimage.binary_fill_holes(np.abs(data) > 1e-6)
    mask = ndimage.binary_opening(data > floor, structure=ndimage.generate_binary_structure(3, 1))
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def bias_nonuniformity(data: np.ndarray, mask: np.ndarray, spacing_mm: float) -> float:
    """Std of the smoothed log intensity inside the (eroded) mask: ~0.05 with no bias, higher with one."""
    inner = ndimage.binary_erosion(mask, iterations=2)
    if inner.sum() < 100:
        return 0.0
    logi = np.where(inner, np.log(np.clip(data, 1e-3, None)), 0.0)
    sigma = BIAS_SMOOTH_MM / spacing_mm
    num = ndimage.gaussian_filter(logi, sigma)
    den = ndimage.gaussian_filter(inner.astype(np.float64), sigma)
    smooth = num[inner] / np.clip(den[inner], 1e-6, None)
    return float(smooth.std())


@dataclass
class StudyProfile:
    reference: str
    noise_floor: dict[str, float]
    foreground_ml: float
    skull_stripped: bool
    overlap_dice: dict[str, float] = field(default_factory=dict)
    misaligned: list[str] = field(default_factory=list)
    same_grid: bool = True
    bias_nonuniformity: float = 0.0

    @property
    def noisy_background(self) -> bool:
        return any(v > 0 for v in self.noise_floor.values())

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(version=DETECTION_VERSION, noisy_background=self.noisy_background,
                   thresholds={"skull_stripped_max_ml": SKULL_STRIPPED_MAX_ML, "aligned_min_dice": ALIGNED_MIN_DICE,
                               "noise_quantile": NOISE_QUANTILE})  # fmt: skip
        return out


def _coarse(volume: Volume) -> Volume:
    stride = max(1, int(COARSE_MM // max(volume.spacing)))
    if stride == 1:
        return volume
    affine = volume.affine.copy()
    affine[:3, :3] = affine[:3, :3] * stride
    return Volume(np.asarray(volume.data)[::stride, ::stride, ::stride], affine)


def detect(study: Study) -> StudyProfile:
    ref_name = study.reference_name
    floors = {m: round(noise_floor(study.images[m].data), 3) for m in study.present}
    coarse = {m: _coarse(study.images[m]) for m in study.present}
    ref = coarse[ref_name]
    ref_fg = foreground(ref.data, floors[ref_name])
    voxel_ml = float(np.prod(ref.spacing)) / 1000.0
    fg_ml = float(ref_fg.sum()) * voxel_ml
    overlap, misaligned = {}, []
    same_grid = all(study.images[m].same_grid(study.images[ref_name]) for m in study.present)
    for name in study.present:
        if name == ref_name:
            continue
        vol = coarse[name]
        fg = foreground(vol.data, floors[name]).astype(np.int16)
        on_ref = fg.astype(bool) if vol.same_grid(ref) else resample(Volume(fg, vol.affine), ref.shape, ref.affine, order=0) > 0
        overlap[name] = round(dice(on_ref, ref_fg), 4)
        if overlap[name] < ALIGNED_MIN_DICE:
            misaligned.append(name)
    bias = bias_nonuniformity(np.asarray(ref.data, dtype=np.float32), ref_fg, float(np.mean(ref.spacing)))
    return StudyProfile(
        reference=ref_name, noise_floor=floors, foreground_ml=round(fg_ml, 1),
        skull_stripped=fg_ml <= SKULL_STRIPPED_MAX_ML, overlap_dice=overlap, misaligned=misaligned,
        same_grid=same_grid, bias_nonuniformity=round(bias, 4),
    )  # fmt: skip
