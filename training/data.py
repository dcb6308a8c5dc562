"""Datasets for training: preprocessed cases (cached), labels as arrays, and seeded case-level splits."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imaging import manifest
from imaging.dataset import case_ids, read_case, read_clinical
from imaging.labels import labels_to_classes
from imaging.preprocess import PreprocessConfig, preprocess
from imaging.study import CLASS_LABELS, MODALITIES

CLS_TASKS = list(CLASS_LABELS)  # grade, idh, codeletion_1p19q, mgmt
MISSING = -1


@dataclass
class CaseArrays:
    """One preprocessed case as the networks see it (float16 on disk, float32 in memory)."""

    case_id: str
    image: np.ndarray  # (4, X, Y, Z)
    presence: np.ndarray  # (4,)
    seg_classes: np.ndarray | None  # (X, Y, Z) int64 class indices 0..3, or None
    cls: np.ndarray  # (4,) 0/1 per classification task, -1 unknown
    age: float
    os_days: float
    os_event: int  # -1 unknown
    site: str
    spacing_mm: float
    # Where the case came from, for figures on its own (native) grid: the model grid's affine and the
    # dataset folder its untouched ground truth is read from (imaging.dataset.read_segmentation).
    grid_affine: np.ndarray | None = None
    data_root: Path | None = None


@dataclass
class Dataset:
    root: Path
    dataset_hash: str
    preprocessing: str
    cases: list[CaseArrays] = field(default_factory=list)

    def by_id(self) -> dict[str, CaseArrays]:
        return {c.case_id: c for c in self.cases}


def _cls_vector(labels) -> np.ndarray:
    out = np.full(len(CLS_TASKS), MISSING, dtype=np.int64)
    for i, task in enumerate(CLS_TASKS):
        value = getattr(labels, task)
        if value is not None:
            out[i] = CLASS_LABELS[task].index(value)
    return out


def save_atomically(path: Path, **arrays) -> None:
    """Write an .npz under a name of this writer's own, then rename it into place: trainings that run at
    the same time preprocess the same case into the same cache, and a shared temporary name let one
    rename the other's file away (ENOENT)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
    try:
        np.savez(tmp, **arrays)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_dataset(root: str | Path, cache_dir: str | Path, config: PreprocessConfig = PreprocessConfig(), progress=None) -> Dataset:
    """Preprocess every case once (cached by dataset hash + preprocessing version) and return arrays."""
    root = Path(root)
    identity = manifest.build(root)["dataset_hash"]
    cache = Path(cache_dir) / f"{identity[:16]}-{config.version.replace('/', '_')}"
    cache.mkdir(parents=True, exist_ok=True)
    clinical = read_clinical(root)
    ds = Dataset(root, identity, config.version)
    ids = case_ids(root)
    for n, case_id in enumerate(ids):
        path = cache / f"{case_id}.npz"
        if not _complete(path):
            study = read_case(root, case_id, clinical)
            prepared = preprocess(study, config)
            seg = prepared.segmentation
            meta = {
                "cls": _cls_vector(study.labels).tolist(),
                "age": study.age if study.age is not None else float("nan"),
                "os_days": study.labels.os_days if study.labels.os_days is not None else float("nan"),
                "os_event": study.labels.os_event if study.labels.os_event is not None else MISSING,
                "site": study.site or "",
                "grid_affine": prepared.grid.affine.tolist(),
            }
            save_atomically(path, image=prepared.image.astype(np.float16), presence=prepared.presence,
                            seg=seg if seg is not None else np.zeros(0, np.uint8), meta=json.dumps(meta))  # fmt: skip
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            seg = z["seg"]
            ds.cases.append(
                CaseArrays(
                    case_id=case_id,
                    image=z["image"].astype(np.float32),
                    presence=z["presence"].astype(np.float32),
                    seg_classes=labels_to_classes(seg) if seg.size else None,
                    cls=np.array(meta["cls"], dtype=np.int64),
                    age=float(meta["age"]),
                    os_days=float(meta["os_days"]),
                    os_event=int(meta["os_event"]),
                    site=meta["site"],
                    spacing_mm=config.spacing_mm,
                    grid_affine=np.array(meta["grid_affine"]),
                    data_root=root,
                )
            )
        if progress:
            progress(n + 1, len(ids))
    return ds


def _complete(path: Path) -> bool:
    """A cached case written by this code (an older cache lacks the model grid's affine: redo it)."""
    if not path.exists():
        return False
    with np.load(path) as z:
        return "grid_affine" in json.loads(str(z["meta"]))


def split_cases(ds: Dataset, seed: int, fractions=(0.7, 0.15, 0.15)) -> dict[str, list[str]]:
    """Case-level train/val/test split, stratified by grade x IDH (unknown is its own stratum).

    `val` fits early stopping and calibration; `test` is never seen in training or calibration.
    """
    rng = np.random.default_rng(seed)
    strata: dict[tuple, list[str]] = {}
    for c in ds.cases:
        strata.setdefault((int(c.cls[0]), int(c.cls[1])), []).append(c.case_id)
    split = {"train": [], "val": [], "test": []}
    # Deal each stratum's shuffled cases round-robin in proportion, so small strata reach every split.
    pattern = []
    for name, frac in zip(("train", "val", "test"), fractions):
        pattern += [name] * max(1, round(frac * 20))
    offset = 0
    for key in sorted(strata):
        ids = sorted(strata[key])
        rng.shuffle(ids)
        for i, case_id in enumerate(ids):
            split[pattern[(offset + i) % len(pattern)]].append(case_id)
        offset += len(ids)
    for name in ("val", "test"):  # every split needs at least one case
        if not split[name] and len(split["train"]) > 2:
            split[name].append(split["train"].pop())
    return {k: sorted(v) for k, v in split.items()}
