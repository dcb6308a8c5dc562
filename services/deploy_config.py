"""The deployment config file (YAML) of the Serve application, validated.

The same file drives `oncoserve serve up` on the embedded stack and the Helm chart's RayService, so
replica counts, autoscaling, batching and backends are set in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.tasks import MODEL_TASKS

DEFAULT_FILE = Path(__file__).with_name("deployments.yaml")
DEPLOYMENTS = ("gateway", *MODEL_TASKS, "reporting")


class ConfigError(ValueError):
    """The deployment config file is missing or invalid (the message names the file and field)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="default: a model deployment's max_batch_size, else 2")
    upscale_delay_s: float = Field(3.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0, description="window over which ongoing requests are averaged")

    @model_validator(mode="after")
    def _order(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is larger than max_replicas")
        return self


class Batching(_Strict):
    """Adaptive batching (services/batcher.py): a lone request runs at once; requests that arrive while a
    model call runs go together into the next one."""

    max_batch_size: int = Field(4, ge=1, le=64, description="requests per model call (keep <= the Triton config's max_batch_size)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5, description="longest wait to fill a batch once two or more are waiting")


class Backend(_Strict):
    kind: Literal["auto", "onnxruntime", "openvino", "triton"] = Field(
        "auto", description="auto: the CPU runtime `oncoserve compile` measured fastest for the version")
    threads: int = Field(1, ge=1, description="runtime threads per replica (onnxruntime intra-op / OpenVINO)")
    triton_url: str | None = Field(None, description="host:port of Triton's gRPC endpoint (kind: triton)")
    fallback_to_embedded: bool = Field(False, description="answer from the embedded runtime when Triton is down")
    timeout_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _url(self) -> "Backend":
        if self.kind == "triton" and not self.triton_url:
            raise ValueError("backend kind triton needs triton_url")
        return self


class SlidingWindow(_Strict):
    """How a segmentation patch network is run over a study (imaging.sliding_window)."""

    overlap: float | None = Field(None, ge=0, lt=1, description="window overlap (default: the version's own, 0.25)")
    mirror: bool = Field(False, description="mirroring test-time augmentation: 8 passes, their disagreement reported")
    batch: int = Field(2, ge=1, le=64, description="windows per model call")


class Generator(_Strict):
    kind: Literal["template", "openai", "llamacpp"] = "template"
    url: str | None = Field(None, description="OpenAI-compatible base URL (kind: openai)")
    model: str | None = Field(None, description="model name at that endpoint (kind: openai)")
    model_path: str | None = Field(None, description="GGUF file (kind: llamacpp; default: the packaged gemma-3-270m)")
    max_tokens: int = Field(512, ge=16, le=8192)

    @model_validator(mode="after")
    def _complete(self) -> "Generator":
        if self.kind == "openai" and not (self.url and self.model):
            raise ValueError("generator kind openai needs url and model")
        return self


class Deployment(_Strict):
    num_cpus: float | None = Field(None, ge=0, description="CPUs Ray reserves per replica; model deployments: "
                                   "backend.threads (their runtime's cores), the default")
    max_ongoing_requests: int = Field(8, ge=1)
    resources: dict[str, float] | None = Field(None, description="custom Ray resources a replica needs, e.g. "
                                               "{oncoserve_worker: 0.5} to keep it on the embedded stack's worker nodes "
                                               "(or on a KubeRay worker group that declares them in rayStartParams)")
    max_replicas_per_node: int | None = Field(None, ge=1, description="at most this many replicas on one Ray node "
                                              "(Serve's spreading is otherwise best effort)")
    autoscaling: Autoscaling = Autoscaling()
    batching: Batching | None = Field(None, description="model deployments only (default: Batching())")
    backend: Backend | None = Field(None, description="model deployments only (default: Backend())")
    sliding_window: SlidingWindow | None = Field(None, description="segmentation only (default: SlidingWindow())")
    generator: Generator | None = Field(None, description="reporting only (default: the template composer)")
    retrieval: bool | None = Field(None, description="reporting only: embedding retrieval over the knowledge base")

    def serve_options(self) -> dict:
        """Keyword arguments for `serve.deployment(...).options(...)`."""
        return {"max_ongoing_requests": self.max_ongoing_requests,
                **({"max_replicas_per_node": self.max_replicas_per_node} if self.max_replicas_per_node else {}),
                "autoscaling_config": self.autoscaling.model_dump(),
                "ray_actor_options": {"num_cpus": self.num_cpus, **({"resources": dict(self.resources)} if self.resources else {})},
                # JSON log lines, each with the request id Serve assigns (also the x-request-id header).
                "logging_config": {"encoding": "JSON"}}  # fmt: skip


def _check_resources(task: str, spec: Deployment) -> None:
    """A model replica reserves the cores its runtime uses, and can hold the batches it is asked to form.

    Ray places replicas by `num_cpus`: a replica running N runtime threads on a 0.25 reservation lets
    Ray pack four times as many replicas onto a node as it has cores. An embedded runtime's replica
    therefore reserves exactly `backend.threads` (a Triton-backed replica computes nothing itself and
    may reserve less). A batch of `max_batch_size` needs that many requests in the replica at once,
    and the autoscaler should add a replica only when one is that busy: max_batch_size <=
    target_ongoing_requests <= max_ongoing_requests."""
    threads = spec.backend.threads
    if spec.num_cpus is None:
        spec.num_cpus = float(threads)
    elif spec.backend.kind != "triton" and spec.num_cpus != threads:
        raise ValueError(f"{task}: num_cpus {spec.num_cpus:g} is not backend.threads {threads}: a replica reserves "
                         "the cores its runtime uses (leave num_cpus out to take the threads)")
    batch = spec.batching.max_batch_size
    if spec.autoscaling.target_ongoing_requests is None:
        spec.autoscaling.target_ongoing_requests = float(batch)
    target = spec.autoscaling.target_ongoing_requests
    if not batch <= spec.max_ongoing_requests:
        raise ValueError(f"{task}: max_batch_size {batch} is above max_ongoing_requests {spec.max_ongoing_requests}: "
                         "a replica could never hold a full batch")
    if not batch <= target <= spec.max_ongoing_requests:
        raise ValueError(f"{task}: autoscaling target_ongoing_requests {target:g} must lie between max_batch_size "
                         f"{batch} and max_ongoing_requests {spec.max_ongoing_requests}: below a batch, replicas are "
                         "added before batching can pay; above the cap, the target is never reached")


def cpu_reservation(config: "DeploymentConfig", replicas: str = "max_replicas") -> float:
    """CPUs the application reserves from Ray with every deployment at `min_replicas` or `max_replicas`."""
    return sum(d.num_cpus * getattr(d.autoscaling, replicas) for d in config.deployments.values())


class DeploymentConfig(_Strict):
    application: str = "oncoserve"
    watch_interval_s: float = Field(2.0, gt=0)
    deployments: dict[str, Deployment]

    @model_validator(mode="after")
    def _all_tasks(self) -> "DeploymentConfig":
        missing = [name for name in DEPLOYMENTS if name not in self.deployments]
        if missing:
            raise ValueError(f"deployments missing: {', '.join(missing)}")
        unknown = sorted(set(self.deployments) - set(DEPLOYMENTS))
        if unknown:
            raise ValueError(f"unknown deployments: {', '.join(unknown)}")
        for name in ("gateway", "reporting"):
            if self.deployments[name].batching or self.deployments[name].backend:
                raise ValueError(f"{name}: batching and backend apply to the model deployments only")
        for name in ("gateway", *MODEL_TASKS):
            if self.deployments[name].generator or self.deployments[name].retrieval is not None:
                raise ValueError(f"{name}: generator and retrieval apply to the reporting deployment only")
        for name in DEPLOYMENTS:
            if name != "segmentation" and self.deployments[name].sliding_window is not None:
                raise ValueError(f"{name}: sliding_window applies to the segmentation deployment only")
        self.deployments["segmentation"].sliding_window = self.deployments["segmentation"].sliding_window or SlidingWindow()
        for task in MODEL_TASKS:
            spec = self.deployments[task]
            spec.batching, spec.backend = spec.batching or Batching(), spec.backend or Backend()
            _check_resources(task, spec)
        for name in ("gateway", "reporting"):
            spec = self.deployments[name]
            spec.num_cpus = 0.25 if spec.num_cpus is None else spec.num_cpus
            if spec.autoscaling.target_ongoing_requests is None:
                spec.autoscaling.target_ongoing_requests = 2.0
        reporting = self.deployments["reporting"]
        reporting.generator = reporting.generator or Generator()
        reporting.retrieval = True if reporting.retrieval is None else reporting.retrieval
        return self

    def document(self) -> dict:
        """The config as plain data, every setting explicit (what the chart and the app builder get)."""
        return self.model_dump(mode="json", exclude_none=True)


def load(path: str | Path | None = None) -> DeploymentConfig:
    path = Path(path) if path else DEFAULT_FILE
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: deployment config not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    try:
        return DeploymentConfig.model_validate(raw or {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None
