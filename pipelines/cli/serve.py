"""`oncoserve serve up | down | status [--json]`: the Serve application on the embedded stack."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from oncoserve.settings import Settings
from pipelines.cli._console import console, user_errors
from pipelines.serving import ServeError

app = typer.Typer(help="Serve the champions: study gateway, task deployments, OIP v2 (Ray Serve).", no_args_is_help=True)


@app.command()
def up(config: Path = typer.Option(None, "--config", help="Deployment config YAML (default: services/deployments.yaml).")) -> None:
    """Deploy the gateway and one deployment per task (or update them in place) and wait until ready."""
    from pipelines import serving

    settings = Settings()
    with user_errors(ServeError), console.status("deploying the Serve application"):
        info = serving.up(settings, config)
    console.print(f"serving REST on {info['http']} (OpenAPI: {info['http']}/docs), gRPC on {info['grpc']}")
    console.print("model versions: " + ", ".join(f"{t} {v}" for t, v in info["model_versions"].items()))


@app.command()
def down() -> None:
    """Remove the Serve application and its proxies (the stack keeps running)."""
    from pipelines import serving

    with user_errors(ServeError), console.status("stopping Serve"):
        serving.down(Settings())
    console.print("serving is down")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Each deployment's state and replicas; exit 1 when the API is not ready."""
    from pipelines import serving

    with user_errors(ServeError):
        info = serving.status(Settings())
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        table = Table(title=f"oncoserve serving ({info['http']}, gRPC {info['grpc']})")
        for col in ("application", "deployment", "status", "replicas", "model version"):
            table.add_column(col)
        for app_name, app_info in info["applications"].items():
            for name, d in app_info["deployments"].items():
                replicas = ", ".join(f"{n} {state.lower()}" for state, n in d["replicas"].items())
                table.add_row(app_name, name, d["status"], replicas, info["model_versions"].get(name, "-"))
        console.print(table if info["applications"] else "no Serve application is deployed (oncoserve serve up)")
        for task, refused in info.get("untrusted_aliases", {}).items():
            console.print(f"[bold red]UNTRUSTED ALIAS[/] {task}: champion moved to v{refused['version']} without a signed "
                          f"promotion; refused, still serving the signed version ({refused['reason']})", highlight=False)  # fmt: skip
        if not info.get("auth", True):
            console.print("[bold red]SERVING AUTH IS OFF[/] (ONCOSERVE_SERVE_AUTH=off): anyone who reaches the API may "
                          "analyse studies. For local development only.", highlight=False)  # fmt: skip
    if not info["running"]:
        raise typer.Exit(1)
