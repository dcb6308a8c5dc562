"""Quality control of a prepared study: figures, limits, and a refusal that names the failing check.

Limits are plausibility bounds for an adult or paediatric head MRI, not tuned to any dataset:
- brain_volume: the brain mask on the model grid, 150-2500 mL (an infant brain is ~400 mL, an adult
  1.0-1.9 L with CSF; a mask over the whole head or grid is 3-8 L, a failed mask a few mL);
- brain_shape: the fraction of its bounding box the mask fills, 0.30-0.90 (an ellipsoid fills 0.52, a
  brain ~0.55; a box-shaped "mask" fills 1.0, scattered noise far less);
- registration: per moving modality, the normalised mutual information with the reference after
  registration (imaging.register.NMI_MIN_SAME_HEAD);
- grid_overlap: the share of the brain that lies inside the model grid, >= 0.95.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imaging.errors import StudyError

BRAIN_ML = (150.0, 2500.0)
BRAIN_FILL = (0.30, 0.90)
GRID_OVERLAP_MIN = 0.95
QUALITY_MODES = ("refuse", "flag")


@dataclass
class Check:
    name: str
    passed: bool
    value: float
    limit: str
    detail: str = ""

    def to_json(self) -> dict:
        return {"check": self.name, "passed": self.passed, "value": round(float(self.value), 4), "limit": self.limit,
                **({"detail": self.detail} if self.detail else {})}  # fmt: skip

    def message(self) -> str:
        return f"{self.name} = {self.value:.4g} (limit {self.limit}){': ' + self.detail if self.detail else ''}"


class QualityError(StudyError):
    """A study that failed quality control; `checks` lists the failing ones (the API answers 422)."""

    def __init__(self, case_id: str, failed: list[Check]):
        self.checks = failed
        super().__init__(f"{case_id}: quality control failed: " + "; ".join(c.message() for c in failed))


def brain_volume_check(ml: float) -> Check:
    lo, hi = BRAIN_ML
    return Check("brain_volume", lo <= ml <= hi, ml, f"{lo:g}-{hi:g} mL",
                 "" if lo <= ml <= hi else "not a plausible brain mask (skull stripping failed, or not a head?)")  # fmt: skip


def brain_shape_check(mask: np.ndarray) -> Check:
    idx = np.argwhere(mask)
    if idx.size == 0:
        return Check("brain_shape", False, 0.0, f"{BRAIN_FILL[0]:g}-{BRAIN_FILL[1]:g} of its bounding box", "empty mask")
    box = np.prod(idx.max(0) - idx.min(0) + 1)
    fill = float(mask.sum()) / float(box)
    ok = BRAIN_FILL[0] <= fill <= BRAIN_FILL[1]
    return Check("brain_shape", ok, fill, f"{BRAIN_FILL[0]:g}-{BRAIN_FILL[1]:g} of its bounding box",
                 "" if ok else "the mask is not brain-shaped")  # fmt: skip


def registration_check(reg) -> Check:
    from imaging.register import NMI_MIN_SAME_HEAD

    return Check(f"registration:{reg.modality}", reg.passed, reg.nmi_after, f">= {NMI_MIN_SAME_HEAD} NMI",
                 "" if reg.passed else f"{reg.modality} does not match the reference after registration "
                 "(another head, or registration failed)")  # fmt: skip


def grid_overlap_check(brain_on_ref: np.ndarray, ref_affine: np.ndarray, grid) -> Check:
    idx = np.argwhere(brain_on_ref)
    if idx.size == 0:
        return Check("grid_overlap", False, 0.0, f">= {GRID_OVERLAP_MIN}", "no brain found")
    world = idx @ ref_affine[:3, :3].T + ref_affine[:3, 3]
    vox = grid.world_to_vox(world)
    inside = np.all((vox >= -0.5) & (vox <= np.array(grid.shape) - 0.5), axis=1)
    share = float(inside.mean())
    ok = share >= GRID_OVERLAP_MIN
    return Check("grid_overlap", ok, share, f">= {GRID_OVERLAP_MIN}",
                 "" if ok else "part of the brain lies outside the model's field of view")  # fmt: skip


def enforce(case_id: str, checks: list[Check], mode: str) -> list[str]:
    """Refuse (QualityError) or return the failing checks' names as flags."""
    if mode not in QUALITY_MODES:
        raise StudyError(f"quality_mode={mode!r}: expected one of {', '.join(QUALITY_MODES)}")
    failed = [c for c in checks if not c.passed]
    if failed and mode == "refuse":
        raise QualityError(case_id, failed)
    return [c.name for c in failed]
