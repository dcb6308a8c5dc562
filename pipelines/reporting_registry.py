"""Register a reporting model version: the knowledge base and prompt templates as MLflow artifacts,
scored on the reference cases, under the registry's `reporting` name."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from oncoserve.lineage import git_commit
from services.reporting import model as reporting_model
from services.reporting.generators import PROMPT_DIR, PROMPT_VERSION
from services.reporting.kb import PACKAGED
from serving.artifacts import tree_digests

TASK = "reporting"


def register_reporting(settings, kb_dir: Path = PACKAGED, prompt_dir: Path = PROMPT_DIR,
                       prompt_version: str = PROMPT_VERSION) -> tuple[str, dict]:  # fmt: skip
    """Returns (version, metrics)."""
    import os

    from oncoserve.object_store import mlflow_env

    os.environ.update(mlflow_env(settings))  # artifacts go to the stack's S3 through MLflow
    client = MlflowClient(settings.mlflow_url)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        manifest = reporting_model.write(model_dir, kb_dir, prompt_dir, prompt_version)
        metrics = reporting_model.evaluate(model_dir)
        (model_dir / "MODEL_CARD.md").write_text(
            f"# reporting\n\nGrounded report composer: knowledge base {manifest['knowledge_base_version']} "
            f"({manifest['passages']} passages), prompt {prompt_version}.\n\nReference-case checks: "
            + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()) + "\n"
        )
        digests = tree_digests(model_dir)  # what serving verifies before it loads this version
        experiment = client.get_experiment_by_name(TASK)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(TASK)
        run = client.create_run(experiment_id, tags={"task": TASK})
        run_id = run.info.run_id
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        client.log_artifacts(run_id, str(model_dir), "model")
        client.set_terminated(run_id)
    try:
        client.get_registered_model(TASK)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(TASK, description="oncoserve reporting model (knowledge base + prompts)")
    tags = {"task": TASK, "git_commit": git_commit(), "knowledge_base_version": manifest["knowledge_base_version"],
            "prompt_version": prompt_version, "metrics": json.dumps(metrics),
            reporting_model.DIGEST_TAG: json.dumps(digests),
            "run_link": f"{settings.mlflow_url}/#/experiments/{experiment_id}/runs/{run_id}"}  # fmt: skip
    mv = client.create_model_version(TASK, f"{run.info.artifact_uri}/model", run_id=run_id, tags=tags)
    return str(mv.version), metrics
