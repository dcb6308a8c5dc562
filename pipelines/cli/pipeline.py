"""`oncoserve pipeline run | schema`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from imaging.errors import StudyError
from oncoserve.auth import AuthError
from oncoserve.settings import Settings
from pipelines.cli._console import cli_identity, console, err_console, user_errors
from pipelines.pipeline_config import PipelineConfigError, TRAINABLE, json_schema, load_config
from serving.registry import RegistryError
from training.errors import TrainingError

app = typer.Typer(help="The end-to-end pipeline: train -> evaluate -> register -> compare -> gate -> compile -> roll out.",
                  no_args_is_help=True)  # fmt: skip
STATUS_STYLE = {"done": "green", "exists": "cyan", "skipped": "dim", "blocked": "yellow", "refused": "red", "failed": "bold red",
                "not run": "dim"}  # fmt: skip


class ConsoleHooks:
    """Rich progress for the runner: one line per step, a bar per training run."""

    def step(self, task: str, step: str, outcome) -> None:
        style = STATUS_STYLE.get(outcome.status, "")
        console.print(f"  {task:<15} {step:<9} [{style}]{outcome.status:<8}[/] {outcome.seconds:>6.1f}s  {outcome.detail}", highlight=False)

    def log(self, message: str) -> None:
        console.log(message)

    def training(self, task: str, epochs: int | None):
        progress = Progress(TextColumn(f"  training {task}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                            TimeElapsedColumn(), console=console, transient=True)  # fmt: skip
        bar = progress.add_task("", total=epochs or 1)

        def on_epoch(done: int, total: int, val_loss: float) -> None:
            if not progress.live.is_started:
                progress.start()
            progress.update(bar, completed=done, total=total, description=f"val_loss {val_loss:.3f}")
            if done >= total:
                progress.stop()

        return on_epoch


def summary_table(summary: dict) -> Table:
    from pipelines.pipeline import STEPS

    table = Table(title=f"pipeline {summary['pipeline']}: {summary['status']} in {summary['seconds']:.0f} s")
    table.add_column("task", no_wrap=True)
    table.add_column("version", no_wrap=True)
    for col in (*STEPS, "aliases"):
        table.add_column(col)
    for task, t in summary["tasks"].items():
        cells = [f"[{STATUS_STYLE.get(t['steps'][s]['status'], '')}]{t['steps'][s]['status']}[/]" for s in STEPS]
        version = (t["version"] or "-") + (" (new)" if t["new_version"] else "")
        table.add_row(task, version, *cells, ",".join(t["aliases"]))
    return table


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
        runner = PipelineRunner(settings, cfg, cli_identity(settings), promote=promote, hooks=ConsoleHooks())
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
