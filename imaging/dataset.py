"""The BraTS-style dataset layout.

    DIR/<case_id>/<case_id>_{t1,t1ce,t2,flair}.nii.gz   (any subset)
    DIR/<case_id>/<case_id>_seg.nii.gz                  (optional)
    DIR/clinical.csv   case_id,site,age,sex,grade,idh,codeletion_1p19q,mgmt,os_days,os_event
An empty cell is an unknown value.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path

from imaging import nifti
from imaging.errors import StudyError
from imaging.labels import normalise_labels
from imaging.study import MODALITIES, Labels, Study, Volume

CLINICAL_COLUMNS = ["case_id", "site", "age", "sex", "grade", "idh", "codeletion_1p19q", "mgmt", "os_days", "os_event"]
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_case_id(case_id: str) -> str:
    if not CASE_ID.match(case_id) or ".." in case_id:
        raise StudyError(f"case id {case_id!r}: use letters, digits, '.', '_' or '-' (at most 128)")
    return case_id


def _cell(row: dict, key: str, cast=str):
    value = (row.get(key) or "").strip()
    if value == "":
        return None
    try:
        return cast(value)
    except ValueError:
        raise StudyError(f"clinical.csv case {row.get('case_id')}: {key}={value!r} is not valid") from None


def read_clinical(root: Path) -> dict[str, dict]:
    path = root / "clinical.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(CLINICAL_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise StudyError(f"clinical.csv: missing columns {sorted(missing)}")
        return {row["case_id"].strip(): row for row in reader}


def write_clinical(root: Path, rows: list[dict]) -> Path:
    path = root / "clinical.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CLINICAL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in CLINICAL_COLUMNS})
    return path


def labels_from_row(row: dict | None) -> tuple[Labels, dict]:
    if not row:
        return Labels(), {}
    labels = Labels(
        grade=_cell(row, "grade"),
        idh=_cell(row, "idh"),
        codeletion_1p19q=_cell(row, "codeletion_1p19q"),
        mgmt=_cell(row, "mgmt"),
        os_days=_cell(row, "os_days", float),
        os_event=_cell(row, "os_event", int),
    )
    clinical = {"site": _cell(row, "site"), "age": _cell(row, "age", float), "sex": _cell(row, "sex")}
    return labels, clinical


def case_ids(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise StudyError(f"{root}: dataset directory not found")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob(f"{p.name}_*.nii.gz")))


def read_case(root: str | Path, case_id: str, clinical: dict | None = None, max_voxels: int = nifti.DEFAULT_MAX_VOXELS) -> Study:
    root = Path(root)
    folder = root / check_case_id(case_id)
    images: dict[str, Volume] = {}
    for modality in MODALITIES:
        path = folder / f"{case_id}_{modality}.nii.gz"
        if path.exists():
            images[modality] = nifti.load(path, max_voxels=max_voxels)
    seg = read_segmentation(root, case_id, max_voxels)
    rows = read_clinical(root) if clinical is None else clinical
    labels, extra = labels_from_row(rows.get(case_id))
    return Study(case_id=case_id, images=images, segmentation=seg, labels=labels, **extra)


def read_segmentation(root: str | Path, case_id: str, max_voxels: int = nifti.DEFAULT_MAX_VOXELS) -> Volume | None:
    """A case's ground truth as it is on disk (its own grid), labels normalised; None when it has none."""
    path = Path(root) / check_case_id(case_id) / f"{case_id}_seg.nii.gz"
    if not path.exists():
        return None
    raw = nifti.load(path, max_voxels=max_voxels, dtype=None)
    return Volume(normalise_labels(raw.data, path.name), raw.affine)


def iter_dataset(root: str | Path) -> Iterator[Study]:
    root = Path(root)
    clinical = read_clinical(root)
    for case_id in case_ids(root):
        yield read_case(root, case_id, clinical)


def write_case(root: str | Path, study: Study) -> Path:
    """Write one case's images (and segmentation) in the layout; returns the case folder."""
    folder = Path(root) / check_case_id(study.case_id)
    folder.mkdir(parents=True, exist_ok=True)
    for modality, volume in study.images.items():
        nifti.save(volume, folder / f"{study.case_id}_{modality}.nii.gz")
    if study.segmentation is not None:
        nifti.save(study.segmentation, folder / f"{study.case_id}_seg.nii.gz", dtype="uint8")
    return folder


def clinical_row(study: Study) -> dict:
    lab = study.labels
    return {
        "case_id": study.case_id, "site": study.site, "age": study.age, "sex": study.sex,
        "grade": lab.grade, "idh": lab.idh, "codeletion_1p19q": lab.codeletion_1p19q, "mgmt": lab.mgmt,
        "os_days": lab.os_days, "os_event": lab.os_event,
    }  # fmt: skip
