"""Promotion gates: each returns a figure, its threshold and whether it passed.

Gates: metric floors and ceilings; no regression beyond a tolerance against the current champion;
ONNX parity; signature compatible with the serving contract; preprocessing version supported by
serving; onnxruntime latency on the contract's reference input within budget.
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from serving.contract import CONTRACT, SUPPORTED_PREPROCESSING, signature_problems
from serving.registry import Registry, VersionInfo

DEFAULT_GATES = Path(__file__).with_name("gates.toml")


@dataclass
class GateResult:
    name: str
    passed: bool
    value: object
    threshold: object
    detail: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def load_gates(path: Path | None = None) -> dict:
    path = path or DEFAULT_GATES
    try:
        config = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"gates file {path}: {exc}") from None
    if "version" not in config:
        raise ValueError(f"gates file {path}: no `version`")
    return config


EVIDENCE = ("point", "ci_low")


def _finite(value) -> bool:
    return isinstance(value, int | float) and bool(np.isfinite(value))


def _floor_gate(metrics: dict, name: str, floor: float, evidence: str, min_cases: int, source: str) -> GateResult:
    """A floor on the evidence the gates file asks for: the point estimate, or the lower bound of the
    metric's bootstrap 95 % interval (`<name>_ci_low`, which the evaluation reports beside it). The
    interval and the number of test cases are stated either way, and a floor on fewer than
    `min_test_cases` cases is not met."""
    point, low, high = metrics.get(name), metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    n = metrics.get("n_cases")
    ci = f"95 % CI {low:.3f}-{high:.3f}" if _finite(low) and _finite(high) else "no interval reported"
    detail = f"{source}; point {point:.4f}, {ci}, n = {n}" if _finite(point) else source
    value = low if evidence == "ci_low" else point
    ok = _finite(value) and value >= floor
    if ok and min_cases and not (_finite(n) and n >= min_cases):
        ok, detail = False, f"{detail}; fewer than the {min_cases} test cases a floor needs"
    threshold = f">= {floor}" + (" (95 % CI lower bound)" if evidence == "ci_low" else "")
    return GateResult(f"floor:{name}", bool(ok), value, threshold, detail)


def _metric_gates(metrics: dict, spec: dict, source: str, defaults: dict | None = None) -> list[GateResult]:
    defaults = defaults or {}
    evidence = spec.get("floor_evidence", defaults.get("floor_evidence", "point"))
    if evidence not in EVIDENCE:
        raise ValueError(f"floor_evidence must be one of {', '.join(EVIDENCE)}, not {evidence!r}")
    min_cases = int(spec.get("min_test_cases", defaults.get("min_test_cases", 0)))
    out = [_floor_gate(metrics, name, floor, evidence, min_cases, source) for name, floor in spec.get("floors", {}).items()]
    for name, ceiling in spec.get("ceilings", {}).items():
        value = metrics.get(name)
        ok = value is not None and np.isfinite(value) and value <= ceiling
        out.append(GateResult(f"ceiling:{name}", bool(ok), value, f"<= {ceiling}", source))
    return out


def _regression_gates(candidate: dict, champion: dict, spec: dict, champion_version: str, source: str) -> list[GateResult]:
    out = []
    lower_is_better = set(spec.get("ceilings", {}))
    for name, tol in spec.get("regression_tolerance", {}).items():
        new, old = candidate.get(name), champion.get(name)
        if old is None or not np.isfinite(old):
            out.append(GateResult(f"no_regression:{name}", True, new, "champion has no figure", source))
            continue
        if name in lower_is_better:
            ok = new is not None and new <= old + tol
            threshold = f"<= {old:.4f} + {tol} (champion v{champion_version})"
        else:
            ok = new is not None and new >= old - tol
            threshold = f">= {old:.4f} - {tol} (champion v{champion_version})"
        out.append(GateResult(f"no_regression:{name}", bool(ok), new, threshold, source))
    return out


def _latency_gate(model_path: Path, task: str, budget_ms: float, runs: int) -> GateResult:
    """p50 per study on the contract's reference input, as serving runs the model (a segmentation patch
    network as its sliding window over the whole grid, the version's own overlap, no TTA)."""
    import onnxruntime as ort

    from services.task_logic import infer

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    feeds = {name: np.zeros([1, *dims], np.float32) for name, dims in CONTRACT[task]["inputs"].items()}
    if "age" in feeds:
        feeds["age"][:] = 60.0
    if "presence" in feeds:
        feeds["presence"][:] = 1.0
    extras_path = model_path.with_name("extras.json")
    extras = json.loads(extras_path.read_text()) if extras_path.exists() else {}
    names = [o.name for o in session.get_outputs()]

    def run(inputs: dict) -> dict:
        return dict(zip(names, session.run(None, inputs)))

    try:
        infer(task, run, feeds, extras)  # warm-up: first run allocates
    except Exception as exc:  # a model that cannot answer the serving contract's input fails here, not in serving
        return GateResult("latency_p50_ms", False, None, f"<= {budget_ms}",
                          f"the model failed on the contract's reference input: {type(exc).__name__}: {str(exc)[:200]}")  # fmt: skip
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        infer(task, run, feeds, extras)
        times.append((time.perf_counter() - t0) * 1000)
    p50 = float(np.median(times))
    return GateResult("latency_p50_ms", p50 <= budget_ms, round(p50, 1), f"<= {budget_ms}", f"onnxruntime CPU, {runs} runs, per study")


