"""`oncoserve train TASK ...` and `oncoserve evaluate TASK --version V ...`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from imaging.errors import StudyError
from oncoserve.settings import Settings
from pipelines.cli._console import cli_identity, console, user_errors
from training.errors import TrainingError

TASK_HELP = "localization | segmentation | classification | survival"


def train(
    task: str = typer.Argument(..., help=TASK_HELP),
    data: Path = typer.Option(..., "--data", help="Dataset directory (BraTS layout)."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Epochs (default: the task's own)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Ray Train workers."),
    gpu: bool = typer.Option(False, "--gpu", help="Train on GPU workers (needs CUDA)."),
    placement: str = typer.Option("pack", "--placement", help="Where the Ray Train workers go: pack (fewest nodes), "
                                  "spread (across nodes where possible) or strict-spread (one per node, else an error)."),
    resume: str = typer.Option(None, "--resume", help="MLflow run id to resume from its last checkpoint."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split and training."),
    patience: int = typer.Option(None, "--patience", min=1,
                                 help="Stop after this many epochs without a better validation metric (default: the task's own, 10)."),
    regions: bool = typer.Option(None, "--regions/--classes",
                                 help="segmentation: train sigmoid WT/TC/ET regions instead of softmax classes (default: classes)."),
    augment: str = typer.Option(None, "--augment", help="segmentation: standard (rotation, scaling, elastic, gamma, "
                                "noise, blur, low resolution, mirroring) or none (default: standard)."),
    overlap: float = typer.Option(None, "--overlap", min=0.0, max=0.95,
                                  help="segmentation: the version's sliding-window overlap (default: 0.25)."),
) -> None:
    """Train TASK with Ray Train, track it in MLflow and register the version."""
    from oncoserve.auth import AuthError, require
    from serving.tasks import MODEL_TASKS

    settings = Settings()
    with user_errors(AuthError):
        who = require(cli_identity(settings), "data-scientist",
                      "training and registering a version")  # fmt: skip
    # What can be refused without torch and Ray is refused before importing them (seconds saved per mistake).
    with user_errors(ValueError, StudyError):
        if task not in MODEL_TASKS:
            raise ValueError(f"unknown task {task!r}; trainable tasks: {', '.join(MODEL_TASKS)}")
        if not data.is_dir():
            raise StudyError(f"{data}: dataset directory not found")
    from training.checkpoint_storage import from_settings
    from training.jobs import JobConfig, run_job
    cfg = JobConfig(task=task, data_dir=data.resolve(), tracking_uri=settings.mlflow_url, ray_address=settings.ray_address,
                    home=settings.home, storage=from_settings(settings), epochs=epochs, workers=workers, gpu=gpu, placement=placement.upper().replace("-", "_"), resume_run=resume, seed=seed, patience=patience,
                    actor=who.name, audit_file=settings.audit_file,
                    task_options={"regions": regions, "augment": augment, "overlap": overlap})  # fmt: skip
    columns = (TextColumn(f"training {task}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with user_errors(TrainingError, StudyError, ValueError, FileNotFoundError), Progress(*columns, console=console) as progress:
        bar = progress.add_task("epochs", total=epochs or 1)

        def on_epoch(done: int, total: int, val: float) -> None:
            progress.update(bar, completed=done, total=total, description=f"val_loss {val:.4f}")

        result = run_job(cfg, log=progress.console.log, on_epoch=on_epoch)
    table = Table(title=f"{task} version {result.version} (MLflow run {result.run_id})")
    table.add_column("held-out metric")
    table.add_column("value", justify="right")
    for key, value in sorted(result.metrics.items()):
        table.add_row(key, f"{value:.4f}")
    console.print(table)
    console.print(f"registered model [bold]{task}[/] version [bold]{result.version}[/]")


def evaluate(
    task: str = typer.Argument(..., help=TASK_HELP),
    version: str = typer.Option(..., "--version", help="Registered version to score."),
    data: Path = typer.Option(..., "--data", help="Dataset directory (BraTS layout)."),
    out: Path = typer.Option(..., "--out", help="Where to write the evaluation JSON."),
) -> None:
    """Score a registered version on every case of a dataset and write the metrics JSON."""
    from training.score_version import score_version

    settings = Settings()
    with user_errors(TrainingError, StudyError, FileNotFoundError), console.status(f"evaluating {task} v{version}"):
        doc = score_version(task, version, data, out, settings.mlflow_url, settings.home / "cache")
    console.print_json(data=doc["metrics"])
    console.print(f"wrote {out}")
