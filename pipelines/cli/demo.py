"""`oncoserve demo` (what `make demo` runs)."""

from __future__ import annotations

import typer

from oncoserve.settings import Settings
from pipelines import demo as demo_job
from pipelines.cli._console import console, user_errors
from pipelines.stack import StackError


def demo(keep_up: bool = typer.Option(False, "--keep-up", help="Leave the stack running afterwards.")) -> None:
    """Run the platform's demo on the embedded stack."""
    with user_errors(StackError):
        results = demo_job.run(Settings(), console, keep_up=keep_up)
    console.print_json(data=results)
