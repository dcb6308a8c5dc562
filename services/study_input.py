"""Request payloads -> a Study: NIfTI per modality, a zip of a DICOM study, or an s3:// case folder.

DICOM is de-identified (PS3.15 basic profile, imaging.deidentify) before anything else sees it; the
de-identified slices of the reference series are kept, in volume order, to build the DICOM SEG answer.
Nothing here writes outside a temporary directory that is removed before returning.
"""

from __future__ import annotations

import json

import hashlib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from imaging import nifti
from imaging.dataset import check_case_id
from imaging.deidentify import Deidentifier, age_years
from imaging.dicom_series import FrameDataset, decide_mapping, mapping_record, group_series, read_datasets, series_to_volume, sorted_slices
from imaging.errors import StudyError
from imaging.ingest import NIFTI_NAME  # BraTS names: *_t1, *_t1ce, *_t2, *_flair (and *_seg, ignored here)
from imaging.study import MODALITIES, Study

S3_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,62})/([A-Za-z0-9._/-]{1,512})$")
MAX_S3_CASE_BYTES = 512 * 1024 * 1024


class InputError(ValueError):
    """A request the API cannot turn into a study; `status` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class StudyInput:
    study: Study
    kind: str  # nifti | dicom | s3
    dicom_reference: list = field(default_factory=list)  # de-identified slices of the reference series


def _case_id(given: str | None, identity: bytes) -> str:
    if given:
        try:
            return check_case_id(given)
        except StudyError:
            raise InputError(f"case_id {given[:40]!r}: use letters, digits, '.', '_' or '-' (at most 128)", 400) from None
    # Without a case id, a content hash: the same upload gets the same id and nothing identifying.
    return "case-" + hashlib.sha256(identity).hexdigest()[:12]


def from_nifti(files: dict[str, bytes], case_id: str | None, age: float | None, max_voxels: int = nifti.DEFAULT_MAX_VOXELS) -> StudyInput:
    unknown = sorted(set(files) - set(MODALITIES))
    if unknown:
        raise InputError(f"unknown modality {', '.join(unknown)}; send {', '.join(MODALITIES)}", 400)
    if not files:
        raise InputError(f"no modality uploaded; send form files named {', '.join(MODALITIES)}", 400)
    images = {}
    with tempfile.TemporaryDirectory(prefix="oncoserve-upload-") as tmp:
        for modality in MODALITIES:
            if modality not in files:
                continue
            data = files[modality]
            # The reader picks gzip or plain by the name; let the first bytes decide instead.
            path = Path(tmp) / (f"{modality}.nii.gz" if data[:2] == b"\x1f\x8b" else f"{modality}.nii")
            path.write_bytes(data)
            try:
                images[modality] = nifti.load(path, max_voxels=max_voxels)
            except StudyError as exc:  # (without our temporary folder's path in the message)
                raise InputError(str(exc).replace(f"{tmp}/", "")) from None
    identity = b"|".join(hashlib.sha256(files[m]).digest() for m in sorted(files))
    return StudyInput(_study(_case_id(case_id, identity), images, age), "nifti")


def scanner_site(ds) -> str | None:
    """A DICOM study's scanner as its drift site: manufacturer and model (kept by de-identification;
    the institution and station names are not)."""
    parts = [str(ds.get(tag, "") or "").strip() for tag in ("Manufacturer", "ManufacturerModelName")]
    text = " ".join(p for p in parts if p)
    cleaned = re.sub(r"[^A-Za-z0-9 ._-]", "", text)[:64].strip()
    return cleaned or None


def parse_mapping(text: str | None) -> dict[str, str] | None:
    """A `mapping` form field: JSON {series UID or description: modality}."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise InputError("mapping: not JSON (expected {\"series description or UID\": \"t1ce\", ...})", 400) from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InputError("mapping: expected an object of strings {series: modality}", 400)
    return value


def from_dicom_zip(data: bytes, case_id: str | None, age: float | None, salt: str,
                   mapping: dict[str, str] | None = None) -> StudyInput:  # fmt: skip
    if not data:
        raise InputError("the DICOM zip is empty", 400)
    with tempfile.TemporaryDirectory(prefix="oncoserve-dicom-") as tmp:
        path = Path(tmp) / "study.zip"
        path.write_bytes(data)
        try:
            datasets = read_datasets(path)
            decided = decide_mapping(group_series(datasets), mapping)
            mapped = {m: s for m, (s, _) in decided.items()}
            volumes = {m: series_to_volume(s, "upload") for m, s in mapped.items()}
        except StudyError as exc:
            raise InputError(str(exc).replace(str(path), "upload")) from None
    study_uid = str(datasets[0].get("StudyInstanceUID", ""))
    cid = _case_id(case_id, (salt + study_uid).encode())
    deid = Deidentifier(pseudonym=cid, salt=salt)
    for ds in datasets:
        deid.apply(ds)
    age = age if age is not None else age_years(datasets[0])
    study = _study(cid, volumes, age)
    study.site = scanner_site(datasets[0])
    study.provenance["series_mapping"] = mapping_record(decided)
    reference = sorted_slices(mapped[study.reference_name].datasets)
    if any(isinstance(ds, FrameDataset) for ds in reference):
        reference = []  # enhanced MR: the DICOM SEG writer references single-frame slices only (not built)
    return StudyInput(study, "dicom", reference)


def from_s3(store, uri: str, allowed_buckets: tuple[str, ...], case_id: str | None, age: float | None) -> StudyInput:
    match = S3_URI.match(uri or "")
    if not match or ".." in uri:
        raise InputError(f"s3_uri {str(uri)[:80]!r}: expected s3://bucket/prefix/of/a/case", 400)
    bucket, prefix = match.group(1), match.group(2).rstrip("/") + "/"
    if bucket not in allowed_buckets:
        raise InputError(f"s3_uri: bucket {bucket!r} is not readable through this API (allowed: {', '.join(allowed_buckets)})", 403)
    files, total = {}, 0
    try:
        objects = list(store.list_objects(bucket, prefix=prefix, recursive=False))
        for obj in objects:
            m = NIFTI_NAME.search(obj.object_name)
            if not m or m.group(1).lower() == "seg":
                continue
            total += obj.size or 0
            if total > MAX_S3_CASE_BYTES:
                raise InputError(f"s3_uri: the case is larger than {MAX_S3_CASE_BYTES >> 20} MiB", 413)
            response = store.get_object(bucket, obj.object_name)
            try:
                files[m.group(1).lower()] = response.read()
            finally:
                response.close()
                response.release_conn()
    except InputError:
        raise
    except Exception as exc:  # the object store is down or refuses: the caller gets a 503
        raise InputError(f"object store unavailable reading {uri}: {str(exc)[:200]}", 503) from None
    if not files:
        raise InputError(f"s3_uri: no *_t1/_t1ce/_t2/_flair NIfTI under {uri}", 404)
    result = from_nifti(files, case_id or prefix.rstrip("/").split("/")[-1], age)
    result.kind = "s3"
    return result


def _study(case_id: str, images: dict, age: float | None) -> Study:
    try:
        return Study(case_id=case_id, images=images, age=age)
    except StudyError as exc:
        raise InputError(str(exc)) from None