def evaluate_on(task: str, model_dir: Path, eval_data: Path, cache_dir: Path) -> dict:
    from training.data import load_dataset
    from training.evaluate import evaluate

    data = load_dataset(eval_data, cache_dir)
    extras = json.loads((model_dir / "extras.json").read_text()) if (model_dir / "extras.json").exists() else {}
    return evaluate(task, str(model_dir / "model.onnx"), data.cases, extras)["metrics"]


def _reporting_gates(registry: Registry, info: VersionInfo, spec: dict) -> list[GateResult]:
    """A reporting version is checked on the reference cases, recomputed here from its artifacts."""
    from services.reporting import model as reporting_model

    metrics = reporting_model.evaluate(registry.download(info.task, info.version))
    return _metric_gates(metrics, spec, "recomputed on the reference cases")


def fair_metrics(registry: Registry, task: str, versions: tuple[str, ...], datasets: list[Path], cache_dir: Path) -> tuple[list[dict], str]:
    """Each version's figures on the same cases: every dataset's cases minus any case either version trained
    or calibrated on (by case id: the safe side, whatever copy of the data this is)."""
    from pipelines.compare import NoUnseenCases, _seen_cases
    from training.data import load_dataset
    from training.evaluate import evaluate

    seen = set().union(*(_seen_cases(registry, task, v) for v in versions))
    cases, parts = [], []
    for data in datasets:
        dataset = load_dataset(data, cache_dir)
        kept = [c for c in dataset.cases if c.case_id not in seen]
        cases += kept
        parts.append(f"{len(kept)} of {len(dataset.cases)}")
    if not cases:
        raise NoUnseenCases("every case of the comparison data was used to train or calibrate one of the versions")
    figures = []
    for v in versions:
        model_dir = registry.download(task, v)
        extras = json.loads((model_dir / "extras.json").read_text()) if (model_dir / "extras.json").exists() else {}
        figures.append(evaluate(task, str(model_dir / "model.onnx"), cases, extras)["metrics"])
    return figures, f"the pipeline's comparison data ({' + '.join(parts)} cases; cases either version saw left out)"


