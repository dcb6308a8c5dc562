"""Each task trains through Ray Train on the real stack and lands in MLflow as a tagged, loadable version."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from mlflow import MlflowClient

from imaging import manifest
from imaging.dataset import read_case
from imaging.preprocess import preprocess
from training.score_version import download_model

from tests.conftest import TASKS, oncoserve

pytestmark = pytest.mark.integration
REQUIRED_TAGS = {"dataset_hash", "git_commit", "preprocessing_version", "signature", "metrics", "onnx_opset",
                 "onnx_parity_max_abs_diff", "run_link"}  # fmt: skip




@pytest.mark.parametrize("task", TASKS)
def test_version_is_registered_with_lineage_tags(trained, live_stack, tiny_dataset, task):
    client = MlflowClient(live_stack.mlflow_url)
    mv = client.get_model_version(task, trained[task])
    assert REQUIRED_TAGS <= set(mv.tags), REQUIRED_TAGS - set(mv.tags)
    assert mv.tags["dataset_hash"] == manifest.build(tiny_dataset)["dataset_hash"]
    assert mv.tags["preprocessing_version"].startswith("2.0/2mm/")
    assert float(mv.tags["onnx_parity_max_abs_diff"]) <= 1e-3
    assert json.loads(mv.tags["signature"])["inputs"][0]["name"] == "image"
    run = client.get_run(mv.run_id)
    assert [m.step for m in client.get_metric_history(mv.run_id, "train_loss")] == [0]
    artifacts = {a.path for a in client.list_artifacts(mv.run_id)} | {a.path for a in client.list_artifacts(mv.run_id, "model")}
    assert {"evaluation.json", "model/model.onnx", "model/MODEL_CARD.md", "model/signature.json"} <= artifacts
    assert client.list_artifacts(mv.run_id, "plots"), "no plot logged"
    assert run.data.params["dataset_hash"] == mv.tags["dataset_hash"]
    assert int(mv.tags["kept_epoch"]) == 0 and mv.tags["epochs_run"] == "1"
    metrics = json.loads(mv.tags["metrics"])
    if task == "segmentation":  # a patch network scored as served (sliding window), on each case's own grid
        assert json.loads(mv.tags["signature"])["inputs"][0]["shape"][2:] == [64, 64, 64]
        assert metrics["native_grid"] == 1.0 and 0.0 <= metrics["dice_WT"] <= 1.0 and "model_grid.dice_WT" in metrics
        extras = json.loads((download_model(client, task, trained[task]) / "extras.json").read_text())
        assert extras["inference"]["roi"] == [64, 64, 64] and extras["inference"]["augmentation"] == "standard"
    if task == "classification":  # the OOD detector is measured and calibration reported before/after
        assert 0.0 <= metrics["ood_auroc"] <= 1.0 and metrics["ood_n_out_of_distribution"] == 4 * metrics["ood_n_in_distribution"]
        assert "grade_brier" in metrics and "grade_brier_uncalibrated" in metrics


@pytest.mark.parametrize("task", TASKS)
def test_registered_onnx_runs_in_onnxruntime(trained, live_stack, tiny_dataset, task):
    client = MlflowClient(live_stack.mlflow_url)
    model_dir = download_model(client, task, trained[task])
    signature = json.loads((model_dir / "signature.json").read_text())
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    case_id = sorted(p.name for p in tiny_dataset.iterdir() if p.is_dir())[0]
    prepared = preprocess(read_case(tiny_dataset, case_id))
    feeds = {"image": prepared.image[None], "presence": prepared.presence[None], "age": np.array([[55.0]], np.float32)}
    # Segmentation is a patch network (run as a sliding window by serving): feed it one patch of the study.
    patch = signature["inputs"][0]["shape"][2:]
    feeds["image"] = np.ascontiguousarray(feeds["image"][(..., *(slice(0, int(p)) for p in patch))])
    inputs = {i["name"]: feeds[i["name"]] for i in signature["inputs"]}
    outputs = session.run(None, inputs)
    assert [o.name for o in session.get_outputs()] == [o["name"] for o in signature["outputs"]]
    assert all(np.all(np.isfinite(o)) and o.shape[0] == 1 for o in outputs)
    # A batch of two works too: the batch axis is dynamic.
    doubled = session.run(None, {k: np.concatenate([v, v]) for k, v in inputs.items()})
    assert doubled[0].shape[0] == 2


def test_evaluate_scores_a_version_on_a_dataset(trained, tiny_dataset, tmp_path):
    out = tmp_path / "eval.json"
    run = oncoserve("evaluate", "segmentation", "--version", trained["segmentation"], "--data", str(tiny_dataset), "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["n_cases"] == 8 and 0.0 <= doc["metrics"]["dice_WT"] <= 1.0
    assert len(doc["per_case"]) == 8


def test_resume_continues_the_same_run(trained, live_stack, tiny_dataset):
    client = MlflowClient(live_stack.mlflow_url)
    run_id = client.get_model_version("localization", trained["localization"]).run_id
    run = oncoserve("train", "localization", "--data", str(tiny_dataset), "--epochs", "2", "--resume", run_id)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [0, 1]
    # The kept weights are the epoch with the lowest validation metric, over both sessions of the run.
    history = sorted(client.get_metric_history(run_id, "val_metric"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1]
    version = run.stdout.split("registered model localization version")[-1].split()[0]
    mv = client.get_model_version("localization", version)
    assert int(mv.tags["kept_epoch"]) == min(history, key=lambda m: (m.value, m.step)).step and mv.tags["epochs_run"] == "2"
    card = (download_model(client, "localization", version) / "MODEL_CARD.md").read_text()
    assert f"kept epoch {mv.tags['kept_epoch']}, the lowest validation metric" in card


def test_bad_train_requests_are_messages(live_stack, tiny_dataset, tmp_path):
    unknown = oncoserve("train", "dancing", "--data", str(tiny_dataset))
    assert unknown.returncode == 1 and "unknown task 'dancing'" in unknown.stderr
    gpu = oncoserve("train", "segmentation", "--data", str(tiny_dataset), "--gpu")
    assert gpu.returncode == 1 and "no CUDA device" in gpu.stderr
    missing = oncoserve("train", "segmentation", "--data", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "not found" in missing.stderr
    for result in (unknown, gpu, missing):
        assert "Traceback" not in result.stderr
