"""DICOM series (a directory or a zip) -> 3D volumes per modality, with a RAS affine.

Slices are sorted by their position along the slice normal; spacing and orientation come from the
headers (ImagePositionPatient, ImageOrientationPatient, PixelSpacing). DICOM's patient space is LPS;
volumes come out in nibabel's RAS world. Enhanced (multi-frame) MR objects are split into their frames,
positioned from the functional groups. Compressed pixel data (JPEG lossless, JPEG-LS, JPEG 2000, RLE)
decode through pydicom's pylibjpeg plugins. Zips are read entry by entry in memory, never extracted:
absolute paths, `..` components, symlinks and decompression bombs are refused.
"""

from __future__ import annotations

import io
import re
import stat
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from imaging.dicom_mapping import SeriesMapping, classify_series
from imaging.errors import DicomError
from imaging.study import MODALITIES, Volume

MAX_ZIP_BYTES = 2 * 1024**3  # total uncompressed
MAX_ZIP_ENTRIES = 20000
MAX_COMPRESSION_RATIO = 200  # DICOM pixel data rarely compresses beyond ~10:1
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Series:
    uid: str
    description: str
    datasets: list[Dataset] = field(default_factory=list)


def _check_zip_entry(info: zipfile.ZipInfo, source: str) -> None:
    name = info.filename
    parts = Path(name).parts
    if name.startswith("/") or name.startswith("\\") or ".." in parts or re.match(r"^[A-Za-z]:", name):
        raise DicomError(f"{source}: unsafe path in zip: {name!r}")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DicomError(f"{source}: zip contains a symbolic link: {name!r}")
    if info.file_size > 0 and info.compress_size > 0 and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
        raise DicomError(f"{source}: {name!r} expands {info.file_size / info.compress_size:.0f}x (zip bomb?)")


def _read_zip(path: Path, max_bytes: int = MAX_ZIP_BYTES) -> list[tuple[str, bytes]]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DicomError(f"{path.name}: not a readable zip ({exc})") from None
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if len(infos) > MAX_ZIP_ENTRIES:
            raise DicomError(f"{path.name}: {len(infos)} entries exceeds the limit of {MAX_ZIP_ENTRIES}")
        for info in infos:
            _check_zip_entry(info, path.name)
        if sum(i.file_size for i in infos) > max_bytes:
            raise DicomError(f"{path.name}: uncompressed size exceeds the limit of {max_bytes} bytes")
        out, total = [], 0
        for info in infos:
            with archive.open(info) as handle:
                # Headers can lie about sizes: read at most what remains of the budget.
                data = handle.read(max_bytes - total + 1)
            total += len(data)
            if total > max_bytes:
                raise DicomError(f"{path.name}: uncompressed size exceeds the limit of {max_bytes} bytes")
            out.append((info.filename, data))
        return out


def _read_files(source: Path) -> list[tuple[str, bytes]]:
    if source.is_dir():
        return [(str(p.relative_to(source)), p.read_bytes()) for p in sorted(source.rglob("*")) if p.is_file()]
    if zipfile.is_zipfile(source):
        return _read_zip(source)
    if source.is_file():
        return [(source.name, source.read_bytes())]
    raise DicomError(f"{source}: not found")


class FrameDataset(Dataset):
    """One frame of an enhanced (multi-frame) MR object, shaped like a classic single-slice dataset."""

    def __init__(self, parent: Dataset, index: int, pixels: np.ndarray):
        super().__init__()
        shared = parent.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        frame = parent.PerFrameFunctionalGroupsSequence[index]

        def group(name: str):
            for source in (frame, shared):
                if name in source and len(source[name].value):
                    return source[name].value[0]
            raise DicomError(f"enhanced MR frame {index + 1}: no {name}")

        self.SeriesInstanceUID = parent.get("SeriesInstanceUID", "unknown")
        self.SeriesDescription = parent.get("SeriesDescription", "")
        for key in ("StudyInstanceUID", "ProtocolName", "ImageType", "ContrastBolusAgent", "RepetitionTime", "EchoTime",
                    "InversionTime", "SOPInstanceUID", "Modality", "PatientAge", "PatientSex", "PatientBirthDate",
                    "StudyDate", "FrameOfReferenceUID"):  # fmt: skip
            if key in parent:
                setattr(self, key, parent.get(key))
        self.ImagePositionPatient = list(group("PlanePositionSequence").ImagePositionPatient)
        self.ImageOrientationPatient = list(group("PlaneOrientationSequence").ImageOrientationPatient)
        self.PixelSpacing = list(group("PixelMeasuresSequence").PixelSpacing)
        try:
            rescale = group("PixelValueTransformationSequence")
            self.RescaleSlope, self.RescaleIntercept = rescale.get("RescaleSlope", 1), rescale.get("RescaleIntercept", 0)
        except DicomError:
            pass
        self.Rows, self.Columns = parent.Rows, parent.Columns
        self.frame_index, self._pixels = index, pixels

    @property
    def pixel_array(self) -> np.ndarray:  # type: ignore[override]
        return self._pixels


