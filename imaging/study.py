"""A study: one patient's MRI session (any subset of the four modalities), its geometry and labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from imaging.errors import StudyError

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
GRADES = ("LGG", "HGG")
IDH = ("wildtype", "mutant")
CODELETION = ("intact", "codeleted")
MGMT = ("unmethylated", "methylated")
# Each molecular/grade task: its label values in model output order (index 1 is the "positive" class).
CLASS_LABELS: dict[str, tuple[str, str]] = {
    "grade": GRADES,
    "idh": IDH,
    "codeletion_1p19q": CODELETION,
    "mgmt": MGMT,
}


@dataclass
class Volume:
    """A 3D image with its voxel-to-world (RAS mm) affine."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def same_grid(self, other: "Volume", atol: float = 1e-3) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)


@dataclass
class Labels:
    """Known labels of a case; None means unknown (as in real cohorts, molecular labels often are)."""

    grade: str | None = None
    idh: str | None = None
    codeletion_1p19q: str | None = None
    mgmt: str | None = None
    os_days: float | None = None
    os_event: int | None = None

    def __post_init__(self) -> None:
        for task, allowed in CLASS_LABELS.items():
            value = getattr(self, task)
            if value is not None and value not in allowed:
                raise StudyError(f"{task}: {value!r} is not one of {', '.join(allowed)}")
        if self.os_event not in (None, 0, 1):
            raise StudyError(f"os_event: {self.os_event!r} must be 0 (censored) or 1 (death)")
        if self.os_days is not None and self.os_days < 0:
            raise StudyError(f"os_days: {self.os_days} is negative")


@dataclass
class Study:
    case_id: str
    images: dict[str, Volume]
    site: str | None = None
    age: float | None = None
    sex: str | None = None
    segmentation: Volume | None = None
    labels: Labels = field(default_factory=Labels)
    provenance: dict = field(default_factory=dict)  # how the input became this study (DICOM series mapping)

    def __post_init__(self) -> None:
        unknown = set(self.images) - set(MODALITIES)
        if unknown:
            raise StudyError(f"{self.case_id}: unknown modalities {sorted(unknown)}; expected {', '.join(MODALITIES)}")
        if not self.images:
            raise StudyError(f"{self.case_id}: no modality present (need at least one of {', '.join(MODALITIES)})")

    @property
    def present(self) -> list[str]:
        return [m for m in MODALITIES if m in self.images]

    @property
    def missing(self) -> list[str]:
        return [m for m in MODALITIES if m not in self.images]

    @property
    def reference_name(self) -> str:
        """The modality others are registered to and outputs are mapped back to: T1ce when present (the
        series tumours are read and measured on), else the first present in canonical order."""
        return "t1ce" if "t1ce" in self.images else self.present[0]

    @property
    def reference(self) -> Volume:
        return self.images[self.reference_name]
