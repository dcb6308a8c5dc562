"""A training job: Ray Train fit -> post-fit calibration -> ONNX export + parity -> held-out evaluation
-> plots and model card -> MLflow run artifacts -> a registered model version with lineage tags.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient

from imaging.preprocess import PREPROCESSING_VERSION
from oncoserve.lineage import git_commit
from training import tasks
from training.checkpoint_storage import CheckpointStorage
from training.data import load_dataset, split_cases
from training.early_stopping import EarlyStopping
from training.errors import TrainingError
from training.evaluate import evaluate, session
from training.export import export_onnx
from training.loop import CHECKPOINT_FILE, train_loop_per_worker
from training.report import calibration_plot, km_plot, model_card, overlay_plot, segmentation_prediction

EXPERIMENT_PREFIX = "oncoserve-"
PLACEMENTS = ("PACK", "SPREAD", "STRICT_SPREAD")  # Ray placement group strategies for the training workers


@dataclass
class TrainResult:
    task: str
    run_id: str
    version: str
    metrics: dict
    parity_max_abs_diff: float


@dataclass
class JobConfig:
    task: str
    data_dir: Path
    tracking_uri: str
    ray_address: str
    home: Path
    epochs: int | None = None
    workers: int = 1
    gpu: bool = False
    placement: str = "PACK"  # Ray Train's placement strategy for the workers: PACK, SPREAD or STRICT_SPREAD (one per node)
    resume_run: str | None = None
    seed: int = 0
    actor: str = "local"  # who asked (recorded in the audit log with the registration)
    audit_file: Path | None = None
    threads_per_worker: int | None = None  # default: the machine's cores shared among the workers
    lr: float | None = None  # default: the task's own learning rate
    patience: int | None = None  # default: the task's own (epochs without improvement before stopping)
    tags: dict[str, str] = field(default_factory=dict)  # set on the MLflow run and the registered version
    task_options: dict = field(default_factory=dict)  # segmentation: regions, augment, overlap (tasks.get)
    storage: CheckpointStorage | None = None  # where Ray Train keeps checkpoints; default: HOME/ray_results


def _flat_metrics(metrics: dict) -> dict[str, float]:
    return {k.replace("/", "."): float(v) for k, v in metrics.items() if isinstance(v, int | float) and np.isfinite(v)}


def _poll_progress(client: MlflowClient, run_id: str, epochs: int, stop: threading.Event, on_epoch) -> None:
    seen = -1
    while not stop.wait(2.0):
        history = client.get_metric_history(run_id, "val_loss")
        if history and history[-1].step > seen:
            seen = history[-1].step
            on_epoch(seen + 1, epochs, history[-1].value)


def require_cluster(address: str) -> None:
    """A GCS `host:port` that nobody listens on fails at once: `ray.init` would retry it for ever (a driver
    aimed at the wrong cluster hangs instead of saying so). `auto` and `ray://` are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return
    except OSError as exc:
        raise TrainingError(f"no Ray cluster answers at {address} ({exc.strerror or exc}): start the embedded stack "
                            "(oncoserve stack up) or name the cluster (ONCOSERVE_RAY_CLUSTER)") from None


