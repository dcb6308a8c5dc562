"""The quality-control picture of a prepared study: what a reader checks before trusting the numbers.

Three planes (axial, coronal, sagittal) through the brain's centre on the model grid. First column:
the reference modality with the brain mask's outline (red); then, per other present modality, a
checkerboard of reference and modality tiles: misregistration shows as broken edges at tile borders.
Returned as PNG bytes (Pillow).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage

from imaging.study import MODALITIES

TILE_VOX = 8  # checkerboard square, in model-grid voxels


def _window(plane: np.ndarray, inside: np.ndarray) -> np.ndarray:
    values = plane[inside] if inside.any() else plane.ravel()
    lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    return np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1) * inside  # black outside the brain


def _planes(volume: np.ndarray, centre: np.ndarray) -> list[np.ndarray]:
    x, y, z = (int(c) for c in centre)
    # Displayed radiologically upright: rows top->bottom = superior->inferior / anterior->posterior.
    return [np.rot90(volume[:, :, z]), np.rot90(volume[:, y, :]), np.rot90(volume[x, :, :])]


def qc_png(prepared, scale: int = 2) -> bytes:
    mask = prepared.brain_mask
    centre = np.argwhere(mask).mean(0) if mask.any() else np.array(mask.shape) / 2
    ref_index = MODALITIES.index(prepared.record.get("reference", MODALITIES[0]))
    others = [i for i in np.flatnonzero(prepared.presence) if i != ref_index]
    ref_planes = _planes(prepared.image[ref_index], centre)
    mask_planes = _planes(mask, centre)
    rows = []
    for p, (ref, inside) in enumerate(zip(ref_planes, mask_planes)):
        ref_w = _window(ref, inside)
        edge = inside & ~ndimage.binary_erosion(inside)
        outline = np.stack([np.where(edge, 1.0, ref_w), np.where(edge, 0.0, ref_w), np.where(edge, 0.0, ref_w)], -1)
        tiles = [outline]
        for i in others:
            other = _window(_planes(prepared.image[i], centre)[p], inside)
            yy, xx = np.indices(ref.shape)
            board = ((yy // TILE_VOX + xx // TILE_VOX) % 2).astype(bool)
            mix = np.where(board, ref_w, other)
            tiles.append(np.stack([mix] * 3, -1))
        rows.append(tiles)
    height = sum(max(t.shape[0] for t in row) for row in rows)
    width = max(sum(t.shape[1] for t in row) for row in rows)
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    top = 0
    for row in rows:
        left, row_h = 0, max(t.shape[0] for t in row)
        for tile in row:
            canvas[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
            left += tile.shape[1]
        top += row_h
    image = Image.fromarray((canvas * 255).astype(np.uint8)).resize((width * scale, height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
