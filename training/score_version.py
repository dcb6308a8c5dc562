"""`oncoserve evaluate`: score any registered version on any dataset in the layout (all its cases)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from training.data import load_dataset
from training.evaluate import evaluate
from training.errors import TrainingError


def download_model(client: MlflowClient, task: str, version: str) -> Path:
    try:
        mv = client.get_model_version(task, version)
    except mlflow.exceptions.MlflowException:
        raise TrainingError(f"{task} version {version} is not in the registry") from None
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tempfile.mkdtemp(),
                                                    tracking_uri=client._tracking_client.tracking_uri))  # fmt: skip


def score_version(task: str, version: str, data_dir: Path, out: Path, tracking_uri: str, cache_dir: Path) -> dict:
    client = MlflowClient(tracking_uri)
    model_dir = download_model(client, task, version)
    extras = json.loads((model_dir / "extras.json").read_text())
    data = load_dataset(data_dir, cache_dir)
    result = evaluate(task, str(model_dir / "model.onnx"), data.cases, extras)
    doc = {"task": task, "version": version, "dataset_hash": data.dataset_hash, "n_cases": len(data.cases),
           "preprocessing_version": data.preprocessing, **result}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=float))
    return doc
