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

from pipelines.stack import EmbeddedStack
from pipelines.stack.ports import private_settings
from pipelines.stack.process import session_alive
from bench.timing import figure
from serving.tasks import MODEL_TASKS

OUT = Path(__file__).parent
console = Console()


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
    settings = private_settings(home)
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


def bench_ort_vs_torch() -> list[dict]:
    """P4: each CPU runtime (onnxruntime, OpenVINO) vs torch eager on the same input, per task, 2 threads each.

    Segmentation runs on its network's input (one 64^3 window); the target is the fastest runtime whose
    outputs match torch (the compile-time selection) at >= 1.5x torch eager."""
    import numpy as np
    import torch

    from serving.runtimes import DEFAULT_TOLERANCE, RUNTIMES, choose_runtime
    from training import networks, tasks
    from training.data import CaseArrays
    from training.export import REFERENCE_FILE, export_onnx

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    case = CaseArrays("bench", rng.standard_normal((4, 96, 112, 96)).astype(np.float32), np.ones(4, np.float32),
                      None, np.zeros(4, np.int64), 60.0, 300.0, 1, "s", 2.0)  # fmt: skip
    figures = []
    work = Path(tempfile.mkdtemp(prefix="osb-ort-"))
    try:
        for name in MODEL_TASKS:
            task, model = tasks.get(name), networks.build(name).eval()
            out = work / name / "model.onnx"
            export_onnx(task, model, {}, case, out)
            graph = task.export_module(model, {}).eval()
            inputs = task.export_inputs(case)
            with torch.no_grad():
                graph(*inputs)
                samples = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    graph(*inputs)
                    samples.append((time.perf_counter() - t0) * 1000)
            torch_ms = float(np.median(samples))
            choice = choose_runtime(out, out.parent / REFERENCE_FILE, RUNTIMES, threads=2, runs=5)
            figures.append(figure(f"P4_{name}_torch_eager_ms", torch_ms, "ms"))
            for trial in choice.trials:
                diff = float("nan") if trial.max_abs_diff is None else trial.max_abs_diff * 1e6
                figures.append(figure(f"P4_{name}_{trial.runtime}_parity", diff, "max diff x1e-6",
                                      f"<= {DEFAULT_TOLERANCE * 1e6:.0f}", trial.passed))  # fmt: skip
                if trial.p50_ms is not None:
                    figures.append(figure(f"P4_{name}_{trial.runtime}_ms", trial.p50_ms, "ms"))
            if choice.runtime is not None:
                best = next(t for t in choice.trials if t.runtime == choice.runtime)
                speedup = torch_ms / best.p50_ms
                target = (">= 1.5", speedup >= 1.5) if name == "segmentation" else (None, None)
                figures.append(figure(f"P4_{name}_chosen_{choice.runtime}_speedup_over_torch", speedup, "x", *target))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return figures


