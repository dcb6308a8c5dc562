"""Post-market monitoring's parts on their own: input statistics that see what preprocessing cancels,
the per-site KS drift test, the monitoring store's window and payload retention, the gateway's record
(no identifier in it), and the site a study is counted under."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from imaging.input_stats import FEATURES, input_reference, input_statistics
from imaging.phantoms import make_case
from imaging.study import Study, Volume
from serving import monitoring_store
from serving.drift import MIN_STUDIES, drift_by_site, site_drift
from services.monitoring import StudyMonitor, output_summary
from services.study_input import InputError, scanner_site
from services.study_requests import validate_site
from tests.helpers import MemoryStore


@pytest.fixture(scope="module")
def case() -> Study:
    return make_case(seed=4, index=1)[0]  # all four sequences (index 0 lacks FLAIR)


def scanner(study: Study, scale=1.0, gamma=1.0, noise=0.0, seed=0) -> Study:
    """The same anatomy through another scanner: intensity scale, contrast curve and noise."""
    rng = np.random.default_rng(seed)
    images = {}
    for m, v in study.images.items():
        top = float(v.data.max()) or 1.0
        data = scale * top * np.clip(v.data / top, 0, None) ** gamma + rng.normal(0, noise * top, v.shape)
        images[m] = Volume(data.astype(np.float32), v.affine)
    return Study(study.case_id, images, site=study.site)


def test_input_statistics_see_scale_contrast_noise_and_missing_sequences(case):
    base = input_statistics(case)
    assert set(base) == set(FEATURES) and base["missing_modalities"] == 0.0 and base["spacing_mm"] == pytest.approx(2.0, abs=0.01)
    scaled = input_statistics(scanner(case, scale=3.0))
    assert scaled["t1_p99"] == pytest.approx(3 * base["t1_p99"], rel=0.02)
    assert scaled["t1_contrast"] == pytest.approx(base["t1_contrast"], abs=0.01)  # scale alone: same contrast
    assert input_statistics(scanner(case, gamma=2.0))["t2_contrast"] < base["t2_contrast"] - 0.05
    assert input_statistics(scanner(case, noise=0.05))["flair_noise"] > 2 * base["flair_noise"]
    without = Study(case.case_id, {m: v for m, v in case.images.items() if m != "flair"})
    stats = input_statistics(without)
    assert stats["missing_modalities"] == 1.0 and "flair_p99" not in stats


def _feature_rows(rng, n, shift=0.0):
    return [{"a": float(rng.normal(shift, 1)), "b": float(rng.normal(shift, 1)), "c": float(rng.normal(0, 1))} for _ in range(n)]


def test_a_site_drifts_when_half_its_features_shift_and_only_with_enough_studies():
    rng = np.random.default_rng(0)
    reference = input_reference(_feature_rows(rng, 40), "test")
    same = site_drift(reference, _feature_rows(rng, 12))
    assert not same["drifted"] and same["score"] < 0.5 and same["features_tested"] == 3
    shifted = site_drift(reference, _feature_rows(rng, 12, shift=4.0))
    assert shifted["drifted"] and shifted["features_drifted"] == ["a", "b"] and shifted["score"] == pytest.approx(2 / 3, abs=1e-3)
    assert shifted["largest_shifts"][:2] == sorted(["a", "b"], key=lambda n: -shifted["tests"][n]["statistic"])
    few = site_drift(reference, _feature_rows(rng, MIN_STUDIES - 1, shift=4.0))
    assert few["score"] > 0.5 and not few["drifted"] and not few["enough_studies"]
    records = [{"site": "x", "inputs": r, "outputs": {"volume_WT_ml": 10.0}} for r in _feature_rows(rng, 6, 4.0)] + \
              [{"site": None, "inputs": r, "outputs": {}} for r in _feature_rows(rng, 6)] + \
              [{"site": "x", "failed": {"segmentation": "3"}, "error": "RuntimeError"}]  # a failed study: no statistics  # fmt: skip
    sites = drift_by_site(reference, records)
    assert sites["x"]["drifted"] and not sites["unknown"]["drifted"] and sites["x"]["outputs"]["volume_WT_ml"]["median"] == 10.0
    assert sites["x"]["qc_flagged_share"] == 0.0
    assert sites["x"]["studies"] == 6 and "output_drift" not in sites["x"]  # no output reference given: summarised only


def test_a_sites_answers_are_tested_against_the_versions_answers_on_its_test_cases():
    from training.jobs import _output_reference

    rng = np.random.default_rng(1)
    per_case = [{"case_id": f"c{i}", "site": "s", "p_grade": float(p), "label_grade": 1, "risk": float(r)}
                for i, (p, r) in enumerate(zip(rng.uniform(0.2, 0.8, 30), rng.normal(0, 1, 30)))]  # fmt: skip
    reference = _output_reference(per_case)
    assert set(reference["features"]) == {"p_grade", "risk_score"} and reference["n_cases"] == 30  # serving's names
    inputs = _feature_rows(rng, 8)
    confident = [{"site": "new", "inputs": i, "outputs": {"p_grade": 1.0, "risk_score": 4.0 + k}} for k, i in enumerate(inputs)]
    usual = [{"site": "home", "inputs": i, "outputs": {"p_grade": float(rng.uniform(0.2, 0.8)), "risk_score": float(rng.normal())},
              "qc_flags": ["motion"] if k < 2 else []} for k, i in enumerate(inputs)]  # fmt: skip
    only_other_task = [{"site": "home", "inputs": i, "outputs": {"tumour_found": 1.0}} for i in inputs[:2]]
    sites = drift_by_site(input_reference(_feature_rows(rng, 40), "test"), confident + usual + only_other_task, reference)
    assert sites["new"]["output_drift"]["drifted"] and sites["new"]["output_drift"]["score"] == 1.0
    assert not sites["home"]["output_drift"]["drifted"] and sites["home"]["output_drift"]["studies"] == 8  # other tasks' answers left out
    assert sites["home"]["qc_flagged_share"] == 0.2  # 2 of its 10 studies had a QC flag


def test_the_store_reads_a_window_and_deletes_payloads_past_their_retention():
    store = MemoryStore()
    now = time.time()
    for age_days in (0, 2, 10):
        t = now - age_days * 86400
        monitoring_store.put_json(store, "art", monitoring_store.new_key(monitoring_store.RECORDS, t) + ".json", {"time": t, "age": age_days})
        monitoring_store.put_bytes(store, "art", monitoring_store.new_key(monitoring_store.PAYLOADS, t) + "/t1.nii.gz", b"x", "application/gzip")
    assert [r["age"] for r in monitoring_store.records(store, "art", days=7, now=now)] == [2, 0]
    cache: dict = {}
    assert [r["age"] for r in monitoring_store.records(store, "art", days=7, now=now, cache=cache)] == [2, 0] and len(cache) == 2
    read = store.get_object
    store.get_object = lambda *a: pytest.fail("a cached record fetched again")
    assert [r["age"] for r in monitoring_store.records(store, "art", days=7, now=now, cache=cache)] == [2, 0]
    store.get_object = read
    assert monitoring_store.prune_payloads(store, "art", retention_days=5, now=now) == 1
    left = [k for k in store.objects if k.startswith(monitoring_store.PAYLOADS)]
    assert len(left) == 2 and len([k for k in store.objects if k.startswith(monitoring_store.RECORDS)]) == 3


def test_the_gateways_record_holds_statistics_and_outputs_but_no_identifier(case):
    store = MemoryStore()
    source = SimpleNamespace(study=Study("PATIENT-NAME-123", case.images, site="site-a"), kind="nifti")
    results = {"segmentation": {"section": {"volumes_ml": {"WT": 12.5}}},
               "classification": {"section": {"grade": {"probabilities": {"LGG": 0.2, "HGG": 0.8}}}, "ood": {"score": 1.5}},
               "survival": {"section": {"risk_score": 0.3, "risk_group": "high"}}}  # fmt: skip
    monitor = StudyMonitor(lambda: store, "art", records=True, payloads=True)

    async def run():
        monitor.schedule(source, SimpleNamespace(flags=["motion"]), results, {"segmentation": "3"}, "abcd1234", "analyze")
        await asyncio.gather(*monitor._pending)

    asyncio.run(run())
    keys = sorted(store.objects)
    record = json.loads(next(store.objects[k] for k in keys if k.startswith(monitoring_store.RECORDS)))
    assert record["site"] == "site-a" and record["case_ref"] == "abcd1234" and record["qc_flags"] == ["motion"]
    assert record["outputs"] == {"volume_WT_ml": 12.5, "p_grade": 0.8, "ood_score": 1.5, "risk_score": 0.3, "risk_group_high": 1.0}
    assert set(record["inputs"]) == set(FEATURES)
    assert all(b"PATIENT-NAME-123" not in store.objects[k] for k in keys)
    payloads = [k for k in keys if k.startswith(monitoring_store.PAYLOADS)]
    assert {k.rsplit("/", 1)[1] for k in payloads} == {"t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz", "findings.json"}
    assert output_summary({}) == {}


def test_a_study_is_counted_under_the_site_given_or_its_scanner():
    assert validate_site("site-a") == "site-a" and validate_site(None) is None
    for bad in ("../etc", "x" * 65, "a;b"):
        with pytest.raises(InputError, match="site"):
            validate_site(bad)
    ds = pydicom.Dataset()
    ds.Manufacturer, ds.ManufacturerModelName = "ACME Medical", "Magnetom/X 3T"
    assert scanner_site(ds) == "ACME Medical MagnetomX 3T"
    assert scanner_site(pydicom.Dataset()) is None
