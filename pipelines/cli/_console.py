"""Shared console and error edge for CLI commands."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Turn the domain errors a command expects into a one-line message and exit code 1."""
    try:
        yield
    except kinds as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
