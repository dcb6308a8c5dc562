"""DICOM as scanners write it: vendor series names, localisers, JPEG-lossless pixel data, enhanced MR."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from pydicom.uid import generate_uid

from imaging.dicom_mapping import classify_series
from imaging.dicom_series import read_dicom_study, read_dicom_study_mapped
from imaging.errors import DicomError
from imaging.study import Volume
from tests import dicom_factory as dcm


def volume(seed: int, shape=(20, 24, 8)) -> Volume:
    rng = np.random.default_rng(seed)
    data = rng.integers(100, 1000, size=shape).astype(np.int16)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-20.0, -24.0, -12.0]
    return Volume(data, affine)


VENDORS = {
    "siemens": {"t1_mprage_sag_p2_iso": "t1", "t1_se_tra_KM": "t1ce", "t2_tse_tra_512": "t2",
                "t2_tse_dark-fluid_tra": "flair", "AAHead_Scout_32ch-head-coil": None},
    "ge": {"AX T1 FLAIR": "t1", "AX T1 +C": "t1ce", "Ax T2 FRFSE": "t2", "AX T2 FLAIR": "flair", "3-Plane Loc": None},
    "philips": {"T1W_3D_TFE": "t1", "T1W_3D_TFE+C": "t1ce", "T2W_TSE": "t2", "FLAIR_longTR": "flair", "Survey_SHC": None},
}  # fmt: skip


@pytest.mark.parametrize("vendor", sorted(VENDORS))
def test_vendor_series_names_map_the_four_modalities_and_skip_the_localiser(tmp_path, vendor):
    study_uid = generate_uid()
    names = VENDORS[vendor]
    series = {f"s{i}": dcm.series_datasets(volume(i), name, study_uid) for i, name in enumerate(names)}
    volumes, _, decisions = read_dicom_study_mapped(dcm.write_zip(tmp_path / f"{vendor}.zip", series))
    expected = {modality: name for name, modality in names.items() if modality}
    assert sorted(volumes) == sorted(expected)
    for modality, name in expected.items():
        assert decisions[modality]["confidence"] >= 0.9, decisions[modality]
        index = list(names).index(name)
        np.testing.assert_array_equal(volumes[modality].data, volume(index).data)  # the right series, not just a name


def test_tags_decide_when_the_name_says_nothing():
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.RepetitionTime, ds.EchoTime, ds.InversionTime = 9000, 90, 2500
    decision = classify_series("Series 7", ds)
    assert decision.modality == "flair" and decision.confidence < 0.9 and "inversion" in decision.reason
    ds = Dataset()
    ds.RepetitionTime, ds.EchoTime, ds.ContrastBolusAgent = 550, 12, "Gadovist"
    assert classify_series("ax 3", ds).modality == "t1ce"
    # Name and tags disagreeing lowers the confidence and says so.
    ds = Dataset()
    ds.RepetitionTime, ds.EchoTime = 5000, 100
    disagreeing = classify_series("AX T1", ds)
    assert disagreeing.modality == "t1" and disagreeing.confidence < 0.9 and "--mapping" in disagreeing.reason


def test_every_decision_can_be_overridden_with_a_mapping(tmp_path):
    study_uid = generate_uid()
    series = {"a": dcm.series_datasets(volume(0), "Series 3", study_uid), "b": dcm.series_datasets(volume(1), "AX T2", study_uid)}
    path = dcm.write_zip(tmp_path / "m.zip", series)
    volumes, _, decisions = read_dicom_study_mapped(path, mapping={"Series 3": "t1ce", "AX T2": "flair"})
    assert sorted(volumes) == ["flair", "t1ce"]
    assert decisions["t1ce"]["reason"] == "explicit --mapping" and decisions["t1ce"]["confidence"] == 1.0


def test_jpeg_lossless_series_decodes_to_the_same_voxels(tmp_path):
    vol = volume(3)
    datasets = dcm.jpeg_lossless(dcm.series_datasets(vol, "AX T1 +C", generate_uid()))
    assert str(datasets[0].file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.70"
    volumes, _ = read_dicom_study(dcm.write_dir(tmp_path / "jpeg", datasets))
    np.testing.assert_array_equal(volumes["t1ce"].data, vol.data)
    np.testing.assert_allclose(volumes["t1ce"].affine, vol.affine, atol=1e-6)


def test_jpeg_2000_series_decodes(tmp_path):
    from pydicom.uid import JPEG2000Lossless

    vol = volume(4, shape=(64, 64, 4))  # JPEG 2000 needs tiles larger than its resolution levels
    datasets = dcm.series_datasets(vol, "AX FLAIR", generate_uid())
    for ds in datasets:
        ds.compress(JPEG2000Lossless)
    volumes, _ = read_dicom_study(dcm.write_dir(tmp_path / "j2k", datasets))
    np.testing.assert_array_equal(volumes["flair"].data, vol.data)


def test_enhanced_multiframe_mr_loads_with_its_geometry(tmp_path):
    vol = volume(5)
    ds = dcm.enhanced_mr(vol, "t2_tse_dark-fluid_tra", generate_uid())
    (tmp_path / "enh").mkdir()
    (tmp_path / "enh" / "IM0001.dcm").write_bytes(dcm.to_bytes(ds))
    volumes, _, decisions = read_dicom_study_mapped(tmp_path / "enh")
    assert list(volumes) == ["flair"] and decisions["flair"]["confidence"] >= 0.9
    np.testing.assert_array_equal(volumes["flair"].data, vol.data)
    np.testing.assert_allclose(volumes["flair"].affine, vol.affine, atol=1e-6)


def test_enhanced_mr_with_missing_functional_groups_is_a_clear_error(tmp_path):
    ds = dcm.enhanced_mr(volume(6), "AX T1", generate_uid())
    del ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence
    del ds.SharedFunctionalGroupsSequence  # no fallback for the position either
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "IM.dcm").write_bytes(dcm.to_bytes(ds))
    with pytest.raises(DicomError, match="no PlanePositionSequence|no PlaneOrientationSequence"):
        read_dicom_study(tmp_path / "bad")


def test_series_names_in_the_output_are_de_identified(tmp_path):
    study_uid = generate_uid()
    series = {"a": dcm.series_datasets(volume(0), "AX T1 POST Jane Doe", study_uid)}
    path = tmp_path / "phi.zip"
    dcm.write_zip(path, series)
    assert zipfile.is_zipfile(path)
    _, _, decisions = read_dicom_study_mapped(path)
    assert decisions["t1ce"]["series"] and "jane" not in str(decisions).lower()
