"""`oncoserve audit verify`: check the audit log's hash chain and name the first bad record."""

from __future__ import annotations

from pathlib import Path

import typer

from oncoserve.audit import AuditLog
from oncoserve.settings import Settings
from pipelines.cli._console import console, err_console

app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)


@app.command()
def verify(file: Path = typer.Option(None, "--file", help="Default: ONCOSERVE_HOME/audit/audit.jsonl.")) -> None:
    """Recompute every record's hash and link; exit 1 naming the first record edited, removed or reordered."""
    path = file or Settings().audit_file
    if not path.exists():
        err_console.print(f"[bold red]error:[/] no audit log at {path}", highlight=False)
        raise typer.Exit(1)
    result = AuditLog(path).verify()
    if not result.ok:
        err_console.print(f"[bold red]audit log broken:[/] {result.problem} ({path})", highlight=False)
        raise typer.Exit(1)
    console.print(f"audit log intact: {result.records} records, chain verified ({path})")
