"""`oncoserve auth token create | list | revoke`."""

from __future__ import annotations

import typer
from rich.table import Table

from oncoserve.auth import ROLES, AuthError, TokenStore
from oncoserve.settings import Settings
from pipelines.cli._console import cli_identity, console, user_errors

app = typer.Typer(help="API tokens and roles.", no_args_is_help=True)
token_app = typer.Typer(help="Create, list and revoke tokens (admin).", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command()
def create(
    name: str = typer.Option(..., "--name"),
    role: str = typer.Option(..., "--role", help=" | ".join(ROLES)),
    save: bool = typer.Option(False, "--save", help="Also write it to ONCOSERVE_HOME/token for this CLI."),
    expires_days: float = typer.Option(None, "--expires-days", help="Lifetime in days; default: until revoked."),
) -> None:
    """Create a token (the first one, an admin token, needs no caller). It is shown once."""
    settings = Settings()
    store = TokenStore(settings.tokens_file)
    with user_errors(AuthError, ValueError):
        caller = cli_identity(settings) if store.list() else None
        token = store.create(name, role, caller, expires_days * 86400 if expires_days else None)
    if save:
        import os

        path = settings.home / "token"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token)
    typer.echo(token)


@token_app.command("list")
def list_() -> None:
    settings = Settings()
    with user_errors(AuthError):
        cli_identity(settings)
    table = Table(title="tokens (hashes only are stored)")
    table.add_column("name")
    table.add_column("role")
    table.add_column("expires")
    import datetime as dt

    for entry in TokenStore(settings.tokens_file).list():
        expires = dt.datetime.fromtimestamp(entry["expires"]).strftime("%Y-%m-%d %H:%M") if entry.get("expires") else "never"
        table.add_row(entry["name"], entry["role"], expires)
    console.print(table)


@token_app.command()
def revoke(name: str = typer.Argument(...)) -> None:
    settings = Settings()
    with user_errors(AuthError, ValueError):
        TokenStore(settings.tokens_file).revoke(name, cli_identity(settings))
    console.print(f"revoked {name}")
