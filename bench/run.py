"""`make bench`: measured figures, written to bench/REPORT.md and bench/results.json.

Each figure is a `{name, value, unit, target, met}` record. Figures grow with the platform; this
stage measures the embedded stack itself (start time, memory, stop time).
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console

from oncoserve.settings import Settings
from pipelines.stack import EmbeddedStack
from pipelines.stack.process import session_alive

OUT = Path(__file__).parent
console = Console()


def figure(name: str, value: float, unit: str, target: str | None = None, met: bool | None = None) -> dict:
    return {"name": name, "value": round(value, 3), "unit": unit, "target": target, "met": met}


def _rss_mb(stack: EmbeddedStack) -> dict[str, float]:
    usage = {}
    for name, record in stack.records().items():
        total = 0
        for pid in session_alive(record):
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                continue
        usage[name] = total / 2**20
    return usage


def bench_stack() -> list[dict]:
    home = Path(tempfile.mkdtemp(prefix="osb-", dir="/tmp"))
    settings = Settings(home=home)
    stack = EmbeddedStack(settings)
    figures = []
    try:
        t0 = time.monotonic()
        stack.up()
        figures.append(figure("stack_up_first_s", time.monotonic() - t0, "s"))
        for name, mb in _rss_mb(stack).items():
            figures.append(figure(f"stack_rss_{name}_mb", mb, "MiB"))
        figures.append(figure("stack_rss_total_mb", sum(_rss_mb(stack).values()), "MiB"))
        t0 = time.monotonic()
        stack.up()
        figures.append(figure("stack_up_idempotent_s", time.monotonic() - t0, "s"))
        t0 = time.monotonic()
        stack.down()
        figures.append(figure("stack_down_s", time.monotonic() - t0, "s"))
        t0 = time.monotonic()
        stack.up()
        figures.append(figure("stack_up_restart_s", time.monotonic() - t0, "s"))
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)
    return figures


def bench_data() -> list[dict]:
    from imaging import manifest
    from imaging.phantoms import synthesise

    work = Path(tempfile.mkdtemp(prefix="osb-data-", dir="/tmp"))
    try:
        t0 = time.monotonic()
        synthesise(work / "d", n=20, seed=1)
        synth_s = time.monotonic() - t0
        t0 = time.monotonic()
        manifest.write(work / "d")
        manifest_s = time.monotonic() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [
        figure("data_synth_20_cases_s", synth_s, "s"),
        figure("data_manifest_20_cases_s", manifest_s, "s"),
        figure("data_synth_plus_manifest_s", synth_s + manifest_s, "s", "<= 120", synth_s + manifest_s <= 120),
    ]


def write_report(figures: list[dict]) -> None:
    (OUT / "results.json").write_text(json.dumps(figures, indent=2) + "\n")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# oncoserve benchmark report",
        "",
        f"Machine: {platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}; commit {git}.",
        "Command: `make bench`. Figures below are from one run; `bench/results.json` holds the same records.",
        "",
        "| figure | value | unit | target | met |",
        "|---|---|---|---|---|",
    ]
    for f in figures:
        met = "" if f["met"] is None else ("yes" if f["met"] else "**MISSED**")
        lines.append(f"| {f['name']} | {f['value']} | {f['unit']} | {f['target'] or ''} | {met} |")
    (OUT / "REPORT.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    figures = []
    with console.status("benchmark: embedded stack start/stop and memory"):
        figures += bench_stack()
    with console.status("benchmark: phantom synthesis and manifest (20 cases)"):
        figures += bench_data()
    write_report(figures)
    for f in figures:
        console.print(f"{f['name']:<28} {f['value']:>10} {f['unit']}")
    console.print(f"report: {OUT / 'REPORT.md'}")


if __name__ == "__main__":
    main()
