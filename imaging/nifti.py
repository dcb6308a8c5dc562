"""NIfTI volumes in and out (nibabel), with the checks that turn bad files into clear errors."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from imaging.errors import StudyError
from imaging.study import Volume

# 256^3 voxels: a 1 mm whole head fits; anything far beyond is refused before it is read.
DEFAULT_MAX_VOXELS = 256 * 256 * 256


def check_array(data: np.ndarray, source: str, max_voxels: int = DEFAULT_MAX_VOXELS) -> np.ndarray:
    """A finite, real, 3D array (a trailing singleton 4th dimension is dropped)."""
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise StudyError(f"{source}: volume has {data.ndim} dimensions {tuple(data.shape)}; expected 3")
    if min(data.shape) < 2:
        raise StudyError(f"{source}: volume shape {tuple(data.shape)} is a slice, not a 3D volume")
    if data.size > max_voxels:
        raise StudyError(f"{source}: {data.size} voxels exceeds the limit of {max_voxels}")
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise StudyError(f"{source}: voxel type {data.dtype} is not a real number type")
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise StudyError(f"{source}: {bad} voxels are NaN or infinite")
    return data


def load(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS, dtype=np.float32) -> Volume:
    """Read a NIfTI file; any defect is a StudyError naming the file and the problem."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise StudyError(f"{name}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a damaged header
        raise StudyError(f"{name}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
        raise StudyError(f"{name}: volume has {len(shape)} dimensions {shape}; expected 3")
    if int(np.prod(shape)) > max_voxels:
        # Refuse before reading: a tiny gzip can declare an enormous image.
        raise StudyError(f"{name}: {int(np.prod(shape))} voxels exceeds the limit of {max_voxels}")
    try:
        data = np.asarray(img.dataobj, dtype=None)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as exc:
        raise StudyError(f"{name}: file is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    data = check_array(np.asarray(data), name, max_voxels)
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise StudyError(f"{name}: header has no valid voxel-to-world affine")
    return Volume(data.astype(dtype, copy=False), np.asarray(affine, dtype=np.float64))


def save(volume: Volume, path: str | Path, dtype=None) -> Path:
    """Write a NIfTI file atomically (a crash never leaves half a file under the final name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = volume.data if dtype is None else volume.data.astype(dtype)
    img = nib.Nifti1Image(data, volume.affine)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    # Deterministic bytes: nibabel's gzip writer stamps mtime 0, so the same volume -> same file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" + ("".join(path.suffixes[-2:])))
    nib.save(img, str(tmp))
    os.replace(tmp, path)
    return path
