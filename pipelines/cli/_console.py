"""Shared console and error edge for CLI commands."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def cli_identity(settings):
    """Who is calling: the token from ONCOSERVE_TOKEN or ONCOSERVE_HOME/token (None without one)."""
    from oncoserve.auth import TokenStore

    return TokenStore(settings.tokens_file).authenticate(settings.cli_token())


@contextlib.contextmanager
def user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Turn the domain errors a command expects into a one-line message and exit code 1."""
    try:
        yield
    except kinds as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
