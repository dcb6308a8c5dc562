"""`oncoserve pipeline run | schema`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import typer

from imaging.errors import StudyError
from oncoserve.auth import AuthError
from oncoserve.settings import Settings
from pipelines.cli._console import cli_identity, console, err_console, user_errors
from pipelines.pipeline_config import TRAINABLE, PipelineConfigError, json_schema, load_config
from pipelines.progress import ConsoleHooks, summary_table
from serving.registry import RegistryError
from training.errors import TrainingError

app = typer.Typer(help="The end-to-end pipeline: train -> evaluate -> register -> compare -> gate -> compile -> roll out.",
                  no_args_is_help=True)  # fmt: skip
@app.command()
def run(
    data: Path = typer.Option(None, "--data", help="Dataset directory (BraTS layout); overrides the config's `data`."),
    tasks: list[str] = typer.Option(None, "--tasks", help=f"Only these tasks (repeat the option): {' | '.join(TRAINABLE)}."),
    promote: str = typer.Option(None, "--promote", help="candidate | champion: move that alias when the gates pass."),
    config: Path = typer.Option(None, "--config", help="Pipeline definition (YAML); default: the packaged pipelines/pipeline.yaml."),
    summary: Path = typer.Option(None, "--summary", help="Where to write the summary JSON (default: under ONCOSERVE_HOME/pipelines/runs)."),
) -> None:
    """Run the pipeline for each task; idempotent and resumable. Exit 2 when a gate refused a promotion."""
    import os

    from pipelines.pipeline import PipelineRunner, default_summary_path, write_summary

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own progress lines say enough
    warnings.filterwarnings("ignore", module="sklearn")  # single-class folds of tiny test splits: the figures say n/a

    settings = Settings()
    with user_errors(PipelineConfigError, AuthError, ValueError, FileNotFoundError, RegistryError):
        cfg = load_config(config)
        if data is not None:
            cfg.data = data.resolve()
        if tasks:  # `--tasks a --tasks b` or `--tasks a,b`
            named = [t.strip() for item in tasks for t in item.split(",") if t.strip()]
            cfg.tasks = type(cfg).model_validate(cfg.model_dump() | {"tasks": named}).tasks
        if promote not in (None, "none", "candidate", "champion"):
            raise ValueError(f"--promote must be candidate or champion, not {promote!r}")
        runner = PipelineRunner(settings, cfg, cli_identity(settings), promote=promote, hooks=ConsoleHooks(console))
    console.print(f"pipeline [bold]{cfg.name}[/] on {cfg.data}: tasks {', '.join(cfg.tasks)}; promote {runner.target}")
    with user_errors(TrainingError, StudyError, RegistryError, FileNotFoundError):
        result = runner.run()
    path = write_summary(result, summary or default_summary_path(settings, result))
    console.print(summary_table(result))
    for task, t in result["tasks"].items():
        if t["comparison"]:
            console.print(f"comparison report for {task}: {t['comparison']}")
        failed = [f"{s}: {o['detail']}" for s, o in t["steps"].items() if o["status"] in ("failed", "refused")]
        for line in failed:
            err_console.print(f"[bold red]{task}[/] {line}", highlight=False)
    console.print(f"summary JSON: {path}")
    if result["status"] == "failed":
        raise typer.Exit(1)
    if result["status"] == "refused":
        raise typer.Exit(2)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the pipeline definition."""
    typer.echo(json.dumps(json_schema(), indent=1))
