"""Volumes (numpy, nibabel's RAS world) <-> SimpleITK images (ITK's LPS world), and resampling.

SimpleITK's resampler is multi-threaded and evaluates a transform per output point, so a chain
"model grid -> reference world -> moving world" interpolates each image once (the CaPTk habit).
nibabel indexes arrays (i, j, k) with a RAS affine; ITK indexes (x, y, z) with an LPS origin and
direction, and GetImageFromArray reverses the axes. Both facts are handled here and nowhere else.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from imaging.study import Volume

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """An (i, j, k) array with a RAS affine -> a SimpleITK image with the same world geometry (LPS)."""
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in lps[:3, 3]))
    image.SetDirection(tuple(float(d) for d in (lps[:3, :3] / spacing).ravel()))
    return image


def volume_to_sitk(volume: Volume, dtype=np.float32) -> sitk.Image:
    return to_sitk(np.asarray(volume.data, dtype=dtype), volume.affine)


def from_sitk(image: sitk.Image) -> np.ndarray:
    """A SimpleITK image -> the (i, j, k) array (a copy)."""
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)).copy()


def reference_image(shape: tuple[int, int, int], affine: np.ndarray) -> sitk.Image:
    """An empty image that only carries a grid (what Resample needs to know the output geometry)."""
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    ref = sitk.Image([int(s) for s in shape], sitk.sitkUInt8)
    ref.SetSpacing(tuple(float(s) for s in spacing))
    ref.SetOrigin(tuple(float(o) for o in lps[:3, 3]))
    ref.SetDirection(tuple(float(d) for d in (lps[:3, :3] / spacing).ravel()))
    return ref


def resample(
    volume: Volume,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    order: int = 1,
    transform: sitk.Transform | None = None,
    threads: int = 0,
) -> np.ndarray:
    """`volume` sampled on the grid (shape, affine). `transform` maps output world points (LPS) to the
    volume's world (ITK's convention: fixed -> moving), so a registration result is applied directly.
    order 0 = nearest neighbour (labels), 1 = trilinear. Outside the volume: 0."""
    is_labels = order == 0
    image = volume_to_sitk(volume, np.int16 if is_labels else np.float32)
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(reference_image(shape, affine))
    resampler.SetInterpolator(sitk.sitkNearestNeighbor if is_labels else sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0)
    resampler.SetOutputPixelType(sitk.sitkInt16 if is_labels else sitk.sitkFloat32)
    resampler.SetTransform(transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity))
    if threads:
        resampler.SetNumberOfThreads(threads)
    return from_sitk(resampler.Execute(image))


def ras_matrix(transform: sitk.Transform) -> np.ndarray:
    """Any affine-like ITK transform (LPS, fixed -> moving, composite included) as a 4x4 RAS matrix,
    read off the images of the origin and the unit vectors."""
    pts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    mapped = np.array([transform.TransformPoint(tuple(float(c) for c in p)) for p in pts])
    lps = np.eye(4)
    lps[:3, 3] = mapped[0]
    lps[:3, :3] = (mapped[1:] - mapped[0]).T
    return RAS_TO_LPS @ lps @ RAS_TO_LPS


def rigid_from_ras(matrix: np.ndarray) -> sitk.Transform:
    """A 4x4 RAS (fixed -> moving) matrix as an ITK affine transform in LPS."""
    lps = RAS_TO_LPS @ np.asarray(matrix, dtype=np.float64) @ RAS_TO_LPS
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(lps[:3, :3].ravel()))
    tx.SetTranslation(tuple(lps[:3, 3]))
    return tx
