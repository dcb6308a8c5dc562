"""The models against the synthetic benchmark's own shortcuts, on cases they never trained on.

A larger cohort than the demo's (phantom generator 2: each marker with an imaging signal of its own, site
effects a z-score does not cancel, cohort-like label missingness, image-borne survival), three scanner
sites, trained through the real CLI (Ray Train -> MLflow) on a private stack with the tasks' early
stopping. The figures are the registered version's held-out test metrics (`metrics` tag), the same ones
its gates and model card use; every figure of both versions is written to
build/science/benchmark.json (ONCOSERVE_SCIENCE_OUT names another file).

Survival is also scored on FRESH_CASES new patients from the same three sites (`oncoserve evaluate`): on the
36-case test split a c-index difference has a standard error near 0.04, and there even the generator's own
hazard (true labels, volume, multifocality) reached only age-only + 0.045 (measured 2026-12-06), so the split
cannot resolve a 0.03 margin; the fresh cohort can. The split's figures are reported beside it.

`make test-science` (about 40 minutes on 2 cores): not in `make test`, whose budget it does not fit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import TEST_GATES, oncoserve, private_stack

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# The benchmark: big enough that the test split (15 %) holds ~36 cases per task.
CASES, SITES, SEED = int(os.environ.get("ONCOSERVE_SCIENCE_CASES", "240")), 3, 2026
FRESH_CASES = int(os.environ.get("ONCOSERVE_SCIENCE_FRESH_CASES", "200"))  # new patients, survival's own test
EPOCHS = {"classification": 40, "survival": 30}

# What "beats its baseline" means here, stated: IDH from the images is at least this much better (AUC)
# than IDH read off the grade alone on the same cases; risk from the images and age is at least this much
# better (c-index) than age alone.
IDH_OVER_GRADE_ONLY_MIN = 0.05
C_INDEX_OVER_AGE_ONLY_MIN = 0.03
ECE_MAX = 0.05  # grade, after temperature scaling (the marker the gates hold to an ECE ceiling)
OOD_AUROC_MIN = 0.90

OUT = Path(os.environ.get("ONCOSERVE_SCIENCE_OUT", "build/science/benchmark.json"))


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """Train classification and survival on the benchmark; return each registered version's metrics."""
    from serving.registry import Registry

    data = tmp_path_factory.mktemp("science") / "benchmark"
    made = oncoserve("data", "synth", "--out", str(data), "--n", str(CASES), "--seed", str(SEED), "--sites", str(SITES),
                     timeout=1800)  # fmt: skip
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    figures = {"cases": CASES, "sites": SITES, "seed": SEED, "generator_version": 2, "epochs": EPOCHS}
    with private_stack("oss-", "science-admin", gates=TEST_GATES) as settings:
        registry = Registry(settings.mlflow_url)
        for task, epochs in EPOCHS.items():
            run = oncoserve("train", task, "--data", str(data), "--epochs", str(epochs), "--seed", str(SEED), timeout=3600)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            version = run.stdout.split(f"registered model {task} version")[-1].split()[0]
            info = registry.version(task, version)
            figures[task] = {"version": version, "kept_epoch": info.tags.get("kept_epoch"),
                             "epochs_run": info.tags.get("epochs_run"), "metrics": json.loads(info.tags["metrics"])}  # fmt: skip
        fresh = data.with_name("fresh")
        made = oncoserve("data", "synth", "--out", str(fresh), "--n", str(FRESH_CASES), "--seed", str(SEED + 1),
                         "--sites", str(SITES), timeout=1800)  # fmt: skip
        assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
        scored = data.with_name("survival-fresh.json")
        run = oncoserve("evaluate", "survival", "--version", figures["survival"]["version"], "--data", str(fresh),
                        "--out", str(scored), timeout=1800)  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        figures["survival_fresh"] = {"cases": FRESH_CASES, "seed": SEED + 1, "metrics": json.loads(scored.read_text())["metrics"]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(figures, indent=1, sort_keys=True))
    return figures


def test_idh_from_the_images_beats_idh_read_off_the_grade(benchmark):
    m = benchmark["classification"]["metrics"]
    assert m["idh_auc_over_grade_only"] >= IDH_OVER_GRADE_ONLY_MIN, (
        f"IDH AUC {m['idh_auc_same_cases']:.3f} vs grade-only {m['idh_auc_grade_only']:.3f} on the same test cases")


def test_survival_from_the_images_beats_age_alone(benchmark):
    m = benchmark["survival_fresh"]["metrics"]
    assert m["c_index"] - m["c_index_age_only"] >= C_INDEX_OVER_AGE_ONLY_MIN, (
        f"c-index {m['c_index']:.3f} vs age-only {m['c_index_age_only']:.3f} (difference's 95 % interval "
        f"{m.get('c_index_over_age_only_ci_low', float('nan')):+.3f} to {m.get('c_index_over_age_only_ci_high', float('nan')):+.3f}; "
        f"clinical-only {m.get('c_index_clinical_only', float('nan')):.3f})")


def test_calibrated_grade_probabilities_have_a_small_ece_on_the_test_split(benchmark):
    m = benchmark["classification"]["metrics"]
    assert m["grade_ece"] <= ECE_MAX, f"grade ECE {m['grade_ece']:.3f} (before calibration {m['grade_ece_uncalibrated']:.3f})"


def test_the_ood_score_separates_the_generators_out_of_distribution_inputs(benchmark):
    m = benchmark["classification"]["metrics"]
    assert m["ood_auroc"] >= OOD_AUROC_MIN, {k: v for k, v in m.items() if k.startswith("ood_")}
