"""The pipeline's definition as data (YAML): tasks, data, training settings, evaluation sets, gates,
comparison and rollout. The same file runs `oncoserve pipeline run --config FILE` here and the
Helm chart's pipeline RayJob on Kubernetes (its values carry the same document).

The fingerprint of one task's run -- dataset hash + that task's training settings + code commit -- is
what makes the pipeline idempotent: a registered version carries it as the `pipeline_key` tag, and a
re-run with the same fingerprint finds that version instead of training another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.tasks import MODEL_TASKS

TRAINABLE = MODEL_TASKS
DEFAULT_CONFIG = Path(__file__).with_name("pipeline.yaml")


class PipelineConfigError(ValueError):
    """The pipeline definition is missing, unreadable or invalid (the message names the field)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Training(_Strict):
    seed: int = 7
    workers: int = Field(1, ge=1)
    placement: Literal["pack", "spread", "strict-spread"] = Field(
        "pack", description="where the Ray Train workers go: fewest nodes, spread, or one per node (not part of the fingerprint)")
    gpu: bool = False
    epochs: dict[str, int] = Field(default_factory=dict, description="per task; a task not named trains its default")
    lr: dict[str, float] = Field(default_factory=dict, description="per-task learning-rate override")

    @field_validator("epochs", "lr")
    @classmethod
    def _known_tasks(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(TRAINABLE))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; tasks are {list(TRAINABLE)}")
        if any(v <= 0 for v in value.values()):
            raise ValueError("values must be positive")
        return value


class EvaluationSet(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,40}$")
    path: Path


class Compare(_Strict):
    bootstrap: int = Field(1000, ge=50, le=20000)


class Compile(_Strict):
    max_batch: int = Field(4, ge=1, le=64)
    gpu: bool = False
    triton_backend: Literal["onnxruntime", "openvino", "measured"] = "onnxruntime"


class Rollout(_Strict):
    promote: Literal["none", "candidate", "champion"] = "none"


class PipelineConfig(_Strict):
    version: Literal[1] = 1
    name: str = "oncoserve"
    data: Path | None = None
    tasks: list[str] = Field(default_factory=lambda: list(TRAINABLE))
    training: Training = Field(default_factory=Training)
    evaluation_sets: list[EvaluationSet] = Field(default_factory=list)
    gates: Path | None = Field(None, description="gates TOML; default: the packaged pipelines/gates.toml")
    compare: Compare = Field(default_factory=Compare)
    compile: Compile = Field(default_factory=Compile)
    rollout: Rollout = Field(default_factory=Rollout)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in TRAINABLE]
        if unknown or not value:
            raise ValueError(f"tasks must be a non-empty subset of {list(TRAINABLE)} (got {value})")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _unique_sets(self) -> PipelineConfig:
        names = [s.name for s in self.evaluation_sets]
        if len(names) != len(set(names)):
            raise ValueError("evaluation set names must be unique")
        return self

    def task_training(self, task: str) -> dict:
        """What of the definition shapes the model of one task (and so its fingerprint)."""
        return {"task": task, "seed": self.training.seed, "workers": self.training.workers, "gpu": self.training.gpu,
                "epochs": self.training.epochs.get(task), "lr": self.training.lr.get(task)}  # fmt: skip

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def task_key(config: PipelineConfig, task: str, dataset_hash: str, commit: str) -> str:
    doc = {"training": config.task_training(task), "dataset_hash": dataset_hash, "git_commit": commit}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_config(path: Path | None = None, base_dir: Path | None = None) -> PipelineConfig:
    """Read and validate a pipeline definition; relative paths in it are relative to the file."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise PipelineConfigError(f"pipeline config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise PipelineConfigError(f"pipeline config {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PipelineConfigError(f"pipeline config {path}: expected a mapping at the top level")
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise PipelineConfigError(f"pipeline config {path}: {problems}") from None
    root = base_dir or path.parent
    resolve = lambda p: p if p is None or p.is_absolute() else (root / p).resolve()  # noqa: E731
    config.data = resolve(config.data)
    config.gates = resolve(config.gates)
    for s in config.evaluation_sets:
        s.path = resolve(s.path)
    return config


def json_schema() -> dict:
    return PipelineConfig.model_json_schema()
