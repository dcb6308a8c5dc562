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
    # The OOD flag comes from the measured detector, against the threshold fitted on validation cases.
    quality = doc["quality"]
    assert quality["ood_method"] == "mahalanobis" and quality["ood_threshold"] > 0
    assert quality["ood_flag"] == (quality["ood_score"] > quality["ood_threshold"] or not doc["localization"]["found"])
    # The same study twice: the same uncertainty and the same OOD score (MC-dropout masks are fixed in the graph).
    again = analyzer.analyze(study).findings.model_dump()
    assert [m["uncertainty"] for m in again["classification"].values()] == [m["uncertainty"] for m in doc["classification"].values()]
    assert again["quality"]["ood_score"] == quality["ood_score"]


@pytest.mark.parametrize("kind", ["not_a_brain", "corrupt", "wrong_sequences"])
def test_out_of_distribution_input_is_refused_or_flagged_never_answered_with_every_flag_down(analyzer, tiny_dataset, kind):
    """A wrong series sent by mistake, a gross artefact, sequences under the wrong names: the platform
    refuses the study with the reason, or answers with a flag up (OOD or implausible)."""
    from imaging.errors import StudyError
    from imaging.study import Study, Volume

    case = sorted(p.name for p in tiny_dataset.iterdir() if p.is_dir())[0]
    study = read_case(tiny_dataset, case)
    rng = np.random.default_rng(0)
    if kind == "not_a_brain":
        images = {m: np.abs(rng.normal(500, 300, v.shape)) for m, v in study.images.items()}
    elif kind == "corrupt":
        images = {m: np.asarray(v.data, float) + rng.normal(0, 600, v.shape) * (np.asarray(v.data) > 0) for m, v in study.images.items()}
        for data in images.values():
            data[:, : data.shape[1] // 2] = 0
    else:
        names = {"t1": "flair", "flair": "t1", "t1ce": "t2", "t2": "t1ce"}
        images = {names[m]: np.asarray(v.data, float) for m, v in study.images.items()}
    affine = next(iter(study.images.values())).affine
    shifted = Study(kind, {m: Volume(np.clip(d, 0, None).astype(np.float32), affine) for m, d in images.items()})
    try:
        quality = analyzer.analyze(shifted).findings.quality
    except StudyError as refused:  # (QualityError is one): refused with the reason
        assert str(refused), kind
        return
    assert quality.ood_flag or quality.implausible, (kind, quality)


def test_an_unseen_scanner_site_keeps_its_figures_or_is_flagged(analyzer, tiny_dataset):
    """A site no training case came from: non-linear contrast (gamma), noise, blur and thicker slices. Either
    the answer stays close to the same study's at a known site, or a flag says not to trust it."""
    from scipy import ndimage

    from imaging.detect import dice
    from imaging.study import Study, Volume

    case = sorted(p.name for p in tiny_dataset.iterdir() if p.is_dir())[2]
    study = read_case(tiny_dataset, case)
    rng = np.random.default_rng(1)
    shifted = {}
    for m, v in study.images.items():
        data = np.asarray(v.data, float)
        top = np.percentile(data[data > 0], 99)
        data = top * (np.clip(data, 0, None) / top) ** 1.8  # contrast no z-score undoes
        data = ndimage.gaussian_filter(data, (0.8, 0.8, 1.5))  # blur, thicker through-plane
        data = np.hypot(data + rng.normal(0, 0.04 * top, data.shape), rng.normal(0, 0.04 * top, data.shape))
        shifted[m] = Volume(data.astype(np.float32), v.affine)
    known, unseen = analyzer.analyze(study), analyzer.analyze(Study(case, shifted))
    q = unseen.findings.quality
    if q.ood_flag or q.implausible:
        return
    truth = study.segmentation.data > 0
    dice_known, dice_unseen = dice(known.mask.data > 0, truth), dice(unseen.mask.data > 0, truth)
    assert abs(dice_unseen - dice_known) <= 0.05, (dice_known, dice_unseen, q)
    labels = lambda a: {k: m.label for k, m in a.findings.classification}  # noqa: E731
    assert labels(unseen) == labels(known), (labels(known), labels(unseen), q)


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


def test_mirroring_tta_reports_a_repeatable_segmentation_uncertainty(analyzer, tiny_dataset):
    """The served patch network with mirroring test-time augmentation (the deployment's
    `sliding_window.mirror`): 8 passes, their disagreement in the findings, the same for the same study;
    without it no uncertainty is claimed."""
    case = sorted(p.name for p in tiny_dataset.iterdir() if p.is_dir())[1]
    study = read_case(tiny_dataset, case)
    assert analyzer.analyze(study).findings.segmentation.uncertainty is None
    with_tta = StudyAnalyzer(analyzer.backends, analyzer.extras, window={"mirror": True})
    first, second = with_tta.analyze(study), with_tta.analyze(study)
    uncertainty = first.findings.segmentation.uncertainty
    assert uncertainty is not None and uncertainty.passes == 8 and 0.0 <= uncertainty.tta_disagreement <= 1.0
    assert second.findings.segmentation.uncertainty == uncertainty
    np.testing.assert_array_equal(first.mask.data, second.mask.data)
