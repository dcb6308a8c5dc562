"""De-identification at receipt, and re-identification on the way out.

A study that enters from a PACS is de-identified instance by instance as it arrives (the PS3.15 profile in
`imaging.deidentify`, with the platform's salt, so the serving gateway maps its UIDs the same way). What
re-identification needs is kept aside: the original patient and study attributes, and every pseudonymous
UID -> original UID. Those go only to the job table's protected `identities` (pipelines.jobs.store).

The gateway de-identifies the (already pseudonymous) study again, so the SEG it returns refers to UIDs
remapped twice; both generations map back to the original.
"""

from __future__ import annotations

import hashlib
import io
import zipfile

from pydicom.dataset import Dataset

from imaging.deidentify import UID_ATTRIBUTES, Deidentifier

# Patient and study attributes a PACS files results under; restored on the way out.
PATIENT_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyDescription", "IssuerOfPatientID")  # fmt: skip
DEID_MARKERS = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence")


def pseudonym(salt: str, study_uid: str) -> str:
    return "case-" + hashlib.sha256(f"{salt}:pacs:{study_uid}".encode()).hexdigest()[:12]


class StudyDeidentifier:
    """De-identifies the instances of one incoming study and collects its re-identification map."""

    def __init__(self, salt: str, study_uid: str):
        self.salt = salt
        self.case_id = pseudonym(salt, study_uid)
        self.deid = Deidentifier(self.case_id, salt)
        self.patient: dict[str, str] | None = None
        self.uids: dict[str, str] = {}

    def apply(self, ds: Dataset) -> Dataset:
        if self.patient is None:
            self.patient = {k: str(ds.get(k, "")) for k in PATIENT_KEYS if k in ds}
            self.patient["StudyInstanceUID"] = str(ds.get("StudyInstanceUID", ""))
        for elem in ds.iterall():
            if elem.keyword in UID_ATTRIBUTES and elem.value:
                once = self.deid.remap_uid(elem.value)
                # ... and as the gateway will see it after its own pass (same salt).
                self.uids[once] = self.uids[self.deid.remap_uid(once)] = str(elem.value)
        return self.deid.apply(ds)


def reidentify(ds: Dataset, patient: dict[str, str], uids: dict[str, str]) -> Dataset:
    """Put the original patient, study and referenced UIDs back into a result object (in place). UIDs the
    platform created (the result's own series and instance) are left as they are."""
    for elem in ds.iterall():
        if elem.keyword in UID_ATTRIBUTES and str(elem.value) in uids:
            elem.value = uids[str(elem.value)]
    for keyword, value in patient.items():
        setattr(ds, keyword, value)
    for keyword in DEID_MARKERS:
        if keyword in ds:
            del ds[keyword]
    ds.PatientIdentityRemoved = "NO"
    if hasattr(ds, "file_meta") and "SOPInstanceUID" in ds:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def deidentified_zip(datasets: list[Dataset], salt: str) -> tuple[bytes, str, dict, dict]:
    """One study's instances de-identified into a zip: (zip, case id, patient, UID map)."""
    deid = StudyDeidentifier(salt, str(datasets[0].get("StudyInstanceUID", "")))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, ds in enumerate(datasets):
            deid.apply(ds)
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
            zf.writestr(f"{n:05d}.dcm", out.getvalue())
    return buffer.getvalue(), deid.case_id, deid.patient or {}, deid.uids
