"""Raw scanner phantoms: the same glioma case as `imaging.phantoms`, as a scanner would write it.

A raw case starts from the BraTS-style twin (`phantoms.make_case` with the same seed and index: same
tumour, labels, clinical values) and adds what preprocessing must undo, each with its truth recorded:
- a head around the brain: outer CSF, skull (cortical bone and marrow), scalp (muscle and fat) and a
  neck with a vertebral column, with contrasts per modality;
- a person-specific head size (an anisotropic scaling, 0.92-1.08 per axis, so two heads differ);
- a random head pose (rotation up to 12 degrees per axis, translation up to 10 mm) and, per modality
  other than the reference, a misregistration (up to 3 degrees, 3 mm): patient motion between series;
- a smooth multiplicative bias field (about +-25 %);
- Rician noise everywhere (the magnitude of complex Gaussian noise), so the background is not zero;
- per-modality scanner grids, axis-aligned in the scanner's world, with thicker slices for T2/FLAIR.
Truth written beside the images: the brain mask and segmentation on the reference modality's grid
(`_brainmask.nii.gz`, `_seg.nii.gz`) and every transform (in phantoms.json, RAS mm, canonical ->
scanner). Same seed, same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage

from imaging import nifti
from imaging.dataset import clinical_row, write_case
from imaging.phantoms import load_anatomy, make_case, write_dataset
from imaging.study import MODALITIES, Study, Volume

# Extra-cerebral tissue contrasts (same arbitrary units as phantoms.CONTRAST).
TISSUE = {
    "fat": {"t1": 0.95, "t1ce": 0.95, "t2": 0.72, "flair": 0.70},
    "muscle": {"t1": 0.42, "t1ce": 0.48, "t2": 0.30, "flair": 0.34},
    "bone": {"t1": 0.04, "t1ce": 0.04, "t2": 0.03, "flair": 0.03},
    "marrow": {"t1": 0.70, "t1ce": 0.72, "t2": 0.45, "flair": 0.42},
    "csf": {"t1": 0.25, "t1ce": 0.25, "t2": 1.00, "flair": 0.12},
}
SLICE_MM = {"t1": 2.0, "t1ce": 2.0, "t2": 3.0, "flair": 4.0}  # scanner slice spacing at 2 mm in-plane
FOV_MM = (240.0, 240.0, 236.0)
PAD_MM = {"side": 24.0, "top": 20.0, "bottom": 64.0}
NOISE_SIGMA = 0.02  # of the brain's white-matter intensity


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int = 5) -> np.ndarray:
    """A smooth random field in about [-1, 1] (coarse noise, trilinear upsampling: cheap on big grids)."""
    coarse = ndimage.gaussian_filter(rng.standard_normal((cells + 2,) * 3), 0.7)[1:-1, 1:-1, 1:-1]
    field = ndimage.zoom(coarse.astype(np.float32), [s / cells for s in shape], order=1)[: shape[0], : shape[1], : shape[2]]
    return field / (np.abs(field).max() + 1e-6)


def rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid(angles_deg, shift_mm, centre_mm) -> np.ndarray:
    """A 4x4 rotation about `centre_mm` followed by a shift (world mm -> world mm)."""
    m = np.eye(4)
    r = rotation(np.asarray(angles_deg, dtype=float))
    m[:3, :3] = r
    m[:3, 3] = np.asarray(centre_mm) - r @ np.asarray(centre_mm) + np.asarray(shift_mm)
    return m


def _padded_grid(resolution_mm: float) -> tuple[np.ndarray, tuple[int, int, int], tuple[slice, ...]]:
    """The MNI grid grown by a margin for the head and neck; returns affine, shape, the brain's slot."""
    anat = load_anatomy(resolution_mm)
    side, top, bottom = (int(round(PAD_MM[k] / resolution_mm)) for k in ("side", "top", "bottom"))
    shape = (anat.shape[0] + 2 * side, anat.shape[1] + 2 * side, anat.shape[2] + bottom + top)
    affine = anat.affine.copy()
    affine[:3, 3] = anat.affine[:3, 3] - anat.affine[:3, :3] @ np.array([side, side, bottom])
    slot = (slice(side, side + anat.shape[0]), slice(side, side + anat.shape[1]), slice(bottom, bottom + anat.shape[2]))
    return affine, shape, slot


