"""`oncoserve stack up | down | status [--json]`."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from oncoserve.settings import Settings
from pipelines.cli._console import console, user_errors
from pipelines.stack import ComponentStatus, EmbeddedStack, StackError, is_healthy

app = typer.Typer(help="Start, stop and check the embedded stack (S3, MLflow, Ray head and worker nodes, platform API).", no_args_is_help=True)


def _table(parts: list[ComponentStatus]) -> Table:
    table = Table(title="oncoserve embedded stack")
    for col in ("component", "state", "pid", "address", "detail", "log"):
        table.add_column(col)
    for p in parts:
        state = "[green]healthy[/]" if p.healthy else ("[yellow]unhealthy[/]" if p.running else "[red]down[/]")
        table.add_row(p.name, state, str(p.pid or "-"), p.url, p.detail, p.log)
    return table


@app.command()
def up(
    db: str = typer.Option(None, "--db", help="Registry database: sqlite (default) or postgresql."),
    workers: int = typer.Option(None, "--workers", min=0, max=8,
                                help="Ray worker nodes beside the head (a multi-node cluster on this machine); "
                                     "default: keep those running. 0 stops them."),
) -> None:
    """Start every component that is not running and wait until all are healthy."""
    settings = Settings(db=db) if db else Settings()
    with user_errors(StackError), console.status("starting the embedded stack") as spinner:
        parts = EmbeddedStack(settings).up(on_event=lambda n, m: spinner.console.log(f"{n}: {m}"), workers=workers)
    console.print(_table(parts))


@app.command()
def down() -> None:
    """Stop every process the stack started (and only those)."""
    with user_errors(StackError):
        EmbeddedStack(Settings()).down(on_event=lambda n, m: console.log(f"{n}: {m}"))
    console.print("stack is down")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Check each component's real health; exit 1 when anything is down."""
    stack = EmbeddedStack(Settings())
    with user_errors(StackError):
        parts = stack.status()
    if as_json:
        typer.echo(json.dumps(stack.status_json(parts), indent=2))
    else:
        console.print(_table(parts))
    if not is_healthy(parts):
        raise typer.Exit(1)
