"""Synthetic glioma phantoms on the real MNI152 brain (the project's benchmark data).

Anatomy: nilearn's MNI152 2009 T1, grey/white-matter templates and brain mask (shipped with the
package, no download). Contrasts T1/T1ce/T2/FLAIR are synthesised from tissue classes.

Labels are coupled to imaging the way the glioma literature describes, each marker with a signal of
its own (not one label written in through another):
- HGG: necrotic core with ring enhancement; LGG: little or no enhancement.
- IDH-wildtype: larger enhancing fraction, deep (non-lobar) location, margins drawn wider on average
  (the two ranges overlap); IDH-mutant favours the frontal lobes and, when 1p/19q is intact
  (astrocytoma), shows the T2-FLAIR mismatch sign: a T2-bright core that is dark on FLAIR.
- 1p/19q codeletion only in IDH-mutant tumours, favouring frontal, cortical involvement, with
  calcifications (small foci dark on T2 and T1ce) in the tumour.
- MGMT methylation: a weak imaging signal only (slightly brighter oedema on FLAIR).
- Overall survival: a Weibull model of age, grade, IDH, MGMT and image-borne terms (tumour volume,
  multifocality) that age does not carry, with censoring.
Site effects that survive a z-score (per-sequence gamma, blur, correlated noise texture, slice
thickness, besides intensity scale/offset and bias field), label missingness as in real cohorts
(1p/19q tested mostly when IDH-mutant, MGMT mostly in high grade), missing modalities and optional
out-of-distribution cases are all drawn from the seed: same seed, same bytes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from scipy import ndimage

from imaging.dataset import clinical_row, write_case, write_clinical
from imaging.labels import ED, ET, NCR
from imaging.study import MODALITIES, Labels, Study, Volume

# Tissue intensities per modality (arbitrary units before site scaling): csf, gm, wm, ncr, et, ed.
CONTRAST = {
    "t1": dict(csf=0.25, gm=0.62, wm=0.85, ncr=0.30, et=0.55, ed=0.55),
    "t1ce": dict(csf=0.25, gm=0.64, wm=0.86, ncr=0.28, et=1.30, ed=0.56),
    "t2": dict(csf=1.00, gm=0.62, wm=0.42, ncr=0.95, et=0.70, ed=0.86),
    "flair": dict(csf=0.12, gm=0.58, wm=0.46, ncr=0.55, et=0.78, ed=0.95),
}
# 2: marker signals of their own, site effects beyond scale, cohort-like missingness, image-borne survival.
# 1: the round-1 generator (its bytes are reproduced exactly: IDH written in as a fixed margin width, site
# effects a z-score cancels, random label missingness) -- kept for datasets and figures made with it.
GENERATOR_VERSION = 2
GENERATOR_VERSIONS = (1, 2)
FRONTAL_Y_MM = 5.0  # MNI y above which a centre counts as frontal (anterior to the central region)


@dataclass(frozen=True)
class Anatomy:
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray
    depth_mm: np.ndarray  # distance to the brain's surface
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.mask.shape  # type: ignore[return-value]


@lru_cache(maxsize=4)
def load_anatomy(resolution_mm: float = 2.0) -> Anatomy:
    from nilearn import datasets

    source_res = 2 if resolution_mm >= 2 else 1
    imgs = [
        datasets.load_mni152_template(resolution=source_res),
        datasets.load_mni152_gm_template(resolution=source_res),
        datasets.load_mni152_wm_template(resolution=source_res),
        datasets.load_mni152_brain_mask(resolution=source_res),
    ]
    arrays = [np.asarray(img.dataobj, dtype=np.float32) for img in imgs]
    affine = imgs[0].affine.copy()
    factor = source_res / resolution_mm
    if abs(factor - 1) > 1e-6:
        arrays = [ndimage.zoom(a, factor, order=1) for a in arrays]
        affine[:3, :3] = affine[:3, :3] / factor
    t1, gm, wm, mask = arrays
    mask = mask > 0.5
    gm, wm = np.clip(gm, 0, 1) * mask, np.clip(wm, 0, 1) * mask
    csf = np.clip(1 - gm - wm, 0, 1) * mask
    depth = ndimage.distance_transform_edt(mask) * resolution_mm
    return Anatomy(t1 * mask, gm, wm, csf, mask, depth.astype(np.float32), affine)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int = 6) -> np.ndarray:
    """A smooth random field in about [-1, 1]: coarse Gaussian noise, upsampled."""
    coarse = rng.standard_normal((cells, cells, cells)).astype(np.float32)
    field = ndimage.zoom(coarse, [s / cells for s in shape], order=3)
    field = field[: shape[0], : shape[1], : shape[2]]
    return field / (np.abs(field).max() + 1e-6)


def _mm_grid(anat: Anatomy) -> np.ndarray:
    idx = np.indices(anat.shape, dtype=np.float32).reshape(3, -1)
    return (anat.affine[:3, :3] @ idx + anat.affine[:3, 3:4]).reshape((3, *anat.shape))


@lru_cache(maxsize=4)
def _grid_cached(resolution_mm: float) -> np.ndarray:
    return _mm_grid(load_anatomy(resolution_mm))


def _draw_labels(rng: np.random.Generator, version: int = GENERATOR_VERSION) -> dict:
    hgg = rng.random() < 0.6
    mutant = rng.random() < ((0.2 if hgg else 0.7) if version >= 2 else (0.15 if hgg else 0.75))
    codeleted = mutant and rng.random() < (0.35 if hgg else 0.5)
    methylated = rng.random() < (0.8 if mutant else 0.45)
    age = float(np.clip(rng.normal(60 if hgg else 42, 12), 18, 88))
    return {
        "grade": "HGG" if hgg else "LGG",
        "idh": "mutant" if mutant else "wildtype",
        "codeletion_1p19q": "codeleted" if codeleted else "intact",
        "mgmt": "methylated" if methylated else "unmethylated",
        "age": round(age, 1),
        "sex": "F" if rng.random() < 0.45 else "M",
    }


def _pick_centre(rng: np.random.Generator, anat: Anatomy, grid: np.ndarray, lab: dict, radius_mm: float) -> np.ndarray:
    fits = anat.depth_mm > radius_mm * 0.8 + 4
    frontal = grid[1] > FRONTAL_Y_MM
    weight = fits.astype(np.float64)
    if lab["idh"] == "mutant":
        weight *= np.where(frontal, 6.0, 1.0)
        if lab["codeletion_1p19q"] == "codeleted":
            # Cortical involvement: centres nearer the surface (but the tumour still fits).
            weight *= np.where(anat.depth_mm < radius_mm * 0.8 + 14, 5.0, 1.0)
    else:
        # Non-lobar: deep white matter, basal ganglia, periventricular.
        weight *= np.where(anat.depth_mm > 28, 6.0, 1.0)
    flat = weight.ravel()
    index = rng.choice(flat.size, p=flat / flat.sum())
    return np.array(np.unravel_index(index, anat.shape), dtype=np.float32)


def _lesion(rng, anat: Anatomy, centre_vox: np.ndarray, lab: dict, radius_mm: float) -> np.ndarray:
    """One lesion's labels (0/1/2/4) from a noisy, multi-blob distance field."""
    spacing = float(np.linalg.norm(anat.affine[:3, 0]))
    idx = np.indices(anat.shape, dtype=np.float32)
    field = np.full(anat.shape, np.inf, dtype=np.float32)
    for k in range(int(rng.integers(2, 5))):
        offset = rng.normal(0, 0.35, 3) * radius_mm / spacing if k else np.zeros(3)
        axes = rng.uniform(0.7, 1.3, 3) * radius_mm / spacing * (1.0 if k == 0 else rng.uniform(0.5, 0.8))
        d = sum(((idx[i] - centre_vox[i] - offset[i]) / axes[i]) ** 2 for i in range(3))
        field = np.minimum(field, np.sqrt(d))
    wild = lab["idh"] == "wildtype"
    field = field + (0.35 if wild else 0.15) * _smooth_noise(rng, anat.shape, cells=8)
    hgg = lab["grade"] == "HGG"
    edema_r = rng.uniform(1.25, 1.6) if hgg else rng.uniform(1.1, 1.35)
    seg = np.zeros(anat.shape, dtype=np.uint8)
    seg[field < edema_r] = ED
    core = field < 1.0
    if hgg:
        necro_r = rng.uniform(0.45, 0.65) if wild else rng.uniform(0.6, 0.8)
        seg[core] = ET
        seg[field < necro_r] = NCR
    else:
        seg[core] = NCR  # non-enhancing tumour core
        if rng.random() < 0.25:
            spots = core & (_smooth_noise(rng, anat.shape, cells=10) > 0.75)
            seg[spots] = ET
    seg[~anat.mask] = 0
    return seg