def _head_tissues(rng: np.random.Generator, brain: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean tissue maps around a brain mask: outer CSF, bone, marrow, muscle, fat (and the neck)."""
    spacing = float(np.linalg.norm(affine[:3, 0]))
    dist = ndimage.distance_transform_edt(~brain) * spacing
    vary = _smooth_noise(rng, brain.shape, cells=5)
    csf_t = 2.0 + 0.8 * vary
    bone_t = 6.5 + 1.5 * _smooth_noise(rng, brain.shape, cells=5)
    scalp_t = 6.0 + 2.0 * _smooth_noise(rng, brain.shape, cells=5)
    outer_csf = (dist > 0) & (dist <= csf_t)
    skull = (dist > csf_t) & (dist <= csf_t + bone_t)
    depth_in_skull = (dist - csf_t) / bone_t
    marrow = skull & (depth_in_skull > 0.35) & (depth_in_skull < 0.65)
    scalp = (dist > csf_t + bone_t) & (dist <= csf_t + bone_t + scalp_t)
    depth_in_scalp = (dist - csf_t - bone_t) / scalp_t
    muscle = scalp & (depth_in_scalp < 0.4)
    fat = scalp & ~muscle
    # The neck: an elliptic column below the brain, with a fat rim and a vertebral column.
    idx = np.indices(brain.shape, dtype=np.float32)
    centre = np.argwhere(brain).mean(0)
    z_low = np.argwhere(brain)[:, 2].min()
    z_neck_top = z_low + int(round(30 / spacing))
    a, b = 52 / spacing, 58 / spacing
    ell = ((idx[0] - centre[0]) / a) ** 2 + ((idx[1] - centre[1] + 8 / spacing) / b) ** 2
    column = (idx[2] <= z_neck_top) & (ell <= 1.0) & (dist > csf_t + bone_t + scalp_t)
    rim = column & (ell > 0.8)
    spine = ((idx[0] - centre[0]) ** 2 + (idx[1] - centre[1] + 30 / spacing) ** 2) <= (9 / spacing) ** 2
    spine &= (idx[2] <= z_low + 6 / spacing)
    fat |= rim
    muscle |= column & ~rim & ~spine
    skull |= spine
    return {"csf": outer_csf, "bone": skull & ~marrow, "marrow": marrow, "muscle": muscle & ~skull, "fat": fat & ~skull}


def _scanner_grid(fov_mm, slice_mm: float, inplane_mm: float, centre_mm: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    spacing = np.array([inplane_mm, inplane_mm, slice_mm])
    shape = tuple(int(round(f / s)) for f, s in zip(fov_mm, spacing))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = centre_mm - (np.array(shape) - 1) / 2 * spacing
    return affine, shape  # type: ignore[return-value]


def _sample(canon: np.ndarray, canon_affine: np.ndarray, to_scanner: np.ndarray,
            out_affine: np.ndarray, out_shape, order: int) -> np.ndarray:  # fmt: skip
    """Scanner voxel -> scanner world -> canonical world (inverse transform) -> canonical voxel."""
    m = np.linalg.inv(canon_affine) @ np.linalg.inv(to_scanner) @ out_affine
    return ndimage.affine_transform(canon, m[:3, :3], m[:3, 3], output_shape=out_shape, order=order, mode="constant", cval=0.0)


def make_raw_case(seed: int, index: int, resolution_mm: float = 2.0) -> tuple[Study, Volume, dict]:
    """A raw scanner study of phantom case (seed, index), its true brain mask (reference grid), its record."""
    twin, record = make_case(seed, index, sites=1, resolution_mm=resolution_mm)
    rng = np.random.default_rng([seed, index, 271828])
    anat = load_anatomy(resolution_mm)
    affine, shape, slot = _padded_grid(resolution_mm)
    brain = np.zeros(shape, dtype=bool)
    brain[slot] = anat.mask
    tissues = _head_tissues(rng, brain, affine)
    bias = 1 + 0.25 * _smooth_noise(rng, shape, cells=3)
    seg = np.zeros(shape, dtype=np.uint8)
    seg[slot] = twin.segmentation.data  # type: ignore[union-attr]
    centre = affine[:3, :3] @ np.argwhere(brain).mean(0) + affine[:3, 3]

    scale = np.eye(4)
    s = rng.uniform(0.92, 1.08, 3)
    scale[:3, :3] = np.diag(s)
    scale[:3, 3] = centre - s * centre
    pose = rigid(rng.uniform(-12, 12, 3), rng.uniform(-10, 10, 3), centre) @ scale
    reference = "t1ce" if "t1ce" in twin.images else twin.present[0]
    transforms, images = {}, {}
    for modality in twin.present:
        motion = np.eye(4) if modality == reference else rigid(rng.uniform(-3, 3, 3), rng.uniform(-3, 3, 3), centre)
        to_scanner = motion @ pose
        canon = np.zeros(shape, dtype=np.float32)
        canon[slot] = twin.images[modality].data.astype(np.float32) / 1000.0
        for tissue, where in tissues.items():
            canon[where] = TISSUE[tissue][modality] * (1 + 0.03 * rng.standard_normal(int(where.sum())))
        canon *= bias
        out_affine, out_shape = _scanner_grid(FOV_MM, SLICE_MM[modality] * resolution_mm / 2.0, resolution_mm,
                                              centre + rng.uniform(-6, 6, 3))  # fmt: skip
        img = _sample(canon, affine, to_scanner, out_affine, out_shape, order=1)
        real = img + rng.normal(0, NOISE_SIGMA, img.shape)
        imag = rng.normal(0, NOISE_SIGMA, img.shape)
        images[modality] = Volume(np.clip(np.round(np.hypot(real, imag) * 1000), 0, 32767).astype(np.int16), out_affine)
        transforms[modality] = np.round(to_scanner, 6).tolist()
        if modality == reference:
            ref_affine, ref_shape, ref_transform = out_affine, out_shape, to_scanner
    truth_brain = _sample(brain.astype(np.float32), affine, ref_transform, ref_affine, ref_shape, order=1) > 0.5
    truth_seg = _sample(seg, affine, ref_transform, ref_affine, ref_shape, order=0).astype(np.uint8)
    study = Study(case_id=twin.case_id, images=images, site="raw-scanner", age=twin.age, sex=twin.sex,
                  segmentation=Volume(truth_seg, ref_affine), labels=twin.labels)  # fmt: skip
    record.update(raw=True, reference=reference, transforms_ras=transforms, head_scale=np.round(s, 4).tolist(),
                  slice_mm={m: SLICE_MM[m] * resolution_mm / 2.0 for m in twin.present},
                  noise_sigma=NOISE_SIGMA, bias_amplitude=0.25)  # fmt: skip
    return study, Volume(truth_brain.astype(np.uint8), ref_affine), record


def synthesise_raw(
    out: str | Path,
    n: int,
    seed: int,
    resolution_mm: float = 2.0,
    progress: Callable[[int, int], None] = lambda done, total: None,
    workers: int = 1,
) -> Path:
    """Write raw phantoms in the BraTS layout plus `<case>_brainmask.nii.gz`; built aside, moved whole."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: already exists and is not empty")
    if n < 1:
        raise ValueError("need n >= 1")

    meta = {"generator": "oncoserve.raw_phantoms", "seed": seed, "n": n, "raw": True,
            "resolution_mm": resolution_mm, "modalities": list(MODALITIES)}  # fmt: skip
    return write_dataset(out, n, partial(_build_raw_case, seed=seed, resolution_mm=resolution_mm), meta, progress, workers)


def _build_raw_case(i: int, staging: Path, *, seed: int, resolution_mm: float) -> tuple[dict, dict]:
    """Raw case i and its true brain mask written into `staging`; its clinical row and record."""
    study, brain, record = make_raw_case(seed, i, resolution_mm)
    folder = write_case(staging, study)
    nifti.save(brain, folder / f"{study.case_id}_brainmask.nii.gz", dtype="uint8")
    return clinical_row(study), record
