"""DICOM de-identification: the PS3.15 Annex E basic profile for the attributes that matter here.

Applied before anything is stored. Options recorded in DeidentificationMethodCodeSequence:
- 113100 Basic Application Confidentiality Profile
- 113107 Retain Longitudinal Temporal Information with Modified Dates (dates shifted per study)
- 113108 Retain Patient Characteristics (age and sex: clinical variables the models use)
UIDs are remapped deterministically from a secret salt, so a study's series stay linked and a
re-ingest of the same study gives the same UIDs, while the originals cannot be recovered.
The report names what was changed, never the original values.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

METHOD = "oncoserve: PS3.15 E.1 basic profile, options 113107 113108"  # LO: at most 64 chars

# Replaced with a dummy value (type 1/2 attributes keep existing, emptied or pseudonymised).
REPLACE = {"PatientName": "ANONYMOUS", "PatientID": None}  # PatientID -> the pseudonym
# Removed outright.
REMOVE = [
    "PatientBirthDate", "PatientBirthTime", "PatientAddress", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientTelephoneNumbers", "PatientMotherBirthName", "MilitaryRank", "EthnicGroup",
    "Occupation", "MedicalRecordLocator", "PatientInsurancePlanCodeSequence", "PatientReligiousPreference",
    "CountryOfResidence", "RegionOfResidence", "ResponsiblePerson", "ResponsibleOrganization",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "RequestingPhysician",
    "OperatorsName", "ScheduledPerformingPhysicianName", "AccessionNumber", "StudyID", "StationName",
    "DeviceSerialNumber", "RequestAttributesSequence", "AdmissionID", "IssuerOfPatientID",
    "PatientComments", "AdditionalPatientHistory", "ImageComments", "StudyComments", "RequestedProcedureDescription",
    "PerformedProcedureStepDescription", "PerformedProcedureStepID", "ProtocolName", "DerivationDescription",
    "ContentCreatorName", "PersonName", "ReasonForStudy", "RequestingService", "CurrentPatientLocation",
    "PatientState", "PregnancyStatus", "SmokingStatus", "PatientSize", "PatientWeight",
]  # fmt: skip
UID_ATTRIBUTES = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
                  "ReferencedSOPInstanceUID", "MediaStorageSOPInstanceUID", "IrradiationEventUID",
                  "ReferencedFrameOfReferenceUID", "SynchronizationFrameOfReferenceUID"}  # fmt: skip
# Words allowed to survive in cleaned descriptions: acquisition vocabulary, no names or free text.
DESCRIPTION_VOCABULARY = {
    "t1", "t2", "flair", "t1ce", "t1c", "ce", "gd", "gad", "post", "pre", "contrast", "+c", "c+", "ax", "axial",
    "sag", "sagittal", "cor", "coronal", "3d", "2d", "mprage", "spgr", "fse", "tse", "se", "gre", "brain", "head",
    "mri", "mr", "fs", "fat", "sat", "dwi", "adc", "swi", "perfusion", "iso", "thin", "mpr", "space", "cube",
}  # fmt: skip
CLEANED_DESCRIPTIONS = ("SeriesDescription", "StudyDescription")


@dataclass
class DeidReport:
    removed: set[str] = field(default_factory=set)
    replaced: set[str] = field(default_factory=set)
    cleaned: set[str] = field(default_factory=set)
    uids_remapped: int = 0
    dates_shifted: int = 0
    times_removed: int = 0
    private_tags_removed: int = 0
    burned_in_annotation: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "method": METHOD,
            "removed": sorted(self.removed),
            "replaced": sorted(self.replaced),
            "cleaned": sorted(self.cleaned),
            "uids_remapped": self.uids_remapped,
            "dates_shifted": self.dates_shifted,
            "times_removed": self.times_removed,
            "private_tags_removed": self.private_tags_removed,
            "burned_in_annotation": self.burned_in_annotation,
        }


def clean_description(text: str) -> str:
    tokens = re.split(r"[\s_/,;:()\[\]]+", text.lower())
    kept = [t for t in tokens if t in DESCRIPTION_VOCABULARY]
    return " ".join(kept).upper()


def date_offset_days(study_uid: str, salt: str) -> int:
    """A per-study shift of 30..3650 days into the past, stable for the same study and salt."""
    digest = hashlib.sha256(f"{salt}:{study_uid}".encode()).digest()
    return -(30 + int.from_bytes(digest[:4], "big") % 3621)


def _shift_date(value: str, days: int) -> str:
    try:
        return (dt.datetime.strptime(value[:8], "%Y%m%d") + dt.timedelta(days=days)).strftime("%Y%m%d")
    except ValueError:
        return ""  # an unparsable date cannot be shifted safely: drop it


class Deidentifier:
    """De-identify datasets of one study consistently (same pseudonym, date shift and UID map)."""

    def __init__(self, pseudonym: str, salt: str):
        self.pseudonym = pseudonym
        self.salt = salt
        self.report = DeidReport()

    def remap_uid(self, old: str) -> str:
        """The pseudonymous UID of `old` (deterministic for this salt; the receiver keeps the reverse map)."""
        return generate_uid(entropy_srcs=[self.salt, str(old)])

    def _walk(self, ds: Dataset, days: int) -> None:
        for elem in list(ds):
            if elem.VR == "SQ":
                for item in elem.value:
                    self._walk(item, days)
                continue
            if elem.keyword in UID_ATTRIBUTES and elem.value:
                elem.value = self.remap_uid(elem.value)
                self.report.uids_remapped += 1
            elif elem.VR == "DA" and elem.value:
                elem.value = _shift_date(str(elem.value), days)
                self.report.dates_shifted += 1
            elif elem.VR == "DT" and elem.value:
                elem.value = _shift_date(str(elem.value), days)
                self.report.dates_shifted += 1
            elif elem.VR == "TM" and elem.value:
                elem.value = ""
                self.report.times_removed += 1
            elif elem.VR == "PN" and elem.keyword != "PatientName" and elem.value:
                # Any person name the lists above did not name (e.g. in sequences) goes too.
                del ds[elem.tag]
                self.report.removed.add(elem.keyword or str(elem.tag))

    def apply(self, ds: Dataset) -> Dataset:
        """De-identify one dataset in place and return it."""
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            self.report.burned_in_annotation.append(str(ds.get("SeriesDescription", "")) or "series")
        days = date_offset_days(str(ds.get("StudyInstanceUID", "")), self.salt)
        before = len([e for e in ds.iterall() if e.tag.is_private])
        ds.remove_private_tags()
        self.report.private_tags_removed += before
        for keyword in REMOVE:
            if keyword in ds:
                del ds[keyword]
                self.report.removed.add(keyword)
        for keyword in CLEANED_DESCRIPTIONS:
            if keyword in ds:
                cleaned = clean_description(str(ds.get(keyword)))
                if cleaned != str(ds.get(keyword)):
                    self.report.cleaned.add(keyword)
                setattr(ds, keyword, cleaned)
        ds.PatientName = "ANONYMOUS"
        ds.PatientID = self.pseudonym
        self.report.replaced.update({"PatientName", "PatientID"})
        self._walk(ds, days)
        if hasattr(ds, "file_meta") and "MediaStorageSOPInstanceUID" in ds.file_meta and "SOPInstanceUID" in ds:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
        codes = Sequence()
        for value, meaning in (
            ("113100", "Basic Application Confidentiality Profile"),
            ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
            ("113108", "Retain Patient Characteristics Option"),
        ):
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = codes
        return ds


def age_years(ds: Dataset) -> float | None:
    """PatientAge ('045Y', '006M') in years, a retained patient characteristic."""
    raw = str(ds.get("PatientAge", "")).strip().upper()
    match = re.fullmatch(r"(\d{1,3})([DWMY])", raw)
    if not match:
        return None
    n, unit = int(match.group(1)), match.group(2)
    return round(n / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[unit], 1)