def _site_params(seed: int, site: int, version: int = GENERATOR_VERSION) -> dict:
    """A scanner site. Scale and offset vanish under the z-score; gamma (contrast), blur and a
    correlated noise texture do not, so a model meets them as a real site shift."""
    rng = np.random.default_rng([seed, 7919, site])
    reference = site == 0
    if version < 2:  # scale/offset (cancelled by the z-score), noise, bias field, slice thickness only
        return {
            "scale": {m: 1.0 if reference else float(rng.uniform(0.7, 1.4)) for m in MODALITIES},
            "offset": {m: 0.0 if reference else float(rng.uniform(-0.08, 0.08)) for m in MODALITIES},
            "gamma": {m: 1.0 for m in MODALITIES}, "blur_vox": 0.0, "texture": 0.0,
            "noise": 0.02 if reference else float(rng.uniform(0.015, 0.05)),
            "bias": 0.05 if reference else float(rng.uniform(0.05, 0.25)),
            "slice_mm": 0.0 if reference else float(rng.choice([0.0, 3.0, 4.0])),
        }  # fmt: skip
    return {
        "scale": {m: 1.0 if reference else float(rng.uniform(0.7, 1.4)) for m in MODALITIES},
        "offset": {m: 0.0 if reference else float(rng.uniform(-0.08, 0.08)) for m in MODALITIES},
        "gamma": {m: 1.0 if reference else float(rng.uniform(0.75, 1.35)) for m in MODALITIES},
        "blur_vox": 0.0 if reference else float(rng.choice([0.0, 0.6, 1.0])),
        "texture": 0.0 if reference else float(rng.uniform(0.0, 0.04)),
        "noise": 0.02 if reference else float(rng.uniform(0.015, 0.05)),
        "bias": 0.05 if reference else float(rng.uniform(0.05, 0.25)),
        "slice_mm": 0.0 if reference else float(rng.choice([0.0, 3.0, 4.0])),
    }


