"""What a report may say: the facts derived from one findings document, and the layered diagnosis.

Everything a generated text is allowed to claim is here, so the grounding guard can check text against
it and the template composer can write from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

INDETERMINATE_BAND = (0.35, 0.65)  # a marker probability inside this band is not called either way
HIGH_UNCERTAINTY = 0.15  # MC-dropout std above which a marker is called indeterminate
DAYS_PER_MONTH = 30.44


@dataclass(frozen=True)
class Marker:
    name: str
    label: str
    probability: float  # of the stated label
    uncertainty: float

    @property
    def determinate(self) -> bool:
        lo, hi = INDETERMINATE_BAND
        p_positive = self.probability
        return not (lo < p_positive < hi) and self.uncertainty <= HIGH_UNCERTAINTY


@dataclass
class Diagnosis:
    integrated: str
    histology: str
    grade: str
    molecular: list[str]
    determinate: bool


@dataclass
class Facts:
    case_id: str
    hemisphere: str | None
    found: bool
    volumes: dict[str, float]
    enhancement_pct: float | None
    missing: list[str]
    markers: dict[str, Marker]
    risk_group: str
    risk_score: float
    median_days: float | None
    ood_flag: bool
    ood_score: float
    model_versions: dict[str, str]
    implausible: list[str] = field(default_factory=list)  # services.plausibility check names
    diagnosis: Diagnosis = field(init=False)

    def __post_init__(self) -> None:
        self.diagnosis = diagnose(self.markers)

    @property
    def implausible_volumes(self) -> bool:
        return any(c.startswith(("tumour_volume", "volume_")) for c in self.implausible)

    @property
    def uninformative_markers(self) -> bool:
        return "uninformative_probabilities" in self.implausible

    @property
    def median_months(self) -> float | None:
        return None if self.median_days is None else self.median_days / DAYS_PER_MONTH

    def numbers(self) -> set[float]:
        """Every number a report may state (as written: 1 decimal mL, whole percent, days, months)."""
        values = {round(v, 1) for v in self.volumes.values()}
        values |= {round(m.probability * 100) for m in self.markers.values()}
        values |= {round(m.uncertainty, 2) for m in self.markers.values()}
        values |= {round(self.risk_score, 2), round(self.ood_score, 2)}
        if self.enhancement_pct is not None:
            values.add(round(self.enhancement_pct))
        if self.median_days is not None:
            values |= {round(self.median_days), round(self.median_months, 1)}
        return {float(v) for v in values}

    @property
    def grade_numbers(self) -> set[int]:
        return {int(d) for d in re.findall(r"grade (\d)", self.diagnosis.grade)}


def _marker(classification: dict, name: str) -> Marker:
    entry = classification[name]
    label = entry["label"]
    return Marker(name, label, float(entry["probabilities"][label]), float(entry["uncertainty"]))


def from_findings(findings: dict) -> Facts:
    seg, cls, surv, quality = findings["segmentation"], findings["classification"], findings["survival"], findings["quality"]
    volumes = {k: float(v) for k, v in seg["volumes_ml"].items()}
    tc = volumes.get("TC", 0.0)
    markers = {name: _marker(cls, name) for name in ("grade", "idh", "codeletion_1p19q", "mgmt")}
    return Facts(
        case_id=findings["case_id"],
        hemisphere=findings["localization"].get("hemisphere"),
        found=bool(findings["localization"].get("found", True)),
        volumes=volumes,
        enhancement_pct=100 * volumes.get("ET", 0.0) / tc if tc > 0 else None,
        missing=list(quality["missing_modalities"]),
        markers=markers,
        risk_group=surv["risk_group"],
        risk_score=float(surv["risk_score"]),
        median_days=surv.get("median_survival_days"),
        ood_flag=bool(quality["ood_flag"]),
        ood_score=float(quality["ood_score"]),
        model_versions=dict(findings["model_versions"]),
        implausible=[c["check"] for c in quality.get("implausible", [])],
    )


def diagnose(markers: dict[str, Marker]) -> Diagnosis:
    """WHO CNS5 layered diagnosis from the predicted markers (knowledge base: who-cns5)."""
    idh, codel, grade, mgmt = markers["idh"], markers["codeletion_1p19q"], markers["grade"], markers["mgmt"]
    molecular = [f"IDH {idh.label} (p={idh.probability:.2f})", f"1p/19q {codel.label} (p={codel.probability:.2f})",
                 f"MGMT promoter {mgmt.label} (p={mgmt.probability:.2f})"]  # fmt: skip
    determinate = idh.determinate and (idh.label == "wildtype" or codel.determinate)
    if idh.label == "mutant" and codel.label == "codeleted":
        integrated, histology = "Oligodendroglioma, IDH-mutant and 1p/19q-codeleted", "oligodendroglioma"
        who = "CNS WHO grade 3" if grade.label == "HGG" else "CNS WHO grade 2"
    elif idh.label == "mutant":
        integrated, histology = "Astrocytoma, IDH-mutant", "astrocytoma"
        who = "CNS WHO grade 3" if grade.label == "HGG" else "CNS WHO grade 2"
    elif grade.label == "HGG":
        integrated, histology, who = "Glioblastoma, IDH-wildtype", "glioblastoma", "CNS WHO grade 4"
    else:
        # IDH-wildtype without high-grade features: CNS5 needs TERT / EGFR / +7/-10 testing to decide.
        integrated, histology = "Diffuse glioma, IDH-wildtype (molecular testing for glioblastoma criteria needed)", "diffuse glioma"
        who = "CNS WHO grade not assignable from imaging"
    if not determinate:
        integrated = f"Indeterminate; most likely {integrated}"
    return Diagnosis(integrated, histology, who, molecular, determinate)
