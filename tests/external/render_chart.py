"""Render and lint the Helm chart offline (runs in .venv-infra: helm-python-sdk, Helm SDK v4).

usage: render_chart.py CHART VALUES_JSON OUT_DIR
Writes OUT_DIR/<template>.yaml for every non-empty template and OUT_DIR/_result.json with the lint
report, or {"error": ...} when the values fail the chart's schema or a template fails to render.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import helm_python as helm


def main(chart_dir: str, values_json: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = json.loads(values_json)
    result: dict = {}
    try:
        chart = helm.Chart.load(chart_dir)
        chart.validate_schema(values)
        rendered = chart.render(values, name="demo", namespace="oncoserve", is_install=True)
        result["lint"] = helm.lint(chart_dir, values, strict=True)
    except helm.HelmError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        rendered = {}
    for name, text in rendered.items():
        if text.strip() and name.endswith((".yaml", ".yml")):
            (out / name.replace("/", "__")).write_text(text)
    (out / "_result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:4])
