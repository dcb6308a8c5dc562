"""`oncoserve platform serve`: the platform API (registry, promotion, rollback, audit) over REST."""

from __future__ import annotations

import typer

from oncoserve.settings import Settings
from pipelines.cli._console import console

app = typer.Typer(help="The platform API server.", no_args_is_help=True)


@app.command()
def serve(port: int = typer.Option(None, "--port", help="Default: settings.platform_port (8600).")) -> None:
    """Serve the platform API on ONCOSERVE_HOST (127.0.0.1 by default); OpenAPI at /docs."""
    import uvicorn

    from pipelines.platform_api import create_app

    settings = Settings()
    port = port or settings.platform_port
    console.print(f"platform API on http://{settings.host}:{port} (OpenAPI: /docs)")
    uvicorn.run(create_app(settings), host=settings.host, port=port, log_level="warning")
