"""The code's shape, as ARCHITECTURE.md states it: imports go downward through the layers, the
benchmarks have no import cycle, and the task list is written once."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("imaging", "training", "serving", "services", "pipelines", "oncoserve", "bench")
# What each layer must never import (pipelines -> services -> serving -> imaging, pipelines -> training -> imaging).
FORBIDDEN = {"imaging": {"training", "serving", "services", "pipelines"},
             "serving": {"training", "services", "pipelines"},
             "services": {"training", "pipelines"},
             "training": {"serving", "services", "pipelines"}}  # fmt: skip


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _modules(package: str) -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in (ROOT / package).rglob("*.py")
            if "proto" not in p.parts}  # fmt: skip


def test_imports_go_downward_through_the_layers():
    wrong = [f"{module} imports {name}" for layer, banned in FORBIDDEN.items() for module, path in _modules(layer).items()
             for name in _imports(path) if name.split(".")[0] in banned]  # fmt: skip
    assert not wrong, wrong


def test_the_benchmarks_have_no_import_cycle():
    modules = _modules("bench")
    graph = {m: {i for i in _imports(p) if i in modules} for m, p in modules.items()}
    seen, stack = set(), []

    def visit(module):
        assert module not in stack, " -> ".join([*stack[stack.index(module):], module])
        if module in seen:
            return
        stack.append(module)
        for dep in graph[module]:
            visit(dep)
        stack.pop()
        seen.add(module)

    for module in graph:
        visit(module)


def test_the_task_list_is_written_once():
    literal = '"localization", "segmentation", "classification", "survival"'
    holders = [str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*.py") if literal in p.read_text()]
    assert holders == ["serving/tasks.py"], holders


def test_a_partial_benchmark_run_replaces_all_of_its_sections_figures(tmp_path, monkeypatch):
    """Re-running one section drops every figure it reported before (one it no longer reports included)
    and keeps the other sections' figures."""
    import json

    from bench import run
    from bench.timing import figure

    old = [{**figure("P4_segmentation_ort_over_torch", 1.67, "ratio"), "section": "ort"},
           figure("P4_legacy_without_section_ms", 3.0, "ms"), {**figure("stack_up_first_s", 8.0, "s"), "section": "stack"}]  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(old))
    monkeypatch.setattr(run, "OUT", tmp_path)
    monkeypatch.setattr(run, "SECTIONS", {"ort": ("P4", lambda: [figure("P4_segmentation_openvino_ms", 56.6, "ms")]),
                                          "stack": ("stack", lambda: []), "data": ("data", lambda: [])})  # fmt: skip
    run.main(["ort"])
    names = [f["name"] for f in json.loads((tmp_path / "results.json").read_text())]
    assert names == ["stack_up_first_s", "P4_segmentation_openvino_ms"]
    assert "P4_segmentation_ort_over_torch" not in (tmp_path / "REPORT.md").read_text()
