"""`oncoserve models compare TASK A B`: the report a data scientist reads before a promotion.

Both versions are scored on the same cases -- either the held-out test rows each version was
registered with (the cases both have), or a dataset given with `--data`, from which every case either
version trained or calibrated on is left out. The report (Markdown + PNG + JSON) is written locally and
attached to the MLflow run of version B (the candidate) under `compare/vA-vB/`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from serving.registry import Registry, RegistryError
from training import compare as stats
from training.report import comparison_plots


class NoUnseenCases(ValueError):
    """Every case available was used to train or calibrate one of the versions."""


@dataclass
class ComparisonReport:
    task: str
    a: str
    b: str
    out_dir: Path
    markdown: Path
    doc: dict
    attached_to_run: str | None


def _run_json(registry: Registry, run_id: str, name: str) -> dict | None:
    try:
        path = registry.client.download_artifacts(run_id, name, tempfile.mkdtemp())
    except Exception:  # absent artifact (an older run) or unreachable store: the caller says what is missing
        return None
    return json.loads(Path(path).read_text())


def _seen_cases(registry: Registry, task: str, version: str) -> set[str]:
    """Cases the version trained or calibrated on (its run's split.json, train + val)."""
    run_id = registry.version(task, version).run_id
    split = _run_json(registry, run_id, "split.json") or {}
    return set(split.get("train", [])) | set(split.get("val", []))


def _rows_on_data(registry: Registry, task: str, versions: tuple[str, ...], datasets: list[Path | tuple[str, Path]],
                  cache_dir: Path) -> tuple[list, str]:  # fmt: skip
    """Per-case rows of each version on every dataset, leaving out the cases either version saw. A dataset
    given as (name, path) -- an evaluation set -- prefixes its cases' sites with its name."""
    from training.data import load_dataset
    from training.evaluate import evaluate

    cases, parts, site_prefix = [], [], {}
    for entry in datasets:
        name, data = entry if isinstance(entry, tuple) else (None, entry)
        dataset = load_dataset(data, cache_dir)
        excluded: set[str] = set()
        for v in versions:
            if registry.version(task, v).tags.get("dataset_hash") == dataset.dataset_hash:
                excluded |= _seen_cases(registry, task, v)
        kept = [c for c in dataset.cases if c.case_id not in excluded]
        cases += kept
        site_prefix |= {c.case_id: f"{name}/" for c in kept if name}
        parts.append(f"{data} ({len(kept)} of {len(dataset.cases)} cases)")
    if not cases:
        raise NoUnseenCases(f"every case in {'; '.join(parts)} was used to train or calibrate "
                            f"{'one of the versions' if len(versions) > 1 else 'the version'}; give unseen data")  # fmt: skip
    rows = []
    for v in versions:
        model_dir = registry.download(task, v)
        extras = json.loads((model_dir / "extras.json").read_text())
        per_case = evaluate(task, str(model_dir / "model.onnx"), cases, extras)["per_case"]
        rows.append([r | {"site": site_prefix.get(r["case_id"], "") + str(r.get("site"))} for r in per_case])
    return rows, "; ".join(parts) + " — cases either version trained or calibrated on left out"


def _rows_held_out(registry: Registry, task: str, versions: tuple[str, ...]) -> tuple[list, str]:
    rows = []
    for v in versions:
        evaluation = _run_json(registry, registry.version(task, v).run_id, "evaluation.json")
        if evaluation is None:
            raise NoUnseenCases(f"{task} v{v} has no evaluation.json on its run; pass --data to score both versions")
        rows.append(evaluation["per_case"])
    seen = set().union(*(_seen_cases(registry, task, v) for v in versions))
    rows = [[r for r in version_rows if r["case_id"] not in seen] for version_rows in rows]
    if not rows[-1] or (len(rows) == 2 and not stats.paired_rows(rows[0], rows[1])[0]):
        raise NoUnseenCases(f"{task}: no held-out test case is unseen by both versions (other data or split); pass --data")
    who = "both versions were" if len(versions) == 2 else "the version was"
    return rows, f"the held-out test cases {who} registered with (not trained on)"


def _fmt(x: float) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"


def _interval(i: dict) -> str:
    low, high = i["ci95"]
    return f"{_fmt(i['value'])} [{_fmt(low)}, {_fmt(high)}]"


def markdown(doc: dict, a: str | None, b: str, source: str, plots: list[Path]) -> str:
    task = doc["task"]
    if a is None:
        return _markdown_single(doc, b, source, plots)
    lines = [f"# {task}: v{a} (A) vs v{b} (B)", "",
             f"Cases: {doc['n_cases']} — {source}. 95 % intervals from {doc['n_boot']} paired bootstrap",
             "resamples of cases; a difference is called only when its interval excludes zero.", "",
             "| metric | A | B | B − A | verdict |", "|---|---|---|---|---|"]  # fmt: skip
    for m in doc["metrics"]:
        arrow = "" if m["higher_is_better"] else " (lower is better)"
        lines.append(f"| {m['name']}{arrow} | {_interval(m['a'])} | {_interval(m['b'])} | {_interval(m['difference'])} | {m['verdict']} |")
    names = [m["name"] for m in doc["metrics"]]
    lines += ["", "## Per site", "", "| site | cases | " + " | ".join(f"{n} A / B" for n in names) + " |",
              "|---|---|" + "---|" * len(names)]  # fmt: skip
    for site, row in doc["per_site"].items():
        lines.append(f"| {site} | {row['n_cases']} | " + " | ".join(f"{_fmt(row[n][0])} / {_fmt(row[n][1])}" for n in names) + " |")
    lines += ["", "## Cases where the versions disagree most", "", "| case | site | disagreement | A | B |", "|---|---|---|---|---|"]
    skip = {"case_id", "site", "risk_rank"}
    for d in doc["disagreements"]:
        show = lambda r: ", ".join(f"{k} {_fmt(v)}" for k, v in r.items() if k not in skip and isinstance(v, float))  # noqa: E731
        lines.append(f"| {d['case_id']} | {d['site'] or ''} | {d['disagreement']:.3f} | {show(d['a'])} | {show(d['b'])} |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "Few cases give wide intervals: read the intervals, not only the point figures."]
    return "\n".join(lines) + "\n"


def _markdown_single(doc: dict, b: str, source: str, plots: list[Path]) -> str:
    lines = [f"# {doc['task']}: v{b} (no champion to compare with)", "",
             f"Cases: {doc['n_cases']} — {source}. 95 % intervals from {doc['n_boot']} bootstrap resamples of cases.", "",
             "| metric | value [95 % CI] |", "|---|---|"]  # fmt: skip
    for m in doc["metrics"]:
        lines.append(f"| {m['name']}{'' if m['higher_is_better'] else ' (lower is better)'} | {_interval(m['b'])} |")
    names = [m["name"] for m in doc["metrics"]]
    lines += ["", "## Per site", "", "| site | cases | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for site, row in doc["per_site"].items():
        lines.append(f"| {site} | {row['n_cases']} | " + " | ".join(_fmt(row[n][1]) for n in names) + " |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def compare_versions(registry: Registry, task: str, a: str | None, b: str, out_dir: Path, cache_dir: Path,
                     data: Path | list[Path | tuple[str, Path]] | None = None, n_boot: int = 1000, attach: bool = True) -> ComparisonReport:  # fmt: skip
    """Version A against B (A None: B alone, for a task's first version) on `data` (one or more
    datasets) or, without it, on the held-out test rows both were registered with."""
    if task not in stats.METRICS:
        raise RegistryError(f"no comparison for task {task!r}; compare one of {', '.join(stats.METRICS)}")
    versions = tuple(v for v in (a, b) if v is not None)
    for v in versions:
        registry.version(task, v)  # RegistryError when absent
    if data is not None:
        rows, source = _rows_on_data(registry, task, versions, data if isinstance(data, list) else [data], cache_dir)
    else:
        rows, source = _rows_held_out(registry, task, versions)
    rows_a, rows_b = (rows[0], rows[1]) if a is not None else (None, rows[0])
    doc = stats.compare(task, rows_a, rows_b, n_boot=n_boot)
    doc |= {"a": a, "b": b, "source": source}
    out_dir.mkdir(parents=True, exist_ok=True)
    if rows_a is not None:
        paired_a, paired_b = stats.paired_rows(rows_a, rows_b)
        plots = comparison_plots(task, paired_a, paired_b, (f"v{a}", f"v{b}"), out_dir)
    else:
        plots = comparison_plots(task, None, rows_b, (None, f"v{b}"), out_dir)
    report = out_dir / "report.md"
    report.write_text(markdown(doc, a, b, source, plots))
    (out_dir / "comparison.json").write_text(json.dumps(doc, indent=1, default=float))
    run_id = None
    if attach:
        run_id = registry.version(task, b).run_id
        registry.client.log_artifacts(run_id, str(out_dir), f"compare/v{a}-v{b}" if a is not None else f"compare/v{b}")
    return ComparisonReport(task, a, b, out_dir, report, doc, run_id)
