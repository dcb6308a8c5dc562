"""`oncoserve demo` (what `make demo` runs)."""

from __future__ import annotations

import typer

from imaging.errors import StudyError
from oncoserve.auth import AuthError
from oncoserve.settings import Settings
from pipelines.cli._console import console, user_errors
from training.errors import TrainingError


def demo(
    down: bool = typer.Option(False, "--down", help="Bring the stack down afterwards (default: leave it and serving up)."),
    cases: int = typer.Option(60, "--cases", min=8, help="Phantom cases to synthesise for training."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Epochs for every task (default: the pipeline definition's)."),
) -> None:
    """The platform end to end on the embedded stack: data -> pipeline (train ... promote) -> serve -> analyse a study."""
    import os

    # The demo's own modules (object store, serving, imaging) load only when it runs, not on every command.
    from pipelines import demo as demo_job
    from pipelines.serving import ServeError
    from pipelines.stack import StackError
    from pipelines.study_client import StudyClientError

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with user_errors(StackError, TrainingError, StudyError, ServeError, StudyClientError, AuthError):
        results = demo_job.run(Settings(), console, down=down, cases=cases, epochs=epochs)
    console.print_json(data=results)
