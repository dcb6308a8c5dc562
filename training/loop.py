"""The Ray Train worker loop shared by every task (runs inside TorchTrainer workers).

Each epoch: a sharded pass over the training split, a validation loss on the val split, a report to
Ray Train (with a checkpoint from rank 0) and, from rank 0, the epoch's metrics to the MLflow run.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

CHECKPOINT_FILE = "state.pt"


def _load_state(model, optimizer, path: str) -> int:
    state = torch.load(os.path.join(path, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from mlflow import MlflowClient

    from training import networks, tasks
    from training.data import load_dataset

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    task = tasks.get(config["task"])
    torch.manual_seed(config["seed"] + rank)
    data = load_dataset(config["data_dir"], config["cache_dir"])
    cases = data.by_id()
    split = config["split"]

    model = networks.build(config["task"])
    lr = config.get("lr") if config.get("lr") is not None else task.lr
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            start_epoch = _load_state(model, optimizer, path)
    elif config.get("resume_from"):
        start_epoch = _load_state(model, optimizer, config["resume_from"])
    model = ray.train.torch.prepare_model(model)

    if rank == 0 and config.get("mlflow_accounts"):  # a Ray worker: the driver's environment is not ours
        from pathlib import Path

        from oncoserve.credentials import use_mlflow_account

        use_mlflow_account(Path(config["mlflow_accounts"]), "training")
    client = MlflowClient(config["tracking_uri"]) if rank == 0 else None
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
        with torch.no_grad():
            val_losses = [float(task.loss(model, b)) for b in task.batches(cases, split["val"], np.random.default_rng(0), train=False)]
        metrics = {
            "epoch": epoch,
            "train_loss": float(np.mean(train_losses)) if train_losses else float("nan"),
            "val_loss": float(np.mean(val_losses)) if val_losses else float("nan"),
            "epoch_seconds": time.monotonic() - t0,
            "samples_per_second": len(train_losses) * task.batch_size * world / max(time.monotonic() - t0, 1e-6),
        }
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                net = model.module if hasattr(model, "module") else model
                torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                           os.path.join(tmp, CHECKPOINT_FILE))  # fmt: skip
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            for key, value in metrics.items():
                if key != "epoch" and np.isfinite(value):
                    client.log_metric(config["run_id"], key, float(value), step=epoch)
        else:
            ray.train.report(metrics)
