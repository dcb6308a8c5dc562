"""The pipeline on a terminal: a line per step, a bar per training run, a final summary table (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipelines.pipeline import STEPS, Hooks

STATUS_STYLE = {"done": "green", "exists": "cyan", "skipped": "dim", "blocked": "yellow", "refused": "red", "failed": "bold red",
                "not run": "dim"}  # fmt: skip


class ConsoleHooks(Hooks):
    """Rich progress for the runner: one line per step, a bar per training run."""

    def __init__(self, console: Console):
        self.console = console

    def step(self, task: str, step: str, outcome) -> None:
        style = STATUS_STYLE.get(outcome.status, "")
        self.console.print(f"  {task:<15} {step:<9} [{style}]{outcome.status:<8}[/] {outcome.seconds:>6.1f}s  {outcome.detail}", highlight=False)

    def log(self, message: str) -> None:
        self.console.log(message)

    def training(self, task: str, epochs: int | None):
        progress = Progress(TextColumn(f"  training {task}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                            TimeElapsedColumn(), console=self.console, transient=True)  # fmt: skip
        bar = progress.add_task("", total=epochs or 1)

        def on_epoch(done: int, total: int, val_loss: float) -> None:
            if not progress.live.is_started:
                progress.start()
            progress.update(bar, completed=done, total=total, description=f"val_loss {val_loss:.3f}")
            if done >= total:
                progress.stop()

        return on_epoch


def summary_table(summary: dict) -> Table:
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