def shadow_gate(spec: dict, entries: list[dict] | None) -> GateResult:
    """The change-control gate on shadow evidence (`shadow = { min_studies = N, min_agreement = x }` in a
    task's gates): at least N shadowed studies answered without error, and their mean headline agreement
    with the champion (services.agreement) at or above x. Its 95 % interval is stated beside it."""
    from serving.rollout_report import summarise

    need, floor = int(spec.get("min_studies", 1)), float(spec.get("min_agreement", 0.0))
    ok_entries = [e for e in entries or [] if not e.get("error") and e.get("agreement")]
    threshold = f">= {floor} over >= {need} shadowed studies"
    if len(ok_entries) < need:
        return GateResult("shadow_agreement", False, None, threshold,
                          f"{len(ok_entries)} shadowed studies answered without error; {need} needed (oncoserve rollout set --shadow)")  # fmt: skip
    headline = summarise(ok_entries)["overall"]["agreement"]["agreement"]
    low, high = headline["ci95"]
    return GateResult("shadow_agreement", headline["mean"] >= floor, headline["mean"], threshold,
                      f"{len(ok_entries)} shadowed studies, 95 % CI {low:.3f}-{high:.3f}")  # fmt: skip


def run_gates(registry: Registry, info: VersionInfo, gates: dict, eval_data: Path | None, cache_dir: Path,
              champion: str | None = ..., regression_data: list[Path] | None = None,
              shadow_evidence: list[dict] | None = None) -> list[GateResult]:  # fmt: skip
    """`champion`: the version to compare with (the platform passes its signed champion, so an alias moved
    behind its back cannot lower the bar); default: the registry's champion alias. `regression_data`:
    datasets the no-regression gate compares both versions on (the pipeline's comparison data).
    `shadow_evidence`: the version's shadow comparisons, for a task whose gates ask for them."""
    task = info.task
    if task == "reporting":
        return _reporting_gates(registry, info, gates.get(task, {}))
    spec = gates.get(task, {})
    defaults = gates.get("defaults", {})
    model_dir = registry.download(task, info.version)
    results: list[GateResult] = []

    problems = signature_problems(task, info.signature)
    results.append(GateResult("signature", not problems, "; ".join(problems) or "compatible", "serving contract"))
    pre = info.tags.get("preprocessing_version", "")
    results.append(GateResult("preprocessing", pre in SUPPORTED_PREPROCESSING, pre, sorted(SUPPORTED_PREPROCESSING)))
    parity = float(info.tags.get("onnx_parity_max_abs_diff", "inf"))
    bound = defaults.get("parity_max_abs_diff", 1e-3)
    results.append(GateResult("onnx_parity", parity <= bound, parity, f"<= {bound}"))

    if champion is ...:
        champion = registry.alias(task, "champion")
    if eval_data is not None:
        candidate_metrics = evaluate_on(task, model_dir, eval_data, cache_dir)
        source = f"recomputed on {eval_data}"
    else:
        candidate_metrics, source = info.metrics, "registered held-out metrics"
    results += _metric_gates(candidate_metrics, spec, source, defaults)
    if champion is not None and champion != info.version and regression_data:
        from pipelines.compare import NoUnseenCases

        try:
            (cand_fair, champ_fair), source = fair_metrics(registry, task, (info.version, champion), regression_data, cache_dir)
            results += _regression_gates(cand_fair, champ_fair, spec, champion, source)
        except NoUnseenCases as exc:
            results.append(GateResult("no_regression", False, None, "unseen comparison cases", str(exc)))
    elif champion is not None and champion != info.version:
        if eval_data is not None:
            champion_metrics = evaluate_on(task, registry.download(task, champion), eval_data, cache_dir)
        else:
            champion_metrics = registry.version(task, champion).metrics
            source = "registered held-out metrics (each version's own test split; pass --eval-data to compare on one set)"
        results += _regression_gates(candidate_metrics, champion_metrics, spec, champion, source)
    if "shadow" in spec:
        results.append(shadow_gate(spec["shadow"], shadow_evidence))
    if problems:
        results.append(GateResult("latency_p50_ms", False, None, defaults.get("latency_budget_ms"), "not run: signature incompatible"))
    else:
        results.append(_latency_gate(model_dir / "model.onnx", task, defaults.get("latency_budget_ms", 3000), defaults.get("latency_runs", 3)))
    return results