VERSIONED = ("torch", "onnxruntime", "openvino", "ray", "mlflow", "kserve", "bentoml", "tritonclient", "monai")
NOTES = {
    "stack / data": "embedded stack start, stop and memory; phantom synthesis and manifest of 20 cases.",
    "P4": "each CPU runtime (onnxruntime, OpenVINO) vs torch eager on one preprocessed study (segmentation: its "
          "64^3 window), per task, 2 threads each: parity against torch, p50 of 5 runs after a warm-up, and the "
          "runtime compile would choose (the fastest passing parity) with its speed-up over torch.",
    "P7": "Ray Train samples/s, segmentation, 2 workers vs 1 on the 2 cores.",
    "PP": "preprocessing v2 of one 2 mm phantom case: the BraTS-style twin (fast path) and the same case as a raw "
          "scanner study (raw path: registration of 3 series, deepbet, N4), each step timed; resampling 4 volumes onto "
          "the model grid with SimpleITK vs the scipy path it replaced; labels back to the native grid.",
    "PP-served": "/v1/segmentation:predict end to end (one-epoch models, 2 threads per replica) for that twin and that "
                 "raw study, alternately, 5 rounds each after a warm-up; the raw path's extra time is its preprocessing.",
    "SW": "segmentation per 2 mm study as serving runs it (imaging.sliding_window, onnxruntime 2 threads): windows "
          "of the trained 64^3 patch at overlaps 0, 0.25 (the default), 0.5, with and without mirroring TTA (8 passes), "
          "and the whole grid as one window (bench/segmentation_windows.py).",
    "P1": "one segmentation request through the platform (HTTP, Ray Serve, the replica's runtime) vs the "
          "same work as function calls in one process, measured alternately; with the pre/post-processing share and "
          "the ratio to the raw compute (the sliding window on the runtime the replica serves, same threads).",
    "shipped": "the packaged services/deployments.yaml as users get it (1 runtime thread and 1 CPU per model replica, "
               "autoscaling on): P1 with its in-process twin and raw compute at 1 thread, timed in shuffled rounds; the "
               "whole study vs the slowest task and vs the four tasks called one after another (the sequential control: "
               "their ratio is the fan-out's parallelism); segmentation throughput at 1, 2, 4, 8 closed-loop clients, "
               "platform vs in-process analyzer (N threads); every stage's histogram (end of this report).",
    "P1-peers": "raw inference on the same compiled ONNX and input tensor (one window of the study, the patch "
                "network's input: 1x4x64x64x64 float32, 4.2 MB; before patch training it was the whole grid) through "
                "the platform's OIP v2 (HTTP binary, gRPC), a KServe ModelServer (gRPC; its HTTP path answers in "
                "JSON), BentoML (.npy files; its JSON for arrays took over 300 s) and `mlflow models serve` (JSON), "
                "each over onnxruntime called in-process, and the platform over the runtime it serves called in-process "
                "(the same threads); the platform, KServe gRPC, BentoML and the in-process runtimes are timed in "
                "interleaved rounds in shuffled order on the same machine at once (bench/peers.py).",
    "P2": "the whole study (four tasks fanned out by the gateway) vs the slowest single task.",
    "P3": "raw localization inference at concurrency 8 and 1, adaptive batching up to 8 vs none.",
    "P6": "segmentation of the same head as 64^3, 96^3 and 128^3 voxels (240 mm): end to end, and in-process "
          "in a fresh process whose peak RSS (VmHWM) is the memory figure.",
    "soak": "whole-study analyses from 3 closed-loop clients for 10 minutes after a 1-minute warm-up; memory "
            "is the RSS of this stack's Serve replicas and proxy, sampled every 15 s (trace: bench/soak_memory.csv); "
            "the second half's growth is a least-squares line through its samples.",
    "P5": "the segmentation champion moved under load from 2 clients; replicas poll the registry every 5 s.",
    "P1-ingress": "one served stack (bench config, one-epoch models) behind Serve's Python proxy, then, after a restart "
                  "of its Ray head, behind Serve's direct ingress (HAProxy forwarding HTTP and gRPC to the gateway "
                  "replica's own servers; settings.serve_ingress): raw OIP v2 on the segmentation window (HTTP binary, "
                  "gRPC) over the served runtime in-process, and a whole segmentation request over the model's compute "
                  "on the study, timed in interleaved rounds with their in-process references in each phase "
                  "(bench/ingress.py). The gateway's Ray call to the task replica remains on both paths.",
}


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def write_report(figures: list[dict]) -> None:
    (OUT / "results.json").write_text(json.dumps(figures, indent=2) + "\n")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# oncoserve benchmark report",
        "",
        f"Machine: {platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}; commit {git}.",
        "Versions: " + ", ".join(f"{name} {_version(name)}" for name in VERSIONED) + ".",
        "Command: `make bench` (every section; `python -m bench.run SECTION ...` re-runs some and keeps the "
        "others' last figures). `bench/results.json` holds the same records.",
        "",
        *[f"- **{name}**: {text}" for name, text in NOTES.items()],
        "",
        "Missed targets: " + (", ".join(f"`{f['name']}`" for f in figures if f["met"] is False) or "none") + ".",
        "",
        "| figure | value | unit | target | met |",
        "|---|---|---|---|---|",
    ]
    for f in figures:
        met = "" if f["met"] is None else ("yes" if f["met"] else "**MISSED**")
        lines.append(f"| {f['name']} | {f['value']} | {f['unit']} | {f['target'] or ''} | {met} |")
    histograms = OUT / "stage_histograms.md"  # written by the serving section
    if histograms.exists():
        lines += ["", "## Stage histograms (oncoserve_stage_seconds, every replica; counts per bucket, cumulative)", "",
                  histograms.read_text()]  # fmt: skip
    (OUT / "REPORT.md").write_text("\n".join(lines) + "\n")


