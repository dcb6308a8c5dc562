"""NIfTI and DICOM readers, the dataset layout, and every bad-input case of the imaging layer."""

from __future__ import annotations

import gzip
import zipfile

import nibabel as nib
import numpy as np
import pytest
from pydicom.uid import generate_uid

from imaging import nifti
from imaging.dataset import read_case, write_case
from imaging.dicom_series import read_dicom_study
from imaging.errors import DicomError, StudyError
from imaging.ingest import ingest
from imaging.labels import normalise_labels
from imaging.study import Labels, Study, Volume
from tests import dicom_factory as dcm


def brain_like(shape=(20, 24, 18), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.integers(100, 1000, size=shape).astype(np.int16)
    data[:2], data[-2:] = 0, 0
    return data


def ras_affine(spacing=(2.0, 2.0, 2.0), origin=(-20.0, -24.0, -18.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


# -- NIfTI -------------------------------------------------------------------------------------------
def test_nifti_round_trip_keeps_data_and_affine(tmp_path):
    affine = ras_affine((1.5, 1.0, 3.0))
    affine[:3, :3] = affine[:3, :3] @ np.diag([-1, 1, 1])  # an LAS file
    vol = Volume(brain_like().astype(np.float32), affine)
    back = nifti.load(nifti.save(vol, tmp_path / "x_t1.nii.gz"))
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    assert back.spacing == pytest.approx((1.5, 1.0, 3.0))


def test_nifti_bytes_are_deterministic(tmp_path):
    vol = Volume(brain_like().astype(np.float32), ras_affine())
    a = nifti.save(vol, tmp_path / "a.nii.gz").read_bytes()
    b = nifti.save(vol, tmp_path / "b.nii.gz").read_bytes()
    assert a == b


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(gzip.compress(b"not a nifti at all" * 20)), "not a readable NIfTI"),
        (lambda p: p.write_bytes(b"\x1f\x8b\x08garbage"), "not a readable NIfTI"),
        (lambda p: nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), str(p)), "2 dimensions"),
        (lambda p: nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), str(p)), "4 dimensions"),
        (lambda p: nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), str(p)), "NaN"),
        (lambda p: nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.inf, np.float32), np.eye(4)), str(p)), "NaN or infinite"),
        (lambda p: nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.complex64), np.eye(4)), str(p)), "voxel type"),
    ],
    ids=["gzip-not-nifti", "corrupt-gzip", "2d", "4d", "nan", "inf", "complex"],
)
def test_bad_nifti_is_a_clear_error_naming_the_file(tmp_path, make, message):
    path = tmp_path / "bad_flair.nii.gz"
    make(path)
    with pytest.raises(StudyError) as err:
        nifti.load(path)
    assert str(err.value).startswith("bad_flair.nii.gz:") and message in str(err.value)


def test_truncated_nifti(tmp_path):
    good = nifti.save(Volume(brain_like((40, 40, 40)).astype(np.float32), ras_affine()), tmp_path / "t.nii.gz")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(StudyError, match="t.nii.gz: .*(truncated or corrupt|not a readable)"):
        nifti.load(good)


def test_absurd_size_refused_before_reading(tmp_path):
    # A header that declares 2000^3 voxels in a few hundred bytes.
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    img.header.set_data_shape((2000, 2000, 2000))
    path = tmp_path / "huge_t1.nii"
    path.write_bytes(img.header.binaryblock + b"\0" * 4 + b"\0" * 8)
    with pytest.raises(StudyError, match="huge_t1.nii: 8000000000 voxels exceeds the limit"):
        nifti.load(path)


def test_voxel_limit_is_configurable(tmp_path):
    path = nifti.save(Volume(brain_like().astype(np.float32), ras_affine()), tmp_path / "v.nii.gz")
    with pytest.raises(StudyError, match="exceeds the limit of 1000"):
        nifti.load(path, max_voxels=1000)


def test_labels_accept_brats2023_et_and_refuse_unknown():
    seg = np.array([0, 1, 2, 3], dtype=np.uint8)
    assert normalise_labels(seg).tolist() == [0, 1, 2, 4]
    with pytest.raises(StudyError, match="unknown label values \\[7\\]"):
        normalise_labels(np.array([0, 7]))


def test_dataset_layout_round_trip(tmp_path):
    vol = Volume(brain_like().astype(np.float32), ras_affine())
    seg = Volume(np.zeros(vol.shape, np.uint8), vol.affine)
    seg.data[5:8, 5:8, 5:8] = 4
    study = Study("C-1", {"t1": vol, "flair": vol}, site="s1", age=50.0, sex="F", segmentation=seg,
                  labels=Labels(grade="HGG", idh="wildtype", os_days=300.0, os_event=1))  # fmt: skip
    write_case(tmp_path, study)
    from imaging.dataset import clinical_row, write_clinical

    write_clinical(tmp_path, [clinical_row(study)])
    back = read_case(tmp_path, "C-1")
    assert back.present == ["t1", "flair"] and back.missing == ["t1ce", "t2"]
    assert back.labels.grade == "HGG" and back.labels.mgmt is None and back.age == 50.0
    np.testing.assert_array_equal(back.segmentation.data, seg.data)


