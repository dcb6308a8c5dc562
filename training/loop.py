"""The Ray Train worker loop shared by every task (runs inside TorchTrainer workers).

Each epoch: a sharded pass over the training split, a validation loss and the task's validation metric
on the val split, a report to Ray Train (with a checkpoint from rank 0) and, from rank 0, the epoch's
metrics to the MLflow run. The checkpoint carries the weights of the best epoch so far (lowest validation
metric) beside the latest ones; the loop stops when the metric has not improved for `patience` epochs.
Every rank scores the whole validation split with the same (all-reduced) weights, so all ranks stop at
the same epoch.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import torch

CHECKPOINT_FILE = "state.pt"


def _load_state(model, optimizer, path: str) -> dict:
    state = torch.load(os.path.join(path, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state


def _copy(state_dict: dict) -> dict:
    return {k: v.detach().clone() for k, v in state_dict.items()}


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from mlflow import MlflowClient

    from training import tasks
    from training.data import load_dataset
    from training.early_stopping import EarlyStopping

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    task = tasks.get(config["task"], config.get("task_options"))
    torch.manual_seed(config["seed"] + rank)
    data = load_dataset(config["data_dir"], config["cache_dir"])
    cases = data.by_id()
    split = config["split"]

    model = task.network()
    lr = config.get("lr") if config.get("lr") is not None else task.lr
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    restored = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            restored = _load_state(model, optimizer, path)
    elif config.get("resume_from"):  # a resumed run's last checkpoint, in the storage every node reaches
        from oncoserve.settings import Settings
        from training.checkpoint_storage import from_settings

        # The filesystem from this node's own settings: its keys never travel in the (exported) loop config.
        resumed = ray.train.Checkpoint(path=config["resume_from"], filesystem=from_settings(Settings()).filesystem())
        with resumed.as_directory() as path:
            restored = _load_state(model, optimizer, path)
    start_epoch = int(restored["epoch"]) + 1 if restored else 0
    stopping = EarlyStopping.from_state(restored.get("early_stopping") if restored else None, config.get("patience"))
    best_model = restored.get("best_model", _copy(model.state_dict())) if restored else None
    model = ray.train.torch.prepare_model(model)

    if rank == 0 and config.get("mlflow_accounts"):  # a Ray worker: the driver's environment is not ours
        from pathlib import Path

        from oncoserve.credentials import use_mlflow_account

        use_mlflow_account(Path(config["mlflow_accounts"]), "training")
    client = MlflowClient(config["tracking_uri"]) if rank == 0 else None
    # Where the workers ran (one Ray node id per rank), on the run: placement is part of what was trained.
    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1 and torch.distributed.is_initialized():
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, nodes[0])
        nodes = gathered
    if rank == 0:
        client.set_tag(config["run_id"], "ray_train_nodes", json.dumps(nodes))
    for epoch in range(start_epoch, config["epochs"]):
        t0 = time.monotonic()
        model.train()
        rng = np.random.default_rng([config["seed"], epoch, rank])
        train_losses = []
        for batch in task.batches(cases, split["train"], rng, world=world, rank=rank, train=True):
            optimizer.zero_grad()
            loss = task.loss(model, batch)
            loss.backward()
            optimizer.step()
            train_losses.append(float(loss.detach()))
        model.eval()
        val_losses, val_metrics = [], []
        with torch.no_grad():
            for b in task.batches(cases, split["val"], np.random.default_rng(0), train=False):
                val_losses.append(float(task.loss(model, b)))
                val_metrics.append(float(task.val_metric(model, b)))
        finite = [v for v in val_metrics if np.isfinite(v)]  # (a batch with no label of the task gives nan)
        val_metric = float(np.mean(finite)) if finite else float("nan")
        net = model.module if hasattr(model, "module") else model
        if stopping.update(epoch, val_metric):
            best_model = _copy(net.state_dict())
        metrics = {
            "epoch": epoch,
            "train_loss": float(np.mean(train_losses)) if train_losses else float("nan"),
            "val_loss": float(np.mean(val_losses)) if val_losses else float("nan"),
            "val_metric": val_metric,
            "best_epoch": stopping.best_epoch,
            "epoch_seconds": time.monotonic() - t0,
            "samples_per_second": len(train_losses) * task.batch_size * world / max(time.monotonic() - t0, 1e-6),
        }
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                            "best_model": best_model, "early_stopping": stopping.state()},
                           os.path.join(tmp, CHECKPOINT_FILE))  # fmt: skip
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            for key, value in metrics.items():
                if key != "epoch" and np.isfinite(value):
                    client.log_metric(config["run_id"], key, float(value), step=epoch)
        else:
            ray.train.report(metrics)
        if stopping.should_stop:
            break
