"""DICOM or NIfTI input -> one de-identified case in the dataset layout.

Nothing partial is left behind: the case is built in a hidden staging folder and moved into place in
one rename, and clinical.csv is rewritten atomically. No original identifier reaches the output: the
case id is given or derived from a salted hash, NIfTI headers are rebuilt from voxels and affine only,
DICOM attributes are de-identified (imaging.deidentify) and only age and sex are carried over.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imaging import nifti
from imaging.dataset import check_case_id, clinical_row, read_clinical, write_case, write_clinical
from imaging.deidentify import Deidentifier, age_years
from imaging.dicom_series import read_dicom_study_mapped
from imaging.errors import StudyError
from imaging.labels import normalise_labels
from imaging.study import MODALITIES, Study, Volume

SALT_FILE = ".deid-salt"
NIFTI_NAME = re.compile(r"_(t1ce|t1|t2|flair|seg)\.nii(\.gz)?$", re.IGNORECASE)


@dataclass
class IngestResult:
    case_id: str
    folder: Path
    source_kind: str
    modalities: list[str]
    missing: list[str]
    removed: dict
    series_mapping: dict | None = None  # DICOM: modality -> series, confidence, reason

    def to_json(self) -> dict:
        return {
            "case_id": self.case_id, "folder": str(self.folder), "source": self.source_kind,
            "modalities": self.modalities, "missing": self.missing, "deidentification": self.removed,
            **({"series_mapping": self.series_mapping} if self.series_mapping else {}),
        }  # fmt: skip


def dataset_salt(out: Path) -> str:
    """The dataset's secret for pseudonyms, UID remapping and date shifts (created once, mode 600)."""
    path = out / SALT_FILE
    if path.exists():
        return path.read_text().strip()
    out.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(salt)
    return salt


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _nifti_inputs(src: Path) -> dict[str, Path]:
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file() and _is_nifti(p))
    found: dict[str, Path] = {}
    for path in files:
        match = NIFTI_NAME.search(path.name)
        if not match:
            raise StudyError(f"{path.name}: cannot tell the modality; name files *_t1, *_t1ce, *_t2, *_flair or *_seg")
        key = match.group(1).lower()
        if key in found:
            raise StudyError(f"{path.name}: a second {key} file in the input")
        found[key] = path
    return found


def _pseudonym(salt: str, identity: str) -> str:
    return "case-" + hashlib.sha256(f"{salt}:{identity}".encode()).hexdigest()[:12]


def _from_nifti(src: Path, salt: str, case_id: str | None) -> tuple[Study, dict]:
    inputs = _nifti_inputs(src)
    images = {m: nifti.load(inputs[m]) for m in MODALITIES if m in inputs}
    if not images:
        raise StudyError(f"{src.name}: no t1, t1ce, t2 or flair volume found")
    seg = None
    if "seg" in inputs:
        raw = nifti.load(inputs["seg"], dtype=None)
        seg = Volume(normalise_labels(raw.data, inputs["seg"].name), raw.affine)
    identity = "|".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs.values())
    cid = case_id or _pseudonym(salt, identity)
    removed = {"nifti_header": "rebuilt from voxels and affine; descrip, aux_file, db_name and intent fields dropped",
               "source_filenames": "not kept"}  # fmt: skip
    return Study(case_id=cid, images=images, segmentation=seg), removed


def _from_dicom(src: Path, salt: str, case_id: str | None, mapping: dict[str, str] | None) -> tuple[Study, dict]:
    volumes, datasets, decisions = read_dicom_study_mapped(src, mapping)
    study_uid = str(datasets[0].get("StudyInstanceUID", "")) or src.name
    cid = case_id or _pseudonym(salt, study_uid)
    deid = Deidentifier(pseudonym=cid, salt=salt)
    for ds in datasets:
        deid.apply(ds)
    sex = str(datasets[0].get("PatientSex", "")).strip().upper() or None
    study = Study(case_id=cid, images=volumes, age=age_years(datasets[0]), sex=sex if sex in ("F", "M", "O") else None)
    study.provenance["series_mapping"] = decisions
    return study, deid.report.to_json()


def ingest(
    src: str | Path,
    out: str | Path,
    case_id: str | None = None,
    site: str | None = None,
    mapping: dict[str, str] | None = None,
) -> IngestResult:
    src, out = Path(src), Path(out)
    if not src.exists():
        raise StudyError(f"{src}: not found")
    if case_id is not None:
        check_case_id(case_id)
    salt = dataset_salt(out)
    is_nifti = _is_nifti(src) or (src.is_dir() and any(_is_nifti(p) for p in src.iterdir()))
    if is_nifti:
        study, removed = _from_nifti(src, salt, case_id)
        kind = "nifti"
    else:
        study, removed = _from_dicom(src, salt, case_id, mapping)
        kind = "dicom"
    study.site = site
    final = out / study.case_id
    if final.exists():
        raise StudyError(f"{study.case_id}: already in {out}; remove it first or choose another --case-id")
    staging = Path(tempfile.mkdtemp(prefix=".ingest-", dir=out))
    try:
        write_case(staging, study)
        rows = read_clinical(out)
        rows[study.case_id] = clinical_row(study)
        tmp_csv_dir = staging / "csv"
        tmp_csv_dir.mkdir()
        write_clinical(tmp_csv_dir, list(rows.values()))
        os.replace(staging / study.case_id, final)
        os.replace(tmp_csv_dir / "clinical.csv", out / "clinical.csv")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return IngestResult(study.case_id, final, kind, study.present, study.missing, removed,
                        study.provenance.get("series_mapping"))  # fmt: skip