MISMATCH_FLAIR = 0.55  # FLAIR of an astrocytoma's core relative to its T2-bright look (T2-FLAIR mismatch)
CALCIFICATION = 0.2  # intensity of a calcified focus on T2 and T1ce (oligodendroglioma)


def _synthesise(rng, anat: Anatomy, seg: np.ndarray, lab: dict, site: dict, version: int = GENERATOR_VERSION) -> dict[str, np.ndarray]:
    wild = lab.get("idh") == "wildtype"
    v2 = version >= 2
    mutant, codeleted = v2 and lab.get("idh") == "mutant", lab.get("codeletion_1p19q") == "codeleted"
    # Poorly defined margins (IDH-wildtype, on average): a wider transition between tumour and brain.
    margin = float(rng.uniform(1.0, 1.9) if wild else rng.uniform(0.5, 1.3)) if v2 else (1.6 if wild else 0.7)
    members = {
        name: ndimage.gaussian_filter((seg == value).astype(np.float32), margin)
        for name, value in (("ncr", NCR), ("et", ET), ("ed", ED))
    }
    tumour = np.clip(members["ncr"] + members["et"] + members["ed"], 0, 1)
    texture = 1 + 0.04 * _smooth_noise(rng, anat.shape, cells=12)
    bias = 1 + site["bias"] * _smooth_noise(rng, anat.shape, cells=3)
    calcified = np.zeros(anat.shape, np.float32)
    if mutant and codeleted:  # small foci inside the tumour
        spots = (seg > 0) & (ndimage.gaussian_filter(rng.standard_normal(anat.shape).astype(np.float32), 0.8) > 0.45)
        calcified = spots.astype(np.float32)
    site_texture = ndimage.gaussian_filter(rng.standard_normal(anat.shape).astype(np.float32), 1.5) * 4.0 if v2 else 0.0
    out = {}
    for modality in MODALITIES:
        c = CONTRAST[modality]
        healthy = c["csf"] * anat.csf + c["gm"] * anat.gm + c["wm"] * anat.wm
        ed = c["ed"] + (0.03 if (modality == "flair" and lab.get("mgmt") == "methylated") else 0.0)
        ncr = c["ncr"] * (MISMATCH_FLAIR if (modality == "flair" and mutant and not codeleted) else 1.0)
        lesion = ncr * members["ncr"] + c["et"] * members["et"] + ed * members["ed"]
        img = (healthy * (1 - tumour) + lesion) * texture
        if modality in ("t2", "t1ce"):
            img = img * (1 - calcified) + CALCIFICATION * calcified
        # The site: contrast (gamma), resolution (blur), noise texture, then scale/offset and bias.
        img = np.clip(img, 0, None) ** site["gamma"][modality]
        if site["blur_vox"] > 0:
            img = ndimage.gaussian_filter(img, site["blur_vox"])
        img = img * (1 + site["texture"] * site_texture)
        img = img * bias * site["scale"][modality] + site["offset"][modality]
        img = img + rng.normal(0, site["noise"], anat.shape).astype(np.float32)
        out[modality] = np.clip(img, 0, None) * anat.mask
    return out


