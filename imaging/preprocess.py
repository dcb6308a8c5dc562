"""Study -> model grid, and model outputs -> the study's own grid. One code path for training and serving.

Preprocessing v2 (PREPROCESSING_VERSION, recorded with every model; every step, why it ran and its
figures are recorded in every prediction as `findings.quality.preprocessing`):
1. Detect (imaging.detect): noise floor per modality, skull-stripped or not, aligned or not.
   A skull-stripped study takes the fast path; a raw head (skull, scalp, neck) the full path.
2. Co-register (imaging.register): every modality to the reference (T1ce when present), rigid Mattes MI;
   on the raw path always, on the fast path only the modalities detection found misaligned.
3. Skull-strip (imaging.skullstrip, raw path): deepbet (or HD-BET from configured weights) on the
   T1-weighted image; on the fast path the brain is the foreground above the noise floor.
4. Model grid: RAS, isotropic `spacing` mm, fixed `shape`, centred on the brain; each modality is
   resampled onto it once (SimpleITK), through its registration transform when it has one.
5. N4 bias-field correction (imaging.bias) on the raw path, inside the brain mask.
6. Per-modality z-score inside the brain mask; zero outside. Missing modalities: zero channels and a 0
   in the presence vector.
7. Quality control (imaging.quality): brain volume and shape, registration per modality, the brain
   inside the model grid. A failure refuses the study (QualityError names the check) or, with
   quality_mode="flag", is recorded in `flags` and the study goes on.
A BraTS-style study (skull-stripped, exact-zero background, one grid) takes v1's steps: the same mask
rule and normalisation, resampling equal to v1's scipy path within float rounding (SimpleITK extrapolates
the field of view's outer half-voxel, where such studies are background), the grid centred on T1ce.
The inverse maps label maps (nearest neighbour), boxes and points back to the study's reference grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from imaging import quality
from imaging.bias import n4_correct
from imaging.detect import StudyProfile, detect, foreground
from imaging.errors import StudyError
from imaging.register import register_rigid
from imaging.sitk_bridge import resample
from imaging.skullstrip import extractor
from imaging.study import MODALITIES, Study, Volume

PREPROCESSING_VERSION = "2.0"
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
    skull_strip: str = "deepbet"  # or "hd-bet" (needs hdbet_weights)
    hdbet_weights: str | None = None
    quality_mode: str = "refuse"  # or "flag": QC failures are recorded and the study goes on
    threads: int = 2  # SimpleITK and the skull-stripping model

    def __post_init__(self) -> None:
        from imaging.skullstrip import SKULL_STRIP_METHODS

        if self.quality_mode not in quality.QUALITY_MODES:
            raise StudyError(f"quality_mode={self.quality_mode!r}: expected one of {', '.join(quality.QUALITY_MODES)}")
        if self.skull_strip not in SKULL_STRIP_METHODS:
            raise StudyError(f"skull_strip={self.skull_strip!r}: expected one of {', '.join(SKULL_STRIP_METHODS)}")

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
    record: dict = field(default_factory=dict)  # findings.quality.preprocessing: steps, figures, versions
    flags: list[str] = field(default_factory=list)  # QC checks that failed (quality_mode="flag")


def _bbox_centre_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    fg = np.argwhere(mask)
    if fg.size == 0:
        raise StudyError("reference volume is empty (no voxel above the background)")
    # An integer voxel: when the study is already RAS at the model spacing, both grids coincide exactly.
    centre_vox = np.round((fg.min(0) + fg.max(0)) / 2.0)
    return Grid(mask.shape, affine).vox_to_world(centre_vox)[0]


def model_grid(brain_on_reference: np.ndarray, reference: Volume, config: PreprocessConfig) -> Grid:
    centre = _bbox_centre_mm(brain_on_reference, reference.affine)
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


def _resample(volume: Volume, grid: Grid, order: int, transform=None, threads: int = 0) -> np.ndarray:
    return resample(volume, grid.shape, grid.affine, order=order, transform=transform, threads=threads)


def check_geometry(study: Study, config: PreprocessConfig) -> None:
    ref_name = study.reference_name
    ref = study.images[ref_name]
    for name in study.present:
        vol = study.images[name]
        if name == ref_name:
            continue
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


def _step(record: list, name: str, t0: float, **figures) -> None:
    record.append({"step": name, "seconds": round(time.perf_counter() - t0, 3), **figures})


def preprocess(study: Study, config: PreprocessConfig = PreprocessConfig()) -> PreparedStudy:
    check_plausible(study)
    check_geometry(study, config)
    steps: list[dict] = []
    t0 = time.perf_counter()
    profile: StudyProfile = detect(study)
    raw = not profile.skull_stripped
    path = "raw" if raw else "fast"
    _step(steps, "detect", t0, path=path, why=("foreground of %.0f mL: a head, not a skull-stripped brain" if raw else
          "foreground of %.0f mL: skull-stripped") % profile.foreground_ml, **profile.to_json())  # fmt: skip
    ref_name = profile.reference
    ref = study.images[ref_name]
    head_on_ref = foreground(ref.data, profile.noise_floor[ref_name])
    checks: list[quality.Check] = []

    # 2. co-registration (one transform per moving modality; applied once, at resampling)
    transforms = {}
    moving = [m for m in study.present if m != ref_name] if raw else list(profile.misaligned)
    for name in moving:
        t0 = time.perf_counter()
        reg = register_rigid(ref, study.images[name], name, head_on_ref)
        transforms[name] = reg.transform
        _step(steps, "register", t0, modality=name, reference=ref_name,
              why="raw path: every modality" if raw else f"overlap Dice {profile.overlap_dice[name]:.3f} < aligned threshold",
              **reg.to_json())  # fmt: skip
        checks.append(quality.registration_check(reg))
    if not moving:
        steps.append({"step": "register", "skipped": True, "why": "modalities aligned (foreground overlap) on the fast path"})
    quality.enforce(study.case_id, checks, config.quality_mode)  # a series of another head: refused before stripping

    # 3. brain mask on the reference grid
    t0 = time.perf_counter()
    if raw:
        bet = extractor(config.skull_strip, config.hdbet_weights)
        source = "t1" if "t1" in study.images else ref_name
        img = study.images[source]
        if source != ref_name:
            img = Volume(resample(img, ref.shape, ref.affine, order=1, transform=transforms.get(source)), ref.affine)
        brain_on_ref = bet.extract(img)
        _step(steps, "skull_strip", t0, on=source, why="raw path", brain_ml=round(float(brain_on_ref.sum()) * _voxel_ml(ref), 1),
              **bet.describe())  # fmt: skip
    else:
        brain_on_ref = head_on_ref
        steps.append({"step": "skull_strip", "skipped": True, "why": "already skull-stripped: the brain is the "
                      "foreground above the noise floor"})  # fmt: skip

    # 4. one resampling per modality onto the model grid
    t0 = time.perf_counter()
    grid = model_grid(brain_on_ref, ref, config)
    channels = np.zeros((len(MODALITIES), *grid.shape), dtype=np.float32)
    presence = np.zeros(len(MODALITIES), dtype=np.float32)
    for i, modality in enumerate(MODALITIES):
        if modality in study.images:
            channels[i] = _resample(study.images[modality], grid, 1, transforms.get(modality), config.threads)
            presence[i] = 1.0
    if raw:
        mask = _resample(Volume(brain_on_ref.astype(np.int16), ref.affine), grid, 0) > 0
    elif not profile.noisy_background:
        mask = ndimage.binary_fill_holes(np.any(np.abs(channels) > 1e-6, axis=0))  # v1's rule, exactly
    else:
        floors = [profile.noise_floor[m] for m in MODALITIES if m in study.images]
        present = [channels[i] for i in np.flatnonzero(presence)]
        mask = np.zeros(grid.shape, dtype=bool)
        for image, floor in zip(present, floors):
            mask |= foreground(image, floor)
        mask = foreground(mask.astype(np.float32), 0.5)
    _step(steps, "resample", t0, spacing_mm=config.spacing_mm, shape=list(config.shape), interpolation="linear (SimpleITK)",
          transforms=sorted(transforms))  # fmt: skip
    if mask.sum() < 100:
        raise StudyError(f"{study.case_id}: fewer than 100 brain voxels inside the model grid")

    # 5. bias field
    if raw:
        t0 = time.perf_counter()
        fields = {}
        for i in np.flatnonzero(presence):
            channels[i], fields[MODALITIES[i]] = n4_correct(channels[i], mask, grid.affine)
        _step(steps, "n4", t0, why="raw path (bias nonuniformity %.3f)" % profile.bias_nonuniformity, field=fields)
    else:
        steps.append({"step": "n4", "skipped": True, "why": "fast path: skull-stripped data are bias-corrected upstream "
                      "(nonuniformity %.3f recorded)" % profile.bias_nonuniformity})  # fmt: skip

    # 6. normalise
    for i in np.flatnonzero(presence):
        values = channels[i][mask]
        std = float(values.std())
        channels[i] = np.where(mask, (channels[i] - values.mean()) / (std if std > 1e-6 else 1.0), 0.0)
    steps.append({"step": "normalise", "method": "z-score inside the brain mask"})

    # 7. quality control
    voxel_ml = config.spacing_mm**3 / 1000.0
    checks += [quality.brain_volume_check(float(mask.sum()) * voxel_ml), quality.brain_shape_check(mask),
               quality.grid_overlap_check(brain_on_ref, ref.affine, grid)]  # fmt: skip
    flags = quality.enforce(study.case_id, checks, config.quality_mode)

    seg = None
    if study.segmentation is not None:
        seg = _resample(study.segmentation, grid, 0).astype(np.uint8)
    record = {"version": config.version, "path": path, "reference": ref_name, "steps": steps,
              "checks": [c.to_json() for c in checks], "quality_mode": config.quality_mode, **study.provenance}  # fmt: skip
    return PreparedStudy(
        image=channels,
        presence=presence,
        brain_mask=mask,
        grid=grid,
        source=Grid(ref.shape, ref.affine),
        version=config.version,
        segmentation=seg,
        record=record,
        flags=flags,
    )


def _voxel_ml(volume: Volume) -> float:
    return float(np.prod(volume.spacing)) / 1000.0


# -- inverse: model grid -> the study's own grid ------------------------------------------------------
def _axis_gather(labels: np.ndarray, grid: Grid, target: Grid) -> np.ndarray | None:
    """Nearest neighbour between two axis-aligned grids (diagonal affines) as one index gather per
    axis; None when either grid is oblique or permuted (the general resampler handles those)."""
    a, b = grid.affine[:3, :3], target.affine[:3, :3]
    if np.count_nonzero(np.abs(a) > 1e-9) != 3 or np.count_nonzero(np.abs(b) > 1e-9) != 3:
        return None
    if not (np.allclose(a, np.diag(np.diag(a))) and np.allclose(b, np.diag(np.diag(b)))):
        return None
    index = []
    for axis in range(3):
        world = b[axis, axis] * np.arange(target.shape[axis]) + target.affine[axis, 3]
        # floor(x + 0.5): ITK's nearest-neighbour rounding, so both paths agree on ties too
        index.append(np.floor((world - grid.affine[axis, 3]) / a[axis, axis] + 0.5).astype(np.int64))
    valid = [(i >= 0) & (i < n) for i, n in zip(index, labels.shape)]
    safe = [np.clip(i, 0, n - 1) for i, n in zip(index, labels.shape)]
    out = labels[np.ix_(*safe)]
    out[~(valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :])] = 0
    return out


def labels_to_source(labels: np.ndarray, prepared: PreparedStudy) -> Volume:
    """A label map on the model grid, resampled (nearest neighbour) onto the study's reference grid:
    an index gather when both grids are axis-aligned (the usual case), else SimpleITK's resampler."""
    back = _axis_gather(np.asarray(labels), prepared.grid, prepared.source)
    if back is None:
        vol = Volume(labels.astype(np.int16), prepared.grid.affine)
        back = _resample(vol, prepared.source, order=0)
    return Volume(back.astype(np.uint8), prepared.source.affine)


def points_to_source(points_vox: np.ndarray, prepared: PreparedStudy) -> np.ndarray:
    """Voxel coordinates on the model grid -> voxel coordinates on the study's reference grid."""
    return prepared.source.world_to_vox(prepared.grid.vox_to_world(points_vox))


def box_to_source(box_vox: np.ndarray, prepared: PreparedStudy) -> np.ndarray:
    """[x0,y0,z0,x1,y1,z1] on the model grid -> the enclosing box on the reference grid (any orientation)."""
    lo, hi = np.asarray(box_vox[:3], float), np.asarray(box_vox[3:], float)
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
    mapped = points_to_source(corners, prepared)
    return np.concatenate([mapped.min(0), mapped.max(0)])
