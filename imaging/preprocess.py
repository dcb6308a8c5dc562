"""Study -> model grid, and model outputs -> the study's own grid. One code path for training and serving.

Steps (versioned as PREPROCESSING_VERSION, recorded with every model and prediction):
1. A model grid: RAS-aligned, isotropic `spacing` mm, fixed `shape`, centred on the brain.
   Defining it in world (mm) coordinates does reorientation, resampling and crop/pad in one step.
2. Each present modality is resampled from its own affine onto that grid (nibabel's
   `resample_from_to`, trilinear), so modalities with different geometry are aligned explicitly.
3. Brain mask: voxels where any modality is non-zero (inputs are skull-stripped, as in BraTS),
   holes filled.
4. Per-modality z-score inside the mask; zero outside.
5. Missing modalities: zero channels and a 0 in the presence vector.
The inverse maps label maps (nearest neighbour), boxes and points back to the study's reference grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from scipy import ndimage

from imaging.errors import StudyError
from imaging.study import MODALITIES, Study, Volume

PREPROCESSING_VERSION = "1.0"
DEFAULT_SPACING_MM = 2.0
DEFAULT_SHAPE = (96, 112, 96)
# Fraction of a modality's field of view that must overlap the reference modality's.
MIN_FOV_OVERLAP = 0.5
MIN_FOV_MM, MAX_FOV_MM = 60.0, 600.0  # per axis, of any input volume


@dataclass(frozen=True)
class PreprocessConfig:
    spacing_mm: float = DEFAULT_SPACING_MM
    shape: tuple[int, int, int] = DEFAULT_SHAPE
    mismatched_geometry: str = "resample"  # or "refuse": modalities must share the reference grid

    @property
    def version(self) -> str:
        return f"{PREPROCESSING_VERSION}/{self.spacing_mm:g}mm/{'x'.join(map(str, self.shape))}"


@dataclass(frozen=True)
class Grid:
    shape: tuple[int, int, int]
    affine: np.ndarray

    def vox_to_world(self, points: np.ndarray) -> np.ndarray:
        pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
        return pts @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_vox(self, points: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(self.affine)
        pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
        return pts @ inv[:3, :3].T + inv[:3, 3]


@dataclass
class PreparedStudy:
    image: np.ndarray  # (4, X, Y, Z) float32, channels in MODALITIES order
    presence: np.ndarray  # (4,) float32: 1 present, 0 missing
    brain_mask: np.ndarray  # (X, Y, Z) bool
    grid: Grid  # the model grid
    source: Grid  # the study's reference grid (outputs go back here)
    version: str
    segmentation: np.ndarray | None = None  # (X, Y, Z) uint8 labels on the model grid, when known


def _foreground_centre_mm(volume: Volume) -> np.ndarray:
    fg = np.argwhere(volume.data != 0)
    if fg.size == 0:
        raise StudyError("reference volume is empty (all voxels zero)")
    # An integer voxel: when the study is already RAS at the model spacing, both grids coincide exactly.
    centre_vox = np.round((fg.min(0) + fg.max(0)) / 2.0)
    return Grid(volume.shape, volume.affine).vox_to_world(centre_vox)[0]


def model_grid(study: Study, config: PreprocessConfig) -> Grid:
    centre = _foreground_centre_mm(study.reference)
    shape = np.array(config.shape)
    affine = np.diag([config.spacing_mm] * 3 + [1.0])
    affine[:3, 3] = centre - (shape // 2) * config.spacing_mm
    return Grid(tuple(int(s) for s in shape), affine)


def _fov_overlap(a: Volume, b: Volume) -> float:
    """Fraction of `a`'s world bounding box covered by `b`'s."""

    def box(v: Volume) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array(np.meshgrid(*[[0, s - 1] for s in v.shape], indexing="ij")).reshape(3, -1).T
        world = Grid(v.shape, v.affine).vox_to_world(corners)
        return world.min(0), world.max(0)

    (alo, ahi), (blo, bhi) = box(a), box(b)
    inter = np.clip(np.minimum(ahi, bhi) - np.maximum(alo, blo), 0, None).prod()
    return float(inter / max(np.prod(ahi - alo), 1e-9))


def _resample(volume: Volume, grid: Grid, order: int) -> np.ndarray:
    img = nib.Nifti1Image(np.asarray(volume.data, dtype=np.float32 if order else np.int16), volume.affine)
    out = resample_from_to(img, (grid.shape, grid.affine), order=order, mode="constant", cval=0.0)
    return np.asarray(out.dataobj)


def check_geometry(study: Study, config: PreprocessConfig) -> None:
    ref_name = study.present[0]
    ref = study.images[ref_name]
    for name in study.present[1:]:
        vol = study.images[name]
        if vol.same_grid(ref):
            continue
        if config.mismatched_geometry == "refuse":
            raise StudyError(
                f"{study.case_id}: {name} geometry {vol.shape} differs from {ref_name} {ref.shape}; "
                "refusing (mismatched_geometry=refuse)"
            )
        if _fov_overlap(vol, ref) < MIN_FOV_OVERLAP:
            raise StudyError(
                f"{study.case_id}: {name} does not overlap {ref_name} in space "
                f"({_fov_overlap(vol, ref):.0%} of its field of view); not the same study?"
            )


def check_plausible(study: Study) -> None:
    """Refuse what cannot be a head MRI before any work: a blank image, or a field of view far outside
    what a head scan covers (a few mm, or metres: wrong units or a non-image)."""
    for name in study.present:
        vol = study.images[name]
        extent = np.asarray(vol.shape) * np.asarray(vol.spacing)
        if extent.min() < MIN_FOV_MM or extent.max() > MAX_FOV_MM:
            raise StudyError(
                f"{study.case_id}: {name} covers {' x '.join(f'{e:.0f}' for e in extent)} mm; a head MRI covers "
                f"{MIN_FOV_MM:.0f}-{MAX_FOV_MM:.0f} mm per axis (wrong voxel size in the header?)"
            )
        low, high = float(vol.data.min()), float(vol.data.max())
        if high - low <= 0:
            raise StudyError(f"{study.case_id}: {name} is blank (every voxel is {low:g})")


def preprocess(study: Study, config: PreprocessConfig = PreprocessConfig()) -> PreparedStudy:
    check_plausible(study)
    check_geometry(study, config)
    grid = model_grid(study, config)
    channels = np.zeros((len(MODALITIES), *grid.shape), dtype=np.float32)
    presence = np.zeros(len(MODALITIES), dtype=np.float32)
    for i, modality in enumerate(MODALITIES):
        if modality in study.images:
            channels[i] = _resample(study.images[modality], grid, order=1)
            presence[i] = 1.0
    mask = ndimage.binary_fill_holes(np.any(np.abs(channels) > 1e-6, axis=0))
    if mask.sum() < 100:
        raise StudyError(f"{study.case_id}: fewer than 100 non-zero voxels inside the model grid")
    for i in np.flatnonzero(presence):
        values = channels[i][mask]
        std = float(values.std())
        channels[i] = np.where(mask, (channels[i] - values.mean()) / (std if std > 1e-6 else 1.0), 0.0)
    seg = None
    if study.segmentation is not None:
        seg = _resample(study.segmentation, grid, order=0).astype(np.uint8)
    ref = study.reference
    return PreparedStudy(
        image=channels,
        presence=presence,
        brain_mask=mask,
        grid=grid,
        source=Grid(ref.shape, ref.affine),
        version=config.version,
        segmentation=seg,
    )


# -- inverse: model grid -> the study's own grid ------------------------------------------------------
def labels_to_source(labels: np.ndarray, prepared: PreparedStudy) -> Volume:
    """A label map on the model grid, resampled (nearest neighbour) onto the study's reference grid."""
    vol = Volume(labels.astype(np.int16), prepared.grid.affine)
    back = _resample(vol, prepared.source, order=0).astype(np.uint8)
    return Volume(back, prepared.source.affine)


def points_to_source(points_vox: np.ndarray, prepared: PreparedStudy) -> np.ndarray:
    """Voxel coordinates on the model grid -> voxel coordinates on the study's reference grid."""
    return prepared.source.world_to_vox(prepared.grid.vox_to_world(points_vox))


def box_to_source(box_vox: np.ndarray, prepared: PreparedStudy) -> np.ndarray:
    """[x0,y0,z0,x1,y1,z1] on the model grid -> the enclosing box on the reference grid (any orientation)."""
    lo, hi = np.asarray(box_vox[:3], float), np.asarray(box_vox[3:], float)
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
    mapped = points_to_source(corners, prepared)
    return np.concatenate([mapped.min(0), mapped.max(0)])
