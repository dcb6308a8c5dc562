"""Reference findings for checking a reporting model: one per diagnostic path, plus the hallucinations
the guard must catch. Used by the reporting model's promotion gates and by the tests."""

from __future__ import annotations

import copy

BASE = {
    "case_id": "ref-gbm", "model_versions": {"localization": "1", "segmentation": "1", "classification": "1", "survival": "1"},
    "localization": {"found": True, "bbox_vox": [10, 12, 14, 30, 34, 36], "centroid_vox": [20, 23, 25], "hemisphere": "left"},
    "segmentation": {"volumes_ml": {"NCR": 4.2, "ED": 31.7, "ET": 8.9, "WT": 44.8, "TC": 13.1}, "mask": "segmentation.nii.gz"},
    "classification": {
        "grade": {"label": "HGG", "probabilities": {"LGG": 0.12, "HGG": 0.88}, "uncertainty": 0.04},
        "idh": {"label": "wildtype", "probabilities": {"wildtype": 0.91, "mutant": 0.09}, "uncertainty": 0.03},
        "codeletion_1p19q": {"label": "intact", "probabilities": {"intact": 0.95, "codeleted": 0.05}, "uncertainty": 0.02},
        "mgmt": {"label": "methylated", "probabilities": {"unmethylated": 0.3, "methylated": 0.7}, "uncertainty": 0.05},
    },
    "survival": {"risk_score": 1.23, "risk_group": "high", "median_survival_days": 410.0, "curve": []},
    "quality": {"missing_modalities": ["flair"], "ood_score": 0.05, "ood_flag": False},
    "report": None, "preprocessing_version": "2.0/2mm/96x112x96",
}  # fmt: skip


def _variant(case_id: str, **changes) -> dict:
    f = copy.deepcopy(BASE)
    f["case_id"] = case_id
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = f
        for p in parents:
            target = target[p]
        target[leaf] = value
    return f


def _marker(label: str, other: str, p: float, u: float = 0.03) -> dict:
    return {"label": label, "probabilities": {label: p, other: round(1 - p, 2)}, "uncertainty": u}


CASES = [
    BASE,
    _variant("ref-astro", classification__idh=_marker("mutant", "wildtype", 0.82), classification__grade=_marker("LGG", "HGG", 0.7),
             localization__hemisphere="right", survival__risk_group="low", survival__median_survival_days=None),
    _variant("ref-oligo", classification__idh=_marker("mutant", "wildtype", 0.9), classification__codeletion_1p19q=_marker("codeleted", "intact", 0.8),
             quality__missing_modalities=[]),
    _variant("ref-ood", quality__ood_flag=True, quality__ood_score=0.31, localization__hemisphere="midline",
             classification__idh=_marker("wildtype", "mutant", 0.55, 0.2)),
]  # fmt: skip

# (edit of the template text, the problem the guard must report)
PLANTED = [
    (lambda t: t.replace("edema 31.7 mL", "edema 52.0 mL"), "volume '52.0 mL'"),
    (lambda t: t + "\nThe tumour is IDH-mutant.", "contradicts the predicted IDH status"),
    (lambda t: t.replace("left hemisphere", "right hemisphere"), "laterality 'right'"),
    (lambda t: t + "\nIt involves the temporal lobe.", "region 'temporal'"),
    (lambda t: t + "\nFeatures suggest oligodendroglioma.", "tumour type 'oligodendroglioma'"),
    (lambda t: t + "\nExpected survival is 36 months.", "duration '36 months'"),
    (lambda t: t + "\nMGMT is unmethylated.", "contradicts the predicted MGMT status"),
]
