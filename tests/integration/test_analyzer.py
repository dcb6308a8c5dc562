"""A whole study through the four champions: findings with every published key, mask on the input grid."""

from __future__ import annotations

import numpy as np
import pytest

from imaging.dataset import read_case
from oncoserve.object_store import object_store
from serving.registry import Registry
from services.analyzer import TASKS, ServingError, StudyAnalyzer
from tests.conftest import compiled_champions

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def analyzer(live_stack, trained):
    with compiled_champions(live_stack, {t: trained[t] for t in TASKS}) as (registry, store):
        yield StudyAnalyzer.from_registry(registry, store, live_stack.bucket_models, live_stack.triton_repo_prefix)


def test_findings_have_every_key_and_the_mask_matches_the_input(analyzer, tiny_dataset, trained):
    case = sorted(p.name for p in tiny_dataset.iterdir() if p.is_dir())[0]
    study = read_case(tiny_dataset, case)
    result = analyzer.analyze(study)
    doc = result.findings.model_dump()
    assert set(doc) >= {"case_id", "model_versions", "localization", "segmentation", "classification", "survival",
                        "quality", "report", "preprocessing_version"}  # fmt: skip
    assert doc["model_versions"] == {t: trained[t] for t in TASKS}
    assert set(doc["segmentation"]["volumes_ml"]) == {"NCR", "ED", "ET", "WT", "TC"}
    assert set(doc["classification"]) == {"grade", "idh", "codeletion_1p19q", "mgmt"}
    grade = doc["classification"]["grade"]
    assert grade["label"] in ("LGG", "HGG") and sum(grade["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert doc["survival"]["risk_group"] in ("high", "low") and doc["survival"]["curve"]
    assert len(doc["localization"]["bbox_vox"]) == 6 and len(doc["localization"]["centroid_vox"]) == 3
    assert result.mask.shape == study.reference.shape
    np.testing.assert_allclose(result.mask.affine, study.reference.affine)
    assert set(np.unique(result.mask.data)) <= {0, 1, 2, 4}
    # Plausibility: the training job recorded the volumes the version trained on, and serving judged by them.
    trained_ml = analyzer.extras["segmentation"]["training_volumes_ml"]
    assert set(trained_ml) == {"WT", "TC", "ET"} and trained_ml["WT"][1] > 0
    checks = {c["check"]: c for c in doc["quality"]["implausible"]}
    wt = doc["segmentation"]["volumes_ml"]["WT"]
    lo, hi = trained_ml["WT"]
    assert ("volume_WT_vs_training" in checks) == (not lo * 0.5 <= wt <= hi * 1.5), (wt, trained_ml, checks)
    probabilities = [m["probabilities"][m["label"]] for m in doc["classification"].values()]
    near_even = all(abs(p - 0.5) <= 0.05 for p in probabilities)
    assert ("uninformative_probabilities" in checks) == near_even


def test_missing_flair_is_reported_and_still_analysed(analyzer, tiny_dataset):
    case = sorted(p.name for p in tiny_dataset.iterdir() if p.is_dir())[1]
    study = read_case(tiny_dataset, case)
    study.images.pop("flair", None)
    findings = analyzer.analyze(study).findings
    assert "flair" in findings.quality.missing_modalities


def test_a_task_without_champion_is_a_clear_error(live_stack):
    registry = Registry(live_stack.mlflow_url)
    with pytest.raises(ServingError, match="no `nonexistent-alias` version"):
        StudyAnalyzer.from_registry(registry, object_store(live_stack), live_stack.bucket_models,
                                    live_stack.triton_repo_prefix, alias="nonexistent-alias")  # fmt: skip