def _frames(ds: Dataset, name: str) -> list[Dataset]:
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise DicomError(f"{name}: enhanced MR pixel data cannot be decoded ({exc})") from None
    pixels = pixels.reshape((-1, ds.Rows, ds.Columns))
    if len(ds.PerFrameFunctionalGroupsSequence) != pixels.shape[0]:
        raise DicomError(f"{name}: {pixels.shape[0]} frames but {len(ds.PerFrameFunctionalGroupsSequence)} functional groups")
    return [FrameDataset(ds, i, pixels[i]) for i in range(pixels.shape[0])]


def read_datasets(source: str | Path) -> list[Dataset]:
    """Every DICOM image object in a directory or zip (non-DICOM files such as DICOMDIR are skipped);
    an enhanced MR object contributes one dataset per frame."""
    source = Path(source)
    datasets = []
    for name, data in _read_files(source):
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=False)
        except Exception:  # not DICOM (README, DICOMDIR, thumbnails): skipped
            continue
        if "PixelData" in ds and "PerFrameFunctionalGroupsSequence" in ds:
            datasets.extend(_frames(ds, name))
        elif "PixelData" in ds and "ImagePositionPatient" in ds:
            ds.filename = name
            datasets.append(ds)
    if not datasets:
        raise DicomError(f"{source.name}: no DICOM images with position information found")
    return datasets


def group_series(datasets: list[Dataset]) -> list[Series]:
    groups: dict[str, Series] = {}
    for ds in datasets:
        uid = str(ds.get("SeriesInstanceUID", "unknown"))
        series = groups.setdefault(uid, Series(uid, str(ds.get("SeriesDescription", ""))))
        series.datasets.append(ds)
    return list(groups.values())


def guess_modality(description: str) -> str | None:
    """The modality a series description names (imaging.dicom_mapping), or None."""
    return classify_series(description).modality


def map_series(series: list[Series], mapping: dict[str, str] | None = None) -> dict[str, Series]:
    """Assign series to modalities; see `decide_mapping` for the decisions and their confidence."""
    return {m: s for m, (s, _) in decide_mapping(series, mapping).items()}


def decide_mapping(series: list[Series], mapping: dict[str, str] | None = None) -> dict[str, tuple[Series, SeriesMapping]]:
    """Series -> modality: an explicit mapping (SeriesInstanceUID or SeriesDescription -> modality) wins,
    else vendor-aware rules on the description, protocol name and acquisition tags (imaging.dicom_mapping).
    Localisers, scouts and other sequences are ignored. Ambiguity is an error, never a silent choice."""
    result: dict[str, tuple[Series, SeriesMapping]] = {}
    for s in series:
        decision = None
        if mapping and (mapping.get(s.uid) or mapping.get(s.description)):
            decision = SeriesMapping(mapping.get(s.uid) or mapping[s.description], 1.0, "explicit --mapping")
        if decision is None and (len(series) > 1 or not mapping):
            decision = classify_series(s.description, s.datasets[0] if s.datasets else None)
        modality = decision.modality if decision else None
        if modality is None and len(series) == 1:
            raise DicomError(
                f"series {s.description!r}: cannot tell its modality; pass a mapping such as {{'{s.description}': 't1'}}"
            )
        if modality is None:
            continue
        if modality not in MODALITIES:
            raise DicomError(f"mapping names unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
        if modality in result:
            raise DicomError(
                f"two series map to {modality}: {result[modality][0].description!r} and {s.description!r}; "
                "pass an explicit mapping"
            )
        result[modality] = (s, decision)
    if not result:
        raise DicomError("no series could be mapped to t1, t1ce, t2 or flair")
    return result


def mapping_record(decided: dict[str, tuple[Series, SeriesMapping]]) -> dict[str, dict]:
    """The decisions for the output, series named by their de-identified description (names can hold PHI)."""
    from imaging.deidentify import clean_description

    return {m: {"series": clean_description(s.description) if s.description else "(no description)", **d.to_json()}
            for m, (s, d) in decided.items()}  # fmt: skip


def sorted_slices(datasets: list[Dataset]) -> list[Dataset]:
    """Slices in the volume's order (ascending along the slice normal): frame k is the volume's z = k."""
    orient = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orient[:3], orient[3:])
    return sorted(datasets, key=lambda ds: float(np.array(ds.ImagePositionPatient, dtype=float) @ normal))