def _thick_slices(volumes: dict[str, np.ndarray], seg: np.ndarray, affine: np.ndarray, slice_mm: float):
    """Resample along z to a thicker slice spacing (a site acquiring 3-4 mm axial slices)."""
    spacing = float(np.linalg.norm(affine[:3, 2]))
    if slice_mm <= spacing:
        return volumes, seg, affine
    factor = spacing / slice_mm
    out = {m: ndimage.zoom(v, (1, 1, factor), order=1) for m, v in volumes.items()}
    seg_out = ndimage.zoom(seg, (1, 1, factor), order=0)
    new_affine = affine.copy()
    new_affine[:3, 2] = affine[:3, 2] * (seg.shape[2] / seg_out.shape[2])
    return out, seg_out, new_affine


def _survival(rng, lab: dict, volume_ml: float, multifocal: bool, version: int = GENERATOR_VERSION) -> tuple[float, int]:
    """Weibull survival. The image-borne terms (volume, multifocality) carry hazard that neither age nor
    the clinical labels do, so an image model has something to add over a clinical baseline."""
    lp = (
        0.35 * (lab["age"] - 50) / 10
        + 1.1 * (lab["grade"] == "HGG")
        + 0.9 * (lab["idh"] == "wildtype")
        - 0.5 * (lab["mgmt"] == "methylated")
        + 0.25 * np.log(max(volume_ml, 1.0) / 30)
    ) if version < 2 else (
        0.25 * (lab["age"] - 50) / 10
        + 1.0 * (lab["grade"] == "HGG")
        + 0.8 * (lab["idh"] == "wildtype")
        - 0.5 * (lab["mgmt"] == "methylated")
        + 0.6 * np.log(max(volume_ml, 1.0) / 30)
        + 0.6 * multifocal
    )
    shape_k, scale_days = 1.4, 2600.0
    t = scale_days * (-np.log(rng.random()) / np.exp(lp)) ** (1 / shape_k)
    censor = rng.uniform(300, 4000)
    return float(round(min(t, censor), 1)), int(t <= censor)


