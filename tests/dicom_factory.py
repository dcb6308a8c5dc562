"""Write DICOM MR series from volumes, with planted PHI, for reader and de-identification tests."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from imaging.dicom_series import LPS_TO_RAS
from imaging.study import Volume

PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-4455-PHI",
    "PatientBirthDate": "19630402",
    "PatientAddress": "12 Baker Street",
    "OtherPatientIDs": "OTHER-ID-7788",
    "InstitutionName": "St Elsewhere General",
    "ReferringPhysicianName": "House^Gregory",
    "AccessionNumber": "ACC-99812",
    "StudyDescription": "MRI brain for Jane Doe",
    "StudyDate": "20240315",
}
PRIVATE_VALUE = "PRIVATE-PHI-TOKEN"
PHI_STRINGS = [*PHI.values(), PRIVATE_VALUE, "Jane", "Doe", "Elsewhere", "Gregory"]


def series_datasets(volume: Volume, description: str, study_uid: str, age: str = "052Y", sex: str = "F") -> list[FileDataset]:
    lps = LPS_TO_RAS @ volume.affine
    a_i, a_j = lps[:3, 0], lps[:3, 1]
    row_cos, col_cos = a_i / np.linalg.norm(a_i), a_j / np.linalg.norm(a_j)
    series_uid, frame_uid = generate_uid(), generate_uid()
    out = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(f"slice{k}", {}, file_meta=meta, preamble=b"\0" * 128)
        for key, value in PHI.items():
            setattr(ds, key, value)
        ds.PatientAge, ds.PatientSex = age, sex
        ds.StudyTime, ds.SeriesDate = "101500", PHI["StudyDate"]
        ds.add_new((0x0011, 0x0010), "LO", "ACME PRIVATE")
        ds.add_new((0x0011, 0x1010), "LO", PRIVATE_VALUE)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.SeriesDescription, ds.InstanceNumber = "MR", description, k + 1
        ds.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
        ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([0, 0, k, 1.0]))[:3]]
        ds.PixelSpacing = [float(np.linalg.norm(a_j)), float(np.linalg.norm(a_i))]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        pixels = np.ascontiguousarray(volume.data[:, :, k].T.astype(np.int16))
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out


def to_bytes(ds: FileDataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_zip(path: Path, series: dict[str, list[FileDataset]], order=None) -> Path:
    """A zip of several series; `order` (a permutation) shuffles the slice files."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, datasets in series.items():
            indices = order if order is not None else range(len(datasets))
            for i in indices:
                archive.writestr(f"{name}/IM{i:04d}.dcm", to_bytes(datasets[i]))
    return path


def write_dir(folder: Path, datasets: list[FileDataset]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(datasets):
        (folder / f"IM{i:04d}.dcm").write_bytes(to_bytes(ds))
    return folder


def jpeg_lossless(datasets: list[FileDataset]) -> list[FileDataset]:
    """The same slices with JPEG Lossless (process 14, selection value 1) pixel data, as many PACS store them.
    Encoded with imagecodecs' libjpeg-turbo (a test-only encoder; the platform only decodes)."""
    import imagecodecs
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    for ds in datasets:
        pixels = ds.pixel_array.astype(np.uint16)  # a lossless JPEG of the raw 16-bit words
        ds.PixelRepresentation = 0
        ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1)])
        ds["PixelData"].is_undefined_length = True
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    return datasets


def enhanced_mr(volume: Volume, description: str, study_uid: str) -> FileDataset:
    """One Enhanced MR Image object holding every slice as a frame, positioned by functional groups."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedMRImageStorage

    lps = LPS_TO_RAS @ volume.affine
    a_i, a_j = lps[:3, 0], lps[:3, 1]
    row_cos, col_cos = a_i / np.linalg.norm(a_i), a_j / np.linalg.norm(a_j)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("enhanced", {}, file_meta=meta, preamble=b"\0" * 128)
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedMRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, generate_uid(), generate_uid()
    ds.Modality, ds.SeriesDescription, ds.PatientAge, ds.PatientSex = "MR", description, "052Y", "F"
    shared = Dataset()
    orient, measures = Dataset(), Dataset()
    orient.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
    measures.PixelSpacing = [float(np.linalg.norm(a_j)), float(np.linalg.norm(a_i))]
    measures.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orient]), Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in range(volume.shape[2]):
        group, position = Dataset(), Dataset()
        position.ImagePositionPatient = [float(v) for v in (lps @ np.array([0, 0, k, 1.0]))[:3]]
        group.PlanePositionSequence = Sequence([position])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    pixels = np.ascontiguousarray(np.stack([volume.data[:, :, k].T for k in range(volume.shape[2])]).astype(np.int16))
    ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = pixels.tobytes()
    return ds