def series_to_volume(series: Series, source: str = "series") -> Volume:
    """Sort slices along the normal, check the spacing is regular, build the RAS affine."""
    sets = series.datasets
    name = series.description or series.uid
    first = sets[0]
    try:
        orient = np.array(first.ImageOrientationPatient, dtype=float)
        row_cos, col_cos = orient[:3], orient[3:]
        normal = np.cross(row_cos, col_cos)
        spacing_rc = np.array(first.PixelSpacing, dtype=float)  # (between rows, between columns)
    except (AttributeError, ValueError, TypeError) as exc:
        raise DicomError(f"{source} {name!r}: missing orientation or pixel spacing ({exc})") from None
    for ds in sets:
        if not np.allclose(np.array(ds.ImageOrientationPatient, dtype=float), orient, atol=1e-4):
            raise DicomError(f"{source} {name!r}: slices have different orientations")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise DicomError(f"{source} {name!r}: slices have different sizes")
    sets = sorted_slices(sets)
    positions = np.array([np.array(ds.ImagePositionPatient, dtype=float) for ds in sets])
    along = positions @ normal
    if len(sets) < 2:
        raise DicomError(f"{source} {name!r}: a single slice is not a 3D volume")
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        raise DicomError(f"{source} {name!r}: duplicate slice positions")
    step = float(np.median(gaps))
    if np.any(np.abs(gaps - step) > 0.1 * step):
        worst = int(np.argmax(np.abs(gaps - step)))
        raise DicomError(
            f"{source} {name!r}: irregular slice spacing ({gaps[worst]:.2f} mm after slice {worst + 1}, "
            f"expected {step:.2f} mm): missing slices?"
        )
    try:
        slices = [
            ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1)
            + float(ds.get("RescaleIntercept", 0) or 0)
            for ds in sets
        ]
    except Exception as exc:
        raise DicomError(f"{source} {name!r}: pixel data cannot be decoded ({exc})") from None
    # pixel_array is (rows, columns); the volume is indexed (column, row, slice).
    data = np.stack([s.T for s in slices], axis=-1)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * spacing_rc[1]
    affine_lps[:3, 1] = col_cos * spacing_rc[0]
    affine_lps[:3, 2] = (positions[-1] - positions[0]) / (len(sets) - 1)
    affine_lps[:3, 3] = positions[0]
    return Volume(data, LPS_TO_RAS @ affine_lps)


def read_dicom_study(source: str | Path, mapping: dict[str, str] | None = None) -> tuple[dict[str, Volume], list[Dataset]]:
    """Volumes per modality from a DICOM directory or zip, plus the datasets they came from."""
    volumes, datasets, _ = read_dicom_study_mapped(source, mapping)
    return volumes, datasets


def read_dicom_study_mapped(source: str | Path, mapping: dict[str, str] | None = None):
    """As read_dicom_study, plus the mapping decisions: modality -> {series, confidence, reason}."""
    datasets = read_datasets(source)
    decided = decide_mapping(group_series(datasets), mapping)
    volumes = {m: series_to_volume(s, Path(source).name) for m, (s, _) in decided.items()}
    decisions = mapping_record(decided)
    return volumes, datasets, decisions