def _to_int16(volumes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {m: np.clip(np.round(v * 1000), 0, 32767).astype(np.int16) for m, v in volumes.items()}


def make_case(seed: int, index: int, sites: int = 1, resolution_mm: float = 2.0, ood: str | None = None,
              first_site: int = 0, version: int = GENERATOR_VERSION) -> tuple[Study, dict]:  # fmt: skip
    """One phantom case and its generation record (centre, lobe, multifocality, OOD kind). Sites are
    numbered from `first_site` (0 is the reference scanner; a dataset of sites others never had starts
    past theirs)."""
    rng = np.random.default_rng([seed, index])
    anat = load_anatomy(resolution_mm)
    grid = _grid_cached(resolution_mm)
    case_id = f"PH-{seed:04d}-{index:04d}"
    site_index = first_site + index % max(sites, 1)
    if version not in GENERATOR_VERSIONS:
        raise ValueError(f"phantom generator version must be one of {GENERATOR_VERSIONS}, not {version}")
    site = _site_params(seed, site_index, version)
    lab = _draw_labels(rng, version)
    voxel_ml = float(abs(np.linalg.det(anat.affine[:3, :3]))) / 1000.0
    record: dict = {"case_id": case_id, "site": f"site-{site_index + 1}", "ood": ood}
    multifocal = False

    if ood in ("healthy", None):
        seg = np.zeros(anat.shape, dtype=np.uint8)
        if ood is None:
            radius = float(rng.uniform(13, 22) if lab["grade"] == "HGG" else rng.uniform(10, 18))
            centre = _pick_centre(rng, anat, grid, lab, radius)
            seg = _lesion(rng, anat, centre, lab, radius)
            centre_mm = anat.affine[:3, :3] @ centre + anat.affine[:3, 3]
            multifocal = rng.random() < (0.2 if lab["idh"] == "wildtype" else 0.08)
            if multifocal:
                second = _lesion(rng, anat, _pick_centre(rng, anat, grid, lab, radius * 0.6), lab, radius * 0.6)
                seg = np.where(seg > 0, seg, second).astype(np.uint8)
            record.update(
                centre_mm=[round(float(c), 1) for c in centre_mm],
                frontal=bool(centre_mm[1] > FRONTAL_Y_MM),
                depth_mm=round(float(anat.depth_mm[tuple(centre.astype(int))]), 1),
                multifocal=bool(multifocal),
            )
        volumes = _synthesise(rng, anat, seg, lab, site, version)
    else:
        seg = np.zeros(anat.shape, dtype=np.uint8)
        if ood == "noise":  # not a brain at all
            volumes = {m: np.abs(rng.normal(0.5, 0.3, anat.shape)).astype(np.float32) for m in MODALITIES}
        else:  # "corrupt": a brain with a gross artefact (heavy noise and a lost half-volume)
            volumes = _synthesise(rng, anat, seg, lab, site, version)
            for m in volumes:
                volumes[m] = volumes[m] + rng.normal(0, 0.6, anat.shape).astype(np.float32) * anat.mask
                volumes[m][:, : anat.shape[1] // 2, :] = 0
    volumes, seg, affine = _thick_slices(volumes, seg, anat.affine, site["slice_mm"])
    record["slice_mm"] = round(float(np.linalg.norm(affine[:3, 2])), 2)

    # Real cohorts miss molecular labels often, and not at random: 1p/19q is tested mostly once a tumour
    # is IDH-mutant, MGMT mostly in high grade (where it guides treatment). Modalities go missing sometimes.
    known = {
        "grade": rng.random() > 0.05,
        "idh": rng.random() > 0.2,
        "codeletion_1p19q": rng.random() < (0.85 if lab["idh"] == "mutant" else 0.2),
        "mgmt": rng.random() < (0.8 if lab["grade"] == "HGG" else 0.4),
    } if version >= 2 else {
        "grade": rng.random() > 0.05, "idh": rng.random() > 0.25,
        "codeletion_1p19q": rng.random() > 0.45, "mgmt": rng.random() > 0.4,
    }  # fmt: skip
    if ood is None and rng.random() < 0.12:
        volumes.pop(MODALITIES[int(rng.integers(0, 4))])
    os_days, os_event = _survival(rng, lab, float((seg > 0).sum()) * voxel_ml, multifocal, version)
    labels = Labels(
        **{task: (lab[task] if known[task] else None) for task in known},
        os_days=os_days, os_event=os_event,
    ) if ood is None else Labels()  # fmt: skip
    images = {m: Volume(v, affine) for m, v in _to_int16(volumes).items()}
    study = Study(
        case_id=case_id, images=images, site=record["site"], age=lab["age"], sex=lab["sex"],
        segmentation=Volume(seg, affine) if ood is None else None, labels=labels,
    )  # fmt: skip
    record["truth"] = lab if ood is None else None
    return study, record


def synthesise(
    out: str | Path,
    n: int,
    seed: int,
    sites: int = 1,
    resolution_mm: float = 2.0,
    ood_fraction: float = 0.0,
    progress: Callable[[int, int], None] = lambda done, total: None,
    first_site: int = 0,
    version: int = GENERATOR_VERSION,
    workers: int = 1,
) -> Path:
    """Write a phantom dataset in the BraTS layout; built in a temp dir and moved into place whole.
    `first_site`: the number of the first site's scanner parameters (see make_case). `workers` > 1 builds
    cases in that many processes; each case depends only on (seed, index), so the bytes are the same."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: already exists and is not empty")
    if n < 1 or sites < 1 or not 0 <= ood_fraction < 1:
        raise ValueError("need n >= 1, sites >= 1 and 0 <= ood_fraction < 1")
    rng = np.random.default_rng([seed, 104729])
    n_ood = int(round(n * ood_fraction))
    ood_kinds = {int(i): str(rng.choice(["healthy", "noise", "corrupt"])) for i in rng.choice(n, n_ood, replace=False)}

    build = partial(_build_case, seed=seed, sites=sites, resolution_mm=resolution_mm, ood_kinds=ood_kinds,
                    first_site=first_site, version=version)  # fmt: skip
    meta = {"generator": "oncoserve.phantoms", "generator_version": version, "seed": seed, "n": n, "sites": sites,
            "resolution_mm": resolution_mm, "ood_fraction": ood_fraction, "first_site": first_site}  # fmt: skip
    return write_dataset(out, n, build, meta, progress, workers)


def _build_case(i: int, staging: Path, *, seed, sites, resolution_mm, ood_kinds, first_site, version) -> tuple[dict, dict]:
    """Case i written into `staging`; its clinical row and generation record (a top-level function, so
    that worker processes can run it)."""
    study, record = make_case(seed, i, sites, resolution_mm, ood_kinds.get(i), first_site, version)
    write_case(staging, study)
    return clinical_row(study), record


def write_dataset(out: Path, n: int, build: Callable[[int, Path], tuple[dict, dict]], meta: dict,
                  progress: Callable[[int, int], None], workers: int = 1) -> Path:  # fmt: skip
    """Cases 0..n-1 written by `build(i, staging)` (which returns the case's clinical row and generation
    record), then clinical.csv and phantoms.json; built in a hidden folder and moved into place whole.
    With `workers` > 1, `build` must be picklable (a top-level function or a partial of one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rows, records = [], []
        for i, (row, record) in enumerate(_built(n, build, staging, workers)):
            rows.append(row)
            records.append(record)
            progress(i + 1, n)
        write_clinical(staging, rows)
        (staging / "phantoms.json").write_text(json.dumps({**meta, "cases": records}, indent=1, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _built(n: int, build, staging: Path, workers: int) -> Iterator[tuple[dict, dict]]:
    """Each case's (row, record) in index order, built here or in `workers` spawned processes (spawn, not
    fork: the caller may run threads, e.g. a progress bar's)."""
    if workers <= 1 or n == 1:
        yield from (build(i, staging) for i in range(n))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, n), mp_context=context) as pool:
        futures = [pool.submit(build, i, staging) for i in range(n)]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