def test_unknown_label_value_in_clinical_csv(tmp_path):
    (tmp_path / "clinical.csv").write_text(
        "case_id,site,age,sex,grade,idh,codeletion_1p19q,mgmt,os_days,os_event\nC-1,,,,GBM,,,,,\n"
    )
    (tmp_path / "C-1").mkdir()
    nifti.save(Volume(brain_like().astype(np.float32), ras_affine()), tmp_path / "C-1" / "C-1_t1.nii.gz")
    with pytest.raises(StudyError, match="grade: 'GBM' is not one of LGG, HGG"):
        read_case(tmp_path, "C-1")


# -- DICOM -------------------------------------------------------------------------------------------
def test_dicom_series_matches_source_slices(tmp_path):
    vol = Volume(brain_like((16, 20, 12)), ras_affine((1.0, 1.25, 3.0), (10.0, -30.0, 5.0)))
    study_uid = generate_uid()
    order = list(np.random.default_rng(3).permutation(12))  # files out of order in the zip
    path = dcm.write_zip(tmp_path / "s.zip", {"t1": dcm.series_datasets(vol, "AX T1", study_uid)}, order=order)
    volumes, _ = read_dicom_study(path, mapping={"AX T1": "t1"})
    np.testing.assert_array_equal(volumes["t1"].data, vol.data.astype(np.float32))
    np.testing.assert_allclose(volumes["t1"].affine, vol.affine, atol=1e-4)


def test_multi_series_zip_maps_modalities_by_description(tmp_path):
    vol = Volume(brain_like((12, 12, 8)), ras_affine())
    uid = generate_uid()
    series = {d: dcm.series_datasets(vol, d, uid) for d in ("AX T1 POST GD", "AX T2 FSE", "AX FLAIR", "SAG T1 MPRAGE")}
    volumes, _ = read_dicom_study(dcm.write_zip(tmp_path / "m.zip", series))
    assert set(volumes) == {"t1ce", "t2", "flair", "t1"}


def test_missing_slice_is_reported(tmp_path):
    vol = Volume(brain_like((12, 12, 10)), ras_affine())
    datasets = dcm.series_datasets(vol, "AX T1", generate_uid())
    del datasets[4]
    with pytest.raises(DicomError, match="irregular slice spacing .*missing slices"):
        read_dicom_study(dcm.write_dir(tmp_path / "series", datasets), mapping={"AX T1": "t1"})


def test_zip_with_path_traversal_is_refused(tmp_path):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("../../etc/passwd_overwrite", b"x")
    with pytest.raises(DicomError, match="evil.zip: unsafe path in zip"):
        read_dicom_study(path)


def test_zip_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.dcm", b"\0" * (50 * 1024 * 1024))
    with pytest.raises(DicomError, match="bomb.zip: .*zip bomb"):
        read_dicom_study(path)


def test_zip_without_dicom(tmp_path):
    path = tmp_path / "readme.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("README.txt", b"hello")
    with pytest.raises(DicomError, match="no DICOM images"):
        read_dicom_study(path)


# -- ingest: atomic output, and nothing partial on failure ---------------------------------------------
def test_ingest_failure_leaves_nothing_in_output(tmp_path):
    out = tmp_path / "dataset"
    src = tmp_path / "in"
    src.mkdir()
    nifti.save(Volume(brain_like().astype(np.float32), ras_affine()), src / "x_t1.nii.gz")
    (src / "x_flair.nii.gz").write_bytes(b"\x1f\x8b\x08broken")
    with pytest.raises(StudyError, match="x_flair.nii.gz"):
        ingest(src, out, case_id="C-9")
    assert not (out / "C-9").exists()
    assert [p.name for p in out.iterdir() if not p.name.startswith(".deid")] == []


def test_ingest_nifti_unlabelled_file_name_is_refused(tmp_path):
    src = tmp_path / "scan.nii.gz"
    nifti.save(Volume(brain_like().astype(np.float32), ras_affine()), src)
    with pytest.raises(StudyError, match="cannot tell the modality"):
        ingest(src, tmp_path / "out")


def test_ingest_refuses_to_overwrite_a_case(tmp_path):
    src = tmp_path / "a_t1.nii.gz"
    nifti.save(Volume(brain_like().astype(np.float32), ras_affine()), src)
    ingest(src, tmp_path / "out", case_id="C-1")
    with pytest.raises(StudyError, match="C-1: already in"):
        ingest(src, tmp_path / "out", case_id="C-1")


def test_case_id_cannot_escape_the_dataset(tmp_path):
    src = tmp_path / "a_t1.nii.gz"
    nifti.save(Volume(brain_like().astype(np.float32), ras_affine()), src)
    with pytest.raises(StudyError, match="case id"):
        ingest(src, tmp_path / "out", case_id="../evil")
