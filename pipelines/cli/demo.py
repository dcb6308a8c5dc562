"""`oncoserve demo` (what `make demo` runs)."""

from __future__ import annotations

import typer

from imaging.errors import StudyError
from oncoserve.settings import Settings
from pipelines import demo as demo_job
from pipelines.cli._console import console, user_errors
from pipelines.stack import StackError
from training.errors import TrainingError


def demo(
    keep_up: bool = typer.Option(False, "--keep-up", help="Leave the stack running afterwards."),
    cases: int = typer.Option(60, "--cases", min=8, help="Phantom cases to synthesise."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Epochs for every task (default: demo-sized per task)."),
) -> None:
    """Run the platform's demo on the embedded stack: data -> Ray Train -> MLflow registry."""
    per_task = {t: epochs for t in demo_job.DEMO_EPOCHS} if epochs else None
    with user_errors(StackError, TrainingError, StudyError):
        results = demo_job.run(Settings(), console, keep_up=keep_up, cases=cases, epochs=per_task)
    console.print_json(data=results)
