"""`oncoserve plan capacity --rps R --p95-ms L [--gpu-type T]`: size a deployment from benchmark figures."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from pipelines.capacity import GPU_TYPES, CapacityError, ServiceTimes, plan_capacity
from pipelines.cli._console import console, user_errors

app = typer.Typer(help="Capacity planning from measured service times.", no_args_is_help=True)
DEFAULT_BENCH = Path(__file__).resolve().parents[2] / "bench" / "results.json"


@app.command()
def capacity(
    rps: float = typer.Option(..., "--rps", help="Studies per second to sustain."),
    p95_ms: float = typer.Option(..., "--p95-ms", help="Target p95 latency of a whole-study analysis (ms)."),
    gpu_type: str = typer.Option(None, "--gpu-type", help=f"Run the models on Triton GPUs: {', '.join(GPU_TYPES)}."),
    bench: Path = typer.Option(DEFAULT_BENCH, "--bench", help="bench/results.json with the measured service times."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Serve replicas, Triton instances, GPU nodes and cost for a request rate and a p95 target."""
    with user_errors(CapacityError):
        plan = plan_capacity(rps, p95_ms, ServiceTimes.from_bench(bench), gpu_type.lower() if gpu_type else None)
    if as_json:
        typer.echo(json.dumps(plan.to_json(), indent=2))
        return
    table = Table(title=f"{rps:g} studies/s at p95 <= {p95_ms:g} ms ({gpu_type or 'CPU only'})")
    for col in ("stage", "runs on", "service ms", "replicas / instances", "utilisation", "p95 ms"):
        table.add_column(col)
    for s in plan.stages:
        table.add_row(s.name, s.runs_on, f"{s.service_ms:g}", str(s.servers), f"{s.utilisation:.2f}", f"{s.p95_ms:g}")
    console.print(table)
    summary = plan.to_json()
    console.print(f"Serve CPU replicas {plan.serve_cpu_replicas} on {plan.cpu_nodes} CPU nodes; Triton instances "
                  f"{plan.triton_instances} on {plan.gpus} GPUs / {plan.gpu_nodes} GPU nodes; estimated p95 "
                  f"{summary['p95_estimate_ms']} ms; about ${summary['usd_per_hour']}/h (${summary['usd_per_month']}/month)")  # fmt: skip
    for note in plan.assumptions:
        console.print(f"[dim]assumption: {note}[/]")
