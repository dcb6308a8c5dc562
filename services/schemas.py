"""The published findings schema (pydantic): what a study analysis returns to apps.

Coordinates are voxel indices on the *input's* reference grid (the first present modality in the
order t1, t1ce, t2, flair); volumes are in mL; probabilities are calibrated; uncertainty is the
MC-dropout standard deviation of the positive-class probability.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class LocalizationFindings(BaseModel):
    found: bool
    bbox_vox: list[float] = Field(..., description="[x0, y0, z0, x1, y1, z1], inclusive, input grid")
    centroid_vox: list[float] = Field(..., description="[x, y, z], input grid")
    hemisphere: str | None = Field(None, description="left | right | midline: tumour centre vs the brain's centre (RAS)")


class SegmentationUncertainty(BaseModel):
    tta_disagreement: float = Field(..., description="1 - mean Dice (whole tumour) of each mirrored pass to their consensus")
    passes: int


class SegmentationFindings(BaseModel):
    volumes_ml: dict[str, float] = Field(..., description="NCR, ED, ET, WT, TC")
    mask: str = Field(..., description="Name of the mask output (NIfTI, labels 1 NCR, 2 ED, 4 ET, input grid)")
    uncertainty: SegmentationUncertainty | None = Field(
        None, description="mirroring test-time augmentation's disagreement (only when it ran)")


class MarkerFindings(BaseModel):
    label: str
    probabilities: dict[str, float]
    uncertainty: float


class ClassificationFindings(BaseModel):
    grade: MarkerFindings
    idh: MarkerFindings
    codeletion_1p19q: MarkerFindings
    mgmt: MarkerFindings


class CurvePoint(BaseModel):
    days: float
    probability: float


class SurvivalFindings(BaseModel):
    risk_score: float
    risk_group: str = Field(..., description="high | low (split at the training cohort's median risk)")
    median_survival_days: float | None
    curve: list[CurvePoint]


class QualityFindings(BaseModel):
    missing_modalities: list[str]
    ood_score: float
    ood_flag: bool
    ood_method: str = Field("mc_dropout", description="mahalanobis (the measured detector, training.ood) | mc_dropout (older versions)")
    ood_threshold: float | None = Field(None, description="the score above which ood_flag is set (chosen on validation data)")
    mc_std_mean: float | None = Field(None, description="mean MC-dropout std of the marker probabilities")
    # What preprocessing did to the study (imaging.preprocess): path (fast|raw), every step with why it
    # ran and its figures and versions, and each quality-control check.
    preprocessing: dict | None = None
    flags: list[str] = []  # quality-control checks that failed (quality_mode="flag"); empty when all passed
    # Findings that cannot be true (services.plausibility): {check, value, limit, detail} each; the report
    # states them instead of presenting the figures they concern as fact.
    implausible: list[dict] = []


class Findings(BaseModel):
    case_id: str
    model_versions: dict[str, str]
    localization: LocalizationFindings
    segmentation: SegmentationFindings
    classification: ClassificationFindings
    survival: SurvivalFindings
    quality: QualityFindings
    report: dict | None = None
    preprocessing_version: str