SECTIONS = {
    "stack": ("embedded stack start/stop and memory", lambda: bench_stack()),
    "data": ("phantom synthesis and manifest (20 cases)", lambda: bench_data()),
    "ort": ("CPU runtimes vs torch eager (P4)", lambda: bench_ort_vs_torch()),
    "serving": ("serving overhead, fan-out and batching (P1, P2, P3)", lambda: _serving()),
    "train": ("Ray Train 2 workers vs 1 (P7)", lambda: bench_ray_train_scaling()),
    "preprocess": ("preprocessing v2: fast path vs raw scanner study, per step (PP)", lambda: _preprocessing()),
    "preprocess-served": ("served segmentation request, fast path vs raw path (PP-served)", lambda: _served_paths()),
    "windows": ("segmentation latency by sliding-window size, overlap and TTA (SW)", lambda: _windows()),
    "ingress": ("Serve's proxy vs its direct ingress (HAProxy): raw OIP v2 and a segmentation request (P1-ingress)",
                lambda: _ingress()),
}


def _ingress() -> list[dict]:
    from bench.ingress import bench_ingress

    return bench_ingress()


def _windows() -> list[dict]:
    from bench.segmentation_windows import bench_windows

    return bench_windows()


def _preprocessing() -> list[dict]:
    from bench.preprocessing import bench_preprocessing

    return bench_preprocessing()


def _served_paths() -> list[dict]:
    from bench.preprocessing import bench_served_paths

    return bench_served_paths()


def _serving() -> list[dict]:
    from bench.serving import bench_serving

    return bench_serving()


# Figures recorded before they carried their section: the section is known by the name's first part.
LEGACY_PREFIX = {"stack": "stack", "data": "data", "P4": "ort", "P1": "serving", "P1peers": "serving", "P2": "serving",
                 "P3": "serving", "shipped": "serving", "stages": "serving", "P5": "serving", "P6": "serving", "soak": "serving", "P7": "train", "SW": "windows"}  # fmt: skip


def _section_of(figure: dict) -> str | None:
    return figure.get("section") or LEGACY_PREFIX.get(figure["name"].split("_")[0])


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.run [SECTION ...]`: every section by default; named ones replace their figures."""
    import sys

    names = (argv if argv is not None else sys.argv[1:]) or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown benchmark section {', '.join(unknown)}; one of {', '.join(SECTIONS)}")
    fresh: dict[str, list[dict]] = {}
    for name in names:
        title, run = SECTIONS[name]
        with console.status(f"benchmark: {title}"):
            fresh[name] = run()
    figures = [{**f, "section": n} for n in names for f in fresh[n]]
    if len(names) < len(SECTIONS) and (OUT / "results.json").exists():
        # A partial run keeps the other sections' last figures (in the same order as a full run); a re-run
        # section's old figures all go, so a figure it no longer reports cannot linger beside the new ones.
        kept = {f["name"]: f for f in json.loads((OUT / "results.json").read_text()) if _section_of(f) not in names}
        for f in figures:
            kept[f["name"]] = f
        figures = list(kept.values())
    write_report(figures)
    for f in figures:
        console.print(f"{f['name']:<44} {f['value']:>10} {f['unit']}")
    console.print(f"report: {OUT / 'REPORT.md'}")


if __name__ == "__main__":
    main()
