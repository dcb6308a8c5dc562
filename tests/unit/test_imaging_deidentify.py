"""De-identification: planted PHI must not appear in anything written."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from imaging.deidentify import Deidentifier, clean_description, date_offset_days
from imaging.ingest import ingest
from imaging.study import Volume
from tests import dicom_factory as dcm


def phantom_volume() -> Volume:
    data = np.zeros((16, 18, 10), np.int16)
    data[3:13, 3:15, 2:8] = 700
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return Volume(data, affine)


def all_bytes_written(folder: Path) -> bytes:
    blob = b""
    for path in folder.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            blob += path.name.encode() + raw + (gzip.decompress(raw) if path.suffix == ".gz" else b"")
    return blob


def assert_no_phi(blob: bytes, extra: list[str] = ()) -> None:
    lowered = blob.lower()
    for value in [*dcm.PHI_STRINGS, *extra]:
        assert value.lower().encode() not in lowered, f"PHI {value!r} found in output"


def test_deidentified_dicom_keeps_no_planted_phi():
    study_uid = generate_uid()
    datasets = dcm.series_datasets(phantom_volume(), "AX T1 POST Jane Doe", study_uid)
    originals = {str(ds.SOPInstanceUID) for ds in datasets} | {study_uid, str(datasets[0].SeriesInstanceUID)}
    deid = Deidentifier(pseudonym="case-x", salt="s3cret")
    cleaned = [deid.apply(ds) for ds in datasets]
    blob = b"".join(dcm.to_bytes(ds) for ds in cleaned)
    assert_no_phi(blob, extra=sorted(originals))
    first = pydicom.dcmread(__import__("io").BytesIO(dcm.to_bytes(cleaned[0])))
    assert first.PatientIdentityRemoved == "YES" and first.PatientID == "case-x"
    assert {i.CodeValue for i in first.DeidentificationMethodCodeSequence} == {"113100", "113107", "113108"}
    assert first.SeriesDescription == "AX T1 POST" and first.PatientAge == "052Y"
    assert not any(e.tag.is_private for e in first.iterall())
    # One study, one new StudyInstanceUID; slices keep distinct SOP UIDs.
    assert len({str(ds.StudyInstanceUID) for ds in cleaned}) == 1
    assert len({str(ds.SOPInstanceUID) for ds in cleaned}) == len(cleaned)


def test_dates_shift_consistently_within_a_study():
    study_uid = generate_uid()
    deid = Deidentifier("case-y", "salt")
    a = deid.apply(dcm.series_datasets(phantom_volume(), "AX T1", study_uid)[0])
    b = deid.apply(dcm.series_datasets(phantom_volume(), "AX FLAIR", study_uid)[0])
    assert a.StudyDate == b.StudyDate != dcm.PHI["StudyDate"]
    assert a.StudyTime == ""
    assert -3650 <= date_offset_days(study_uid, "salt") <= -30


def test_uid_remapping_is_consistent_and_salted():
    uid = generate_uid()
    one = Deidentifier("p", "salt-1").remap_uid(uid)
    assert one == Deidentifier("p", "salt-1").remap_uid(uid) != Deidentifier("p", "salt-2").remap_uid(uid)


def test_burned_in_annotation_is_flagged():
    ds = dcm.series_datasets(phantom_volume(), "AX T1", generate_uid())[0]
    ds.BurnedInAnnotation = "YES"
    deid = Deidentifier("p", "s")
    deid.apply(ds)
    assert deid.report.burned_in_annotation == ["AX T1"]


def test_description_cleaning_keeps_only_acquisition_words():
    assert clean_description("AX T1 POST-GD for Jane Doe (MRN 1234)") == "AX T1"
    assert clean_description("Sag FLAIR 3D") == "SAG FLAIR 3D"


def test_ingest_cli_writes_no_phi_anywhere_and_reports_what_it_removed(tmp_path):
    uid = generate_uid()
    series = {d: dcm.series_datasets(phantom_volume(), d, uid) for d in ("AX T1 Jane", "AX T2 FSE", "AX FLAIR")}
    src = dcm.write_zip(tmp_path / "study.zip", series)
    out = tmp_path / "dataset"
    exe = Path(sys.executable).parent / "oncoserve"
    run = subprocess.run([str(exe), "data", "ingest", str(src), "--out", str(out), "--site", "site-a"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "PatientName" in run.stdout and "InstitutionName" in run.stdout and "uids_remapped" in run.stdout
    assert_no_phi(run.stdout.encode() + run.stderr.encode() + all_bytes_written(out), extra=[uid])
    cases = [p for p in out.iterdir() if p.is_dir()]
    assert len(cases) == 1 and cases[0].name.startswith("case-")
    assert sorted(p.name.split("_")[-1] for p in cases[0].iterdir()) == ["flair.nii.gz", "t1.nii.gz", "t2.nii.gz"]
    row = (out / "clinical.csv").read_text().splitlines()[1]
    assert row.startswith(cases[0].name + ",site-a,52.0,F,")


def test_ingest_cli_bad_input_is_a_message_not_a_traceback(tmp_path):
    bad = tmp_path / "x_t1.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08broken")
    exe = Path(sys.executable).parent / "oncoserve"
    run = subprocess.run([str(exe), "data", "ingest", str(bad), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 1
    assert "x_t1.nii.gz" in run.stderr and "Traceback" not in run.stderr


def test_nifti_header_text_does_not_survive_ingest(tmp_path):
    import nibabel as nib

    img = nib.Nifti1Image(phantom_volume().data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header["descrip"] = b"Doe^Jane MRN-4455-PHI"
    img.header["aux_file"] = b"Elsewhere"
    nib.save(img, str(tmp_path / "Jane_Doe_t1.nii.gz"))
    result = ingest(tmp_path / "Jane_Doe_t1.nii.gz", tmp_path / "out")
    assert_no_phi(all_bytes_written(tmp_path / "out"))
    assert result.modalities == ["t1"]