def run_job(cfg: JobConfig, log: Callable[[str], None] = print, on_epoch=lambda done, total, val: None) -> TrainResult:
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    task = tasks.get(cfg.task, cfg.task_options)
    if cfg.placement not in PLACEMENTS:
        raise TrainingError(f"placement {cfg.placement!r}: expected one of {', '.join(PLACEMENTS)}")
    if not ray.is_initialized():
        require_cluster(cfg.ray_address)  # before anything is created in MLflow
    if cfg.gpu and not torch.cuda.is_available():
        raise TrainingError("--gpu asked for, but no CUDA device is visible on this machine")
    epochs = cfg.epochs or task.default_epochs
    patience = cfg.patience or task.patience
    log(f"preprocessing {cfg.data_dir} (cached under {cfg.home / 'cache'})")
    data = load_dataset(cfg.data_dir, cfg.home / "cache")
    cases = data.by_id()
    client = MlflowClient(cfg.tracking_uri)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    resume_from = None
    if cfg.resume_run:
        run = client.get_run(cfg.resume_run)
        split = json.loads(Path(client.download_artifacts(cfg.resume_run, "split.json", tempfile.mkdtemp())).read_text())
        resume_from = run.data.tags.get("ray_checkpoint")
        if run.data.params.get("task_options"):  # a resumed run keeps the options it was started with
            task = tasks.get(cfg.task, json.loads(run.data.params["task_options"]))
        run_id = cfg.resume_run
        log(f"resuming run {run_id} from checkpoint {resume_from}")
    else:
        split = split_cases(data, cfg.seed)
        usable = [i for i in split["train"] if task.usable(cases[i])]
        if not usable:
            raise TrainingError(f"{cfg.task}: no training case in {cfg.data_dir} has the labels this task needs")
        experiment = mlflow.set_experiment(EXPERIMENT_PREFIX + cfg.task)
        run = client.create_run(experiment.experiment_id, run_name=f"{cfg.task}-train", tags=cfg.tags)
        run_id = run.info.run_id
        params = {"task": cfg.task, "epochs": epochs, "workers": cfg.workers, "placement": cfg.placement, "seed": cfg.seed, "lr": task.lr,
                  "batch_size": task.batch_size, "lr_override": cfg.lr, "preprocessing_version": data.preprocessing,
                  "dataset_hash": data.dataset_hash, "n_train": len(split["train"]), "n_val": len(split["val"]),
                  "n_test": len(split["test"]), "gpu": cfg.gpu, "patience": patience,
                  "task_options": json.dumps(task.options(), sort_keys=True)}  # fmt: skip
        for k, v in params.items():
            client.log_param(run_id, k, v)
        client.log_dict(run_id, split, "split.json")

    storage = cfg.storage or CheckpointStorage(str(cfg.home / "ray_results"))
    filesystem = storage.filesystem()
    log(f"checkpoints in {storage.describe()}")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "task": cfg.task, "data_dir": str(cfg.data_dir), "cache_dir": str(cfg.home / "cache"),
            "split": split, "epochs": epochs, "seed": cfg.seed, "run_id": run_id,
            "tracking_uri": cfg.tracking_uri, "mlflow_accounts": str(cfg.home / "auth" / "mlflow.json"), "resume_from": resume_from, "lr": cfg.lr, "patience": patience, "task_options": task.options(), "threads": cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // cfg.workers),
        },
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu, placement_strategy=cfg.placement),
        run_config=RunConfig(
            name=f"{cfg.task}-{run_id}", storage_path=storage.path, storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )  # fmt: skip
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, logging_level="ERROR", log_to_driver=False)
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    if cfg.placement == "STRICT_SPREAD" and cfg.workers > alive:  # Ray would wait forever for the nodes
        client.set_terminated(run_id, "FAILED")
        raise TrainingError(f"strict-spread placement needs {cfg.workers} Ray nodes, the cluster at {cfg.ray_address} has {alive}"
                            " (oncoserve stack up --workers N adds nodes)")  # fmt: skip
    stop = threading.Event()
    poller = threading.Thread(target=_poll_progress, args=(client, run_id, epochs, stop, on_epoch), daemon=True)
    poller.start()
    try:
        result = trainer.fit()
    except Exception as exc:
        client.set_terminated(run_id, "FAILED")
        raise TrainingError(f"{cfg.task}: Ray Train fit failed: {exc}") from exc
    finally:
        stop.set()
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise TrainingError(f"{cfg.task}: training produced no checkpoint")
    # Where the checkpoint lies in the storage (a folder, or bucket/key on S3): what a resume starts from.
    client.set_tag(run_id, "ray_checkpoint", checkpoint.path)
    with checkpoint.as_directory() as path:
        state = torch.load(Path(path) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    model = task.network()
    model.load_state_dict(state.get("best_model") or state["model"])  # the kept epoch's weights
    model.eval()
    stopping = EarlyStopping.from_state(state.get("early_stopping"), patience)
    kept = {"kept_epoch": stopping.best_epoch, "epochs_run": int(state["epoch"]) + 1,
            "kept_because": stopping.reason(int(state["epoch"]) + 1, epochs)}  # fmt: skip
    for key, value in kept.items():
        client.set_tag(run_id, key, str(value))
    log(f"kept {kept['kept_because']}")
    return _finish(cfg, task, model, data, cases, split, run_id, client, log, kept)


def _finish(cfg, task, model, data, cases, split, run_id, client, log, kept: dict) -> TrainResult:
    log("post-fit: calibration / baselines on the training and validation splits")
    extras = task.finalize(model, cases, split)
    reference = _input_reference(cases, split)
    if reference is not None:  # what serving's drift monitor compares studies with (serving.drift)
        extras["input_reference"] = reference
    test_cases = [cases[i] for i in split["test"]]
    example = next((c for c in test_cases if task.usable(c)), next(c for c in cases.values() if task.usable(c)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        exported = export_onnx(task, model, extras, example, model_dir / "model.onnx")
        log(f"ONNX exported (opset {exported.opset}); parity max |torch - onnxruntime| = {exported.parity_max_abs_diff:.2e}")
        if not exported.parity_ok:
            raise TrainingError(f"{cfg.task}: ONNX parity {exported.parity_max_abs_diff:.2e} exceeds the bound")
        evaluation = evaluate(cfg.task, str(exported.path), test_cases, extras)
        outputs = _output_reference(evaluation["per_case"])
        if outputs is not None:  # what serving's drift monitor compares the version's answers with
            extras["output_reference"] = outputs
        signature = {"inputs": exported.inputs, "outputs": exported.outputs}
        (model_dir / "signature.json").write_text(json.dumps(signature, indent=1))
        (model_dir / "extras.json").write_text(json.dumps(extras))
        (tmp / "evaluation.json").write_text(json.dumps(evaluation, indent=1, default=float))
        plots = _plots(cfg.task, str(exported.path), test_cases, evaluation, extras, tmp)
        info = {"params": {"epochs": cfg.epochs, "workers": cfg.workers, "seed": cfg.seed, **task.options()}, "opset": exported.opset, **kept,
                "calibration": extras.get("calibration"), "inference": extras.get("inference"), "hazard_fit": extras.get("hazard_fit"),
                "ood": {k: v for k, v in (extras.get("ood") or {}).items() if k not in ("mean", "whiten")} or None,
                "parity_max_abs_diff": exported.parity_max_abs_diff, "git_commit": git_commit()}  # fmt: skip
        datainfo = {"dataset_hash": data.dataset_hash, "preprocessing": data.preprocessing, "n_cases": len(cases),
                    "seed": cfg.seed, **{f"n_{k}": len(v) for k, v in split.items()}}  # fmt: skip
        (model_dir / "MODEL_CARD.md").write_text(model_card(cfg.task, info, evaluation["metrics"], datainfo))
        client.log_artifacts(run_id, str(model_dir), "model")
        client.log_artifact(run_id, str(tmp / "evaluation.json"))
        for plot in plots:
            client.log_artifact(run_id, str(plot), "plots")
    metrics = _flat_metrics(evaluation["metrics"])
    for key, value in metrics.items():
        client.log_metric(run_id, f"test.{key}", value)
    client.log_metric(run_id, "onnx_parity_max_abs_diff", exported.parity_max_abs_diff)
    tags = {**cfg.tags, "kept_epoch": str(kept["kept_epoch"]), "epochs_run": str(kept["epochs_run"])}
    version = register(client, cfg.tracking_uri, cfg.task, run_id, data, exported, metrics, info["git_commit"], tags)
    if cfg.audit_file is not None:
        from oncoserve.audit import AuditLog

        AuditLog(cfg.audit_file).event(cfg.actor, "data-scientist", "register", task=cfg.task, version=version,
                                       run_id=run_id, dataset_hash=data.dataset_hash)  # fmt: skip
    client.set_terminated(run_id, "FINISHED")
    log(f"registered {cfg.task} version {version}")
    return TrainResult(cfg.task, run_id, version, metrics, exported.parity_max_abs_diff)


# Evaluation per-case values -> the names serving records them under (services/monitoring.py output_summary).
OUTPUT_FEATURES = {"p_grade": "p_grade", "p_idh": "p_idh", "p_codeletion_1p19q": "p_codeletion_1p19q", "p_mgmt": "p_mgmt",
                   "ood_score": "ood_score", "risk": "risk_score", "tumour_found": "tumour_found",
                   **{f"volume_{r}_ml": f"volume_{r}_ml" for r in ("NCR", "ED", "ET", "WT", "TC")}}  # fmt: skip


def _output_reference(per_case: list[dict]) -> dict | None:
    """The version's own answers on its held-out test cases, as serving reports them: the reference the
    drift monitor tests the answers a site gets against (serving.drift, outputs)."""
    from imaging.input_stats import input_reference

    rows = [{OUTPUT_FEATURES[k]: float(v) for k, v in row.items() if k in OUTPUT_FEATURES and v is not None} for row in per_case]
    rows = [r for r in rows if r]
    return input_reference(rows, "the version's answers on its held-out test cases") if rows else None


def _input_reference(cases, split) -> dict | None:
    """The raw input statistics (imaging.input_stats) of the training and validation cases, read again
    as they are on disk: the reference a site's studies are tested against for drift."""
    from imaging.dataset import read_case
    from imaging.input_stats import input_reference, input_statistics

    stats = []
    for index in [*split["train"], *split["val"]]:
        case = cases[index]
        if case.data_root is None:
            continue
        try:
            stats.append(input_statistics(read_case(case.data_root, case.case_id)))
        except Exception:  # a case that cannot be read again is left out of the reference, not fatal
            continue
    return input_reference(stats, "training and validation cases, as read from disk") if stats else None


def _plots(task_name, onnx_path, test_cases, evaluation, extras, tmp: Path) -> list[Path]:
    plots = []
    if task_name == "classification":
        plots.append(calibration_plot(evaluation["per_case"], tmp / "calibration.png", extras.get("temperature")))
    elif task_name == "survival":
        plots.append(km_plot(evaluation["per_case"], extras["risk_threshold"], tmp / "km_by_risk_group.png"))
    else:
        case = next((c for c in test_cases if c.seg_classes is not None and (c.seg_classes > 0).any()), None)
        if case is not None:
            sess = session(onnx_path)
            if task_name == "segmentation":
                plots.append(overlay_plot(case, segmentation_prediction(sess, case, extras), tmp / "overlay.png"))
            else:
                heat = sess.run(None, {"image": case.image[None]})[0][0, 0]
                plots.append(overlay_plot(case, np.zeros(case.image.shape[1:], np.uint8), tmp / "overlay.png", heat))
    return plots


def register(client: MlflowClient, tracking_uri: str, task: str, run_id: str, data, exported, metrics: dict, commit: str,
             extra_tags: dict[str, str] | None = None) -> str:  # fmt: skip
    """A new version under the task's name, tagged with its lineage and evaluation."""
    try:
        client.get_registered_model(task)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(task, description=f"oncoserve {task} model (ONNX)")
    run = client.get_run(run_id)
    tags = {
        "task": task,
        "dataset_hash": data.dataset_hash,
        "git_commit": commit,
        "preprocessing_version": data.preprocessing,
        "preprocessing_code_version": PREPROCESSING_VERSION,
        "signature": json.dumps({"inputs": exported.inputs, "outputs": exported.outputs}),
        "onnx_opset": str(exported.opset),
        "onnx_parity_max_abs_diff": f"{exported.parity_max_abs_diff:.3e}",
        "metrics": json.dumps(metrics),
        "run_link": f"{tracking_uri}/#/experiments/{run.info.experiment_id}/runs/{run_id}",
        **(extra_tags or {}),
    }
    mv = client.create_model_version(task, f"{run.info.artifact_uri}/model", run_id=run_id, tags=tags)
    return str(mv.version)
