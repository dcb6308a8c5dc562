"""Segmentation label conventions and tumour regions (BraTS 2021).

Labels: 0 background, 1 NCR (necrotic core), 2 ED (peritumoral oedema), 4 ET (enhancing tumour).
BraTS 2023 files write ET as 3; they are read as 4. Regions: WT = 1+2+4, TC = 1+4, ET = 4.
"""

from __future__ import annotations

import numpy as np

NCR, ED, ET = 1, 2, 4
LABELS = {"NCR": NCR, "ED": ED, "ET": ET}
BRATS2023_ET = 3
REGIONS: dict[str, tuple[int, ...]] = {"WT": (NCR, ED, ET), "TC": (NCR, ET), "ET": (ET,)}
# Model channel order for the segmentation network's output classes.
CLASS_TO_LABEL = np.array([0, NCR, ED, ET], dtype=np.uint8)


def normalise_labels(seg: np.ndarray, source: str = "segmentation") -> np.ndarray:
    """Return labels in the BraTS 2021 convention (uint8 of {0,1,2,4}); 3 (BraTS 2023 ET) becomes 4."""
    from imaging.errors import StudyError

    seg = np.asarray(seg)
    if not np.all(np.isfinite(seg)) or np.any(seg != np.round(seg)):
        raise StudyError(f"{source}: labels must be whole numbers")
    values = set(np.unique(seg).astype(int).tolist())
    unknown = values - {0, NCR, ED, BRATS2023_ET, ET}
    if unknown:
        raise StudyError(f"{source}: unknown label values {sorted(unknown)} (expected 0, 1, 2, 4; or 3 for ET)")
    if BRATS2023_ET in values and ET in values:
        raise StudyError(f"{source}: both 3 and 4 present; cannot tell which convention the file uses")
    out = seg.astype(np.uint8)
    out[out == BRATS2023_ET] = ET
    return out


def region_mask(seg: np.ndarray, region: str) -> np.ndarray:
    return np.isin(seg, REGIONS[region])


def labels_to_classes(seg: np.ndarray) -> np.ndarray:
    """BraTS labels -> contiguous class indices 0..3 (for losses)."""
    classes = np.zeros(seg.shape, dtype=np.int64)
    for index, label in enumerate(CLASS_TO_LABEL):
        classes[seg == label] = index
    return classes
