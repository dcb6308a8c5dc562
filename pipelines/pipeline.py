"""`oncoserve pipeline run`: train -> evaluate -> register -> compare -> gate -> compile -> roll out.

Every step asks the real systems whether its work is already done, so a re-run after a failure (or a
kill) continues from the first incomplete step and an identical re-run registers nothing:

- train + register: a registered version tagged with this task's `pipeline_key` (dataset hash +
  training settings + code commit, see pipeline_config.task_key) is reused; runs an interrupted
  pipeline left RUNNING are marked KILLED;
- evaluate: each evaluation set's figures are a version tag `eval.<set>`;
- compare: both versions scored on the run's data (minus the cases either trained on) and the evaluation
  sets; the report is an artifact of the candidate's run (`compare/vA-vB`);
- gates: always re-run (cheap, and the champion they compare with may have moved);
- compile: the version's `compiled_sha256` tag;
- promote: the alias already pointing at the version.

A task whose step fails is recorded as failed and the other tasks go on; the summary says which.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from oncoserve.auth import Identity, require
from oncoserve.lineage import git_commit
from oncoserve.settings import Settings
from pipelines.pipeline_config import PipelineConfig, task_key
from pipelines.platform_client import PlatformClient
from pipelines.promotion import TARGET_ROLE, PromotionRefused
from serving.registry import Registry

STEPS = ("train", "evaluate", "compare", "gates", "compile", "promote")


@dataclass
class StepOutcome:
    status: str  # done | exists | skipped | blocked (gates not passed) | refused | failed | not run
    detail: str = ""
    seconds: float = 0.0


@dataclass
class TaskOutcome:
    task: str
    pipeline_key: str
    version: str | None = None
    new_version: bool = False
    steps: dict[str, StepOutcome] = field(default_factory=lambda: {s: StepOutcome("not run") for s in STEPS})
    gates: list = field(default_factory=list)  # GateResult
    gates_passed: bool | None = None
    comparison: str | None = None
    aliases: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(s.status == "failed" for s in self.steps.values())

    @property
    def refused(self) -> bool:
        return self.steps["promote"].status == "refused"


class Hooks:
    """What the runner tells its caller (the CLI draws rich progress from these)."""

    def step(self, task: str, step: str, outcome: StepOutcome) -> None: ...

    def log(self, message: str) -> None: ...

    def training(self, task: str, epochs: int | None) -> Callable[[int, int, float], None]:
        return lambda done, total, val_loss: None


class PipelineRunner:
    def __init__(self, settings: Settings, config: PipelineConfig, who: Identity | None, promote: str | None = None,
                 hooks: Hooks | None = None):  # fmt: skip
        self.settings = settings
        self.config = config
        self.target = promote or config.rollout.promote
        # Check the roles now, not after an hour of training.
        self.who = require(who, "data-scientist", "running the pipeline (it trains and registers versions)")
        if self.target != "none":
            require(who, TARGET_ROLE[self.target], f"a pipeline that promotes to {self.target}")
        if config.data is None:
            raise ValueError("no data: pass --data DIR or set `data` in the pipeline config")
        if not config.data.is_dir():
            raise FileNotFoundError(f"{config.data}: dataset directory not found")
        for s in config.evaluation_sets:
            if not s.path.is_dir():
                raise FileNotFoundError(f"evaluation set {s.name}: {s.path} is not a directory")
        self.hooks = hooks or Hooks()
        self.registry = Registry(settings.mlflow_url)
        # Gates, compile and promotion are the platform API's: it runs its own gates file and signs the moves.
        self.platform = PlatformClient(settings)
        self._comparison_uris: list[str] | None = None
        if config.gates is not None:
            import hashlib

            ours = hashlib.sha256(Path(config.gates).read_bytes()).hexdigest()
            server = self.platform.info()["gates_sha256"]
            if ours != server:
                raise ValueError(f"the pipeline names gates {config.gates} (sha256 {ours[:12]}) but the platform enforces "
                                 f"sha256 {server[:12]}: the platform's gates decide; remove `gates` from the definition "
                                 "or start the platform with that file (ONCOSERVE_GATES_FILE on the server)")  # fmt: skip

    # -- steps ---------------------------------------------------------------------------------------

    def _train(self, out: TaskOutcome, dataset_hash: str) -> StepOutcome:
        existing = [v for v in self.registry.versions(out.task) if v.tags.get("pipeline_key") == out.pipeline_key]
        if existing:
            out.version = existing[0].version
            return StepOutcome("exists", f"version {out.version} already exists for this data, config and code")
        self._close_interrupted_runs(out)
        from training.checkpoint_storage import from_settings
        from training.jobs import JobConfig, run_job

        t = self.config.training
        cfg = JobConfig(task=out.task, data_dir=self.config.data, tracking_uri=self.settings.mlflow_url,
                        ray_address=self.settings.ray_address, home=self.settings.home, storage=from_settings(self.settings), epochs=t.epochs.get(out.task),
                        workers=t.workers, gpu=t.gpu, placement=t.placement.upper().replace("-", "_"), seed=t.seed, actor=self.who.name, audit_file=self.settings.audit_file,
                        lr=t.lr.get(out.task), tags={"pipeline_key": out.pipeline_key, "pipeline": self.config.name})  # fmt: skip
        result = run_job(cfg, log=self.hooks.log, on_epoch=self.hooks.training(out.task, t.epochs.get(out.task)))
        out.version, out.new_version = result.version, True
        return StepOutcome("done", f"registered version {result.version} (run {result.run_id[:8]}, dataset {dataset_hash[:12]})")

    def _close_interrupted_runs(self, out: TaskOutcome) -> None:
        from training.jobs import EXPERIMENT_PREFIX

        client = self.registry.client
        experiment = client.get_experiment_by_name(EXPERIMENT_PREFIX + out.task)
        if experiment is None:
            return
        stale = client.search_runs([experiment.experiment_id],
                                   f"tags.pipeline_key = '{out.pipeline_key}' and attributes.status = 'RUNNING'")  # fmt: skip
        for run in stale:
            client.set_terminated(run.info.run_id, "KILLED")
            self.hooks.log(f"{out.task}: run {run.info.run_id[:8]} of an interrupted pipeline marked KILLED")

    def _evaluate(self, out: TaskOutcome) -> StepOutcome:
        if not self.config.evaluation_sets:
            return StepOutcome("skipped", "no evaluation sets in the config")
        from pipelines.gates import evaluate_on

        info = self.registry.version(out.task, out.version)
        done, lines = [], []
        for s in self.config.evaluation_sets:
            tag = f"eval.{s.name}"
            if tag in info.tags:
                done.append(s.name)
                continue
            figures = evaluate_on(out.task, self.registry.download(out.task, out.version), s.path, self.settings.home / "cache")
            figures = {k: float(v) for k, v in figures.items() if isinstance(v, int | float)}
            self.registry.set_tag(out.task, out.version, tag, json.dumps(figures))
            for k, v in figures.items():
                if v == v:  # MLflow refuses NaN
                    self.registry.client.log_metric(info.run_id, f"{tag}.{k.replace('/', '.')}", v)
            lines.append(f"{s.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in list(figures.items())[:3]))
        if not lines:
            return StepOutcome("exists", f"already scored on {', '.join(done)}")
        return StepOutcome("done", "; ".join(lines))

    def _compare(self, out: TaskOutcome) -> StepOutcome:
        from pipelines.compare import NoUnseenCases, compare_versions

        champion = self.registry.alias(out.task, "champion")
        if champion == out.version:
            return StepOutcome("skipped", f"version {out.version} is the champion")
        name = f"v{champion}-v{out.version}" if champion else f"v{out.version}"
        out_dir = self.settings.home / "pipelines" / "compare" / out.task / name
        run_id = self.registry.version(out.task, out.version).run_id
        if (out_dir / "report.md").exists() and self.registry.client.list_artifacts(run_id, f"compare/{name}"):
            out.comparison = str(out_dir / "report.md")
            return StepOutcome("exists", f"report {out_dir / 'report.md'}")
        # Both versions scored on this run's data minus every case either trained or calibrated on (the
        # candidate's held-out split; fair to a champion trained on other data or another split) and on
        # the evaluation sets, which appear as their own sites.
        datasets = [self.config.data, *((s.name, s.path) for s in self.config.evaluation_sets)]
        try:
            report = compare_versions(self.registry, out.task, champion, out.version, out_dir, self.settings.home / "cache",
                                      data=datasets, n_boot=self.config.compare.bootstrap)  # fmt: skip
        except NoUnseenCases as exc:
            return StepOutcome("skipped", f"no fair comparison: {exc} (add an evaluation set)")
        out.comparison = str(report.markdown)
        against = f"against champion v{champion}" if champion else "no champion yet: the version alone"
        worse = [m["name"] for m in report.doc["metrics"] if m.get("verdict") == "worse"]
        return StepOutcome("done", f"{against}; {report.markdown}" + (f"; worse on {', '.join(worse)}" if worse else ""))

    def _comparison_data(self) -> list[str]:
        """The comparison step's data (the run's dataset and every evaluation set), in the data bucket so
        the platform can score both versions itself; uploaded once per run (content-addressed)."""
        if self._comparison_uris is None:
            from pipelines.dataset_upload import upload_dataset

            folders = [self.config.data, *(s.path for s in self.config.evaluation_sets)]
            self._comparison_uris = [upload_dataset(self.settings, Path(f), prefix="comparison") for f in folders]
        return self._comparison_uris

    def _gates(self, out: TaskOutcome) -> StepOutcome:
        results = self.platform.gate(out.task, out.version, regression_data=self._comparison_data())
        out.gates = results
        out.gates_passed = all(g.passed for g in results)
        failed = [g.name for g in results if not g.passed]
        if failed:
            return StepOutcome("blocked", f"{len(failed)} of {len(results)} gates not passed: {', '.join(failed)}")
        return StepOutcome("done", f"all {len(results)} passed")

    def _compile(self, out: TaskOutcome) -> StepOutcome:
        if not out.gates_passed:
            return StepOutcome("skipped", "the version did not pass its gates")
        info = self.registry.version(out.task, out.version)
        if info.tags.get("compiled_sha256"):
            return StepOutcome("exists", f"already in {info.tags.get('compiled_repository')}")
        c = self.config.compile
        result = self.platform.compile(out.task, out.version, gpu=c.gpu, max_batch=c.max_batch, triton_backend=c.triton_backend)
        return StepOutcome("done", f"s3://{result['bucket']}/{result['prefix']}/{out.task}/{out.version}; TensorRT {result['tensorrt']}")

    def _promote(self, out: TaskOutcome) -> StepOutcome:
        if self.target == "none":
            return StepOutcome("skipped", "no promotion asked (--promote candidate|champion)")
        if self.registry.alias(out.task, self.target) == out.version:
            return StepOutcome("exists", f"version {out.version} is already {self.target}")
        try:  # a refusal is recorded in the audit log like any other
            result = self.platform.promote(out.task, out.version, self.target, reason=f"pipeline {self.config.name}",
                                           regression_data=self._comparison_data())  # fmt: skip
        except PromotionRefused as refused:
            return StepOutcome("refused", str(refused))
        return StepOutcome("done", f"{self.target} -> v{result.version} (was {result.previous_holder or 'unset'})")

    # -- the run -------------------------------------------------------------------------------------

    def run(self) -> dict:
        from imaging import manifest

        started, t0 = dt.datetime.now(dt.UTC), time.monotonic()
        dataset_hash = manifest.build(self.config.data)["dataset_hash"]
        commit = git_commit()
        outcomes = []
        try:
            for task in self.config.tasks:
                out = TaskOutcome(task, task_key(self.config, task, dataset_hash, commit))
                outcomes.append(out)
                self._run_task(out, dataset_hash)
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        status = "failed" if any(o.failed for o in outcomes) else "refused" if any(o.refused for o in outcomes) else "completed"
        return {
            "pipeline": self.config.name, "status": status, "promote": self.target,
            "config_digest": self.config.digest(), "git_commit": commit,
            "data": {"path": str(self.config.data), "dataset_hash": dataset_hash},
            "evaluation_sets": {s.name: str(s.path) for s in self.config.evaluation_sets},
            "started_at": started.isoformat(timespec="seconds"), "seconds": round(time.monotonic() - t0, 1),
            "tasks": {o.task: _task_json(o) for o in outcomes},
        }  # fmt: skip

    def _run_task(self, out: TaskOutcome, dataset_hash: str) -> None:
        steps = {"train": lambda: self._train(out, dataset_hash), "evaluate": lambda: self._evaluate(out),
                 "compare": lambda: self._compare(out), "gates": lambda: self._gates(out),
                 "compile": lambda: self._compile(out), "promote": lambda: self._promote(out)}  # fmt: skip
        for name in STEPS:
            t0 = time.monotonic()
            try:
                outcome = steps[name]()
            except Exception as exc:  # one task's failure is recorded; the other tasks go on
                outcome = StepOutcome("failed", f"{type(exc).__name__}: {exc}"[:500])
            outcome.seconds = round(time.monotonic() - t0, 1)
            out.steps[name] = outcome
            self.hooks.step(out.task, name, outcome)
            if outcome.status == "failed":
                break
        if out.version is not None:
            try:
                out.aliases = self.registry.version(out.task, out.version).aliases
            except Exception:  # the registry went away after a failure: the summary keeps what is known
                pass


def _task_json(o: TaskOutcome) -> dict:
    return {"version": o.version, "new_version": o.new_version, "pipeline_key": o.pipeline_key,
            "steps": {k: asdict(v) for k, v in o.steps.items()}, "gates_passed": o.gates_passed,
            "gates": [g.to_json() for g in o.gates],
            "comparison": o.comparison, "aliases": o.aliases}  # fmt: skip


def write_summary(summary: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return path


def default_summary_path(settings: Settings, summary: dict) -> Path:
    stamp = summary["started_at"].replace(":", "").replace("+0000", "Z")
    return settings.home / "pipelines" / "runs" / f"{stamp}-{summary['config_digest'][:8]}" / "summary.json"
