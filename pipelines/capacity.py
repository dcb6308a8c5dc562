"""Capacity model: request rate and a p95 target -> Serve replicas, Triton instances, GPU nodes, cost.

Each stage of a study request is an M/M/c queue (Erlang C): the gateway (decode, preprocess, encode)
on CPU replicas, then the four models side by side, on CPU replicas (onnxruntime) or on Triton GPU
instances. Service times come from `make bench` (bench/results.json) on this machine. The p95 budget
is split between the gateway and the (parallel) models in proportion to their service times; each
stage gets the fewest servers whose p95 response time (service time + the 95th percentile of the
Erlang-C wait) fits its share, at no more than MAX_UTILISATION.

What is measured and what is assumed is kept apart: CPU service times are measured; GPU speed-ups and
prices are assumptions (no GPU on the machine that wrote the benchmark) and are labelled as such.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from serving.tasks import MODEL_TASKS

TASKS = MODEL_TASKS
MAX_UTILISATION = 0.85
QUANTILE = 0.95
HOURS_PER_MONTH = 730

# Assumptions (not measured here): model speed-up of one Triton instance on the GPU over one
# onnxruntime CPU replica as benchmarked, GPUs per node, node price (USD/h, AWS on-demand list prices,
# us-east-1, 2026). Replace with `make bench` figures from a GPU node when one is available.
GPU_TYPES = {
    "t4": {"speedup": 8.0, "instance": "g4dn.xlarge", "gpus_per_node": 1, "node_usd_h": 0.526},
    "a10g": {"speedup": 15.0, "instance": "g5.xlarge", "gpus_per_node": 1, "node_usd_h": 1.006},
    "l4": {"speedup": 15.0, "instance": "g6.xlarge", "gpus_per_node": 1, "node_usd_h": 0.805},
    "a100": {"speedup": 40.0, "instance": "p4d.24xlarge", "gpus_per_node": 8, "node_usd_h": 32.77},
    "h100": {"speedup": 60.0, "instance": "p5.48xlarge", "gpus_per_node": 8, "node_usd_h": 98.32},
}
CPU_NODE = {"instance": "m6i.2xlarge", "vcpus": 8, "node_usd_h": 0.384}
CPUS_PER_REPLICA = 2  # the benchmark ran each replica's onnxruntime with 2 threads
TRITON_INSTANCES_PER_GPU = 2  # the compiled config.pbtxt's instance group on GPUs


class CapacityError(ValueError):
    """The target cannot be met (or the inputs are unusable); the message says why."""


@dataclass(frozen=True)
class ServiceTimes:
    """Seconds of work per study for each stage, as measured by the benchmark."""

    gateway_s: float
    model_s: dict[str, float]

    @classmethod
    def from_bench(cls, path: Path) -> "ServiceTimes":
        try:
            figures = {f["name"]: f["value"] for f in json.loads(Path(path).read_text())}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CapacityError(f"{path}: cannot read benchmark figures ({exc}); run `make bench`") from None
        if "P1_raw_compute_p50" not in figures and "P1_raw_onnxruntime_p50" in figures:
            figures["P1_raw_compute_p50"] = figures["P1_raw_onnxruntime_p50"]  # its name before runtimes were chosen
        needed = ["P1_in_process_p50", "P1_raw_compute_p50", *(f"P4_{t}_onnxruntime_ms" for t in TASKS)]
        missing = [n for n in needed if n not in figures]
        if missing:
            raise CapacityError(f"{path}: missing {', '.join(missing)}; run `make bench`")
        # Everything of a segmentation request except the model itself is the per-study work the
        # gateway does (decode, preprocess, map back, encode).
        gateway_ms = figures["P1_in_process_p50"] - figures["P1_raw_compute_p50"]
        return cls(gateway_ms / 1000, {t: figures[f"P4_{t}_onnxruntime_ms"] / 1000 for t in TASKS})


def erlang_c(servers: int, offered: float) -> float:
    """Probability that a request waits in an M/M/c queue (offered load a = lambda * S < c)."""
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    term, total = 1.0, 1.0  # a^k / k!, summed for k < c
    for k in range(1, servers):
        term *= offered / k
        total += term
    top = term * offered / servers / (1 - offered / servers)
    return top / (total + top)


def p95_response_s(servers: int, rate: float, service_s: float, quantile: float = QUANTILE) -> float:
    """Service time plus the `quantile` of the Erlang-C waiting time (P(W > t) = C e^{-(c mu - lambda) t})."""
    offered = rate * service_s
    if offered >= servers:
        return math.inf
    waiting = erlang_c(servers, offered)
    tail = 1 - quantile
    wait = 0.0 if waiting <= tail else math.log(waiting / tail) / (servers / service_s - rate)
    return service_s + wait


def servers_for(rate: float, service_s: float, budget_s: float, stage: str) -> int:
    if service_s > budget_s:
        raise CapacityError(f"{stage}: its service time {service_s * 1000:.0f} ms alone exceeds its p95 budget "
                            f"{budget_s * 1000:.0f} ms; raise --p95-ms or use faster hardware")  # fmt: skip
    servers = max(1, math.ceil(rate * service_s / MAX_UTILISATION))
    while p95_response_s(servers, rate, service_s) > budget_s:
        servers += 1
    return servers


@dataclass
class Stage:
    name: str
    runs_on: str
    service_ms: float
    servers: int
    utilisation: float
    p95_ms: float


@dataclass
class Plan:
    rps: float
    p95_target_ms: float
    gpu_type: str | None
    stages: list[Stage] = field(default_factory=list)
    serve_cpu_replicas: int = 0
    triton_instances: int = 0
    gpus: int = 0
    gpu_nodes: int = 0
    cpu_nodes: int = 0
    usd_per_hour: float = 0.0
    assumptions: list[str] = field(default_factory=list)

    @property
    def p95_ms(self) -> float:
        gateway = next(s for s in self.stages if s.name == "gateway")
        return gateway.p95_ms + max(s.p95_ms for s in self.stages if s.name != "gateway")

    def to_json(self) -> dict:
        return {"rps": self.rps, "p95_target_ms": self.p95_target_ms, "p95_estimate_ms": round(self.p95_ms, 1),
                "gpu_type": self.gpu_type, "stages": [s.__dict__ for s in self.stages],
                "serve_cpu_replicas": self.serve_cpu_replicas, "triton_instances": self.triton_instances,
                "gpus": self.gpus, "gpu_nodes": self.gpu_nodes, "cpu_nodes": self.cpu_nodes,
                "usd_per_hour": round(self.usd_per_hour, 2), "usd_per_month": round(self.usd_per_hour * HOURS_PER_MONTH),
                "assumptions": self.assumptions}  # fmt: skip


def plan_capacity(rps: float, p95_ms: float, times: ServiceTimes, gpu_type: str | None = None) -> Plan:
    if rps <= 0 or p95_ms <= 0:
        raise CapacityError("--rps and --p95-ms must be positive")
    if gpu_type is not None and gpu_type not in GPU_TYPES:
        raise CapacityError(f"unknown GPU type {gpu_type!r}; one of {', '.join(GPU_TYPES)}")
    gpu = GPU_TYPES.get(gpu_type) if gpu_type else None
    model_s = {t: s / gpu["speedup"] for t, s in times.model_s.items()} if gpu else dict(times.model_s)
    slowest = max(model_s.values())
    budget = p95_ms / 1000
    gateway_budget = budget * times.gateway_s / (times.gateway_s + slowest)
    model_budget = budget - gateway_budget
    plan = Plan(rps, p95_ms, gpu_type)

    def stage(name: str, runs_on: str, service_s: float, budget_s: float) -> Stage:
        n = servers_for(rps, service_s, budget_s, name)
        return Stage(name, runs_on, round(service_s * 1000, 1), n, round(rps * service_s / n, 3),
                     round(p95_response_s(n, rps, service_s) * 1000, 1))  # fmt: skip

    plan.stages.append(stage("gateway", "cpu", times.gateway_s, gateway_budget))
    for task in TASKS:
        plan.stages.append(stage(task, "triton-gpu" if gpu else "cpu", model_s[task], model_budget))
    cpu_stages = [s for s in plan.stages if s.runs_on == "cpu"]
    plan.serve_cpu_replicas = sum(s.servers for s in cpu_stages)
    plan.cpu_nodes = max(1, math.ceil(plan.serve_cpu_replicas * CPUS_PER_REPLICA / CPU_NODE["vcpus"]))
    plan.usd_per_hour = plan.cpu_nodes * CPU_NODE["node_usd_h"]
    plan.assumptions.append(f"CPU: {CPUS_PER_REPLICA} vCPUs per Serve replica (as benchmarked), "
                            f"{CPU_NODE['instance']} nodes ({CPU_NODE['vcpus']} vCPUs, ${CPU_NODE['node_usd_h']}/h)")  # fmt: skip
    if gpu:
        plan.triton_instances = sum(s.servers for s in plan.stages if s.runs_on == "triton-gpu")
        plan.gpus = math.ceil(plan.triton_instances / TRITON_INSTANCES_PER_GPU)
        plan.gpu_nodes = math.ceil(plan.gpus / gpu["gpus_per_node"])
        plan.usd_per_hour += plan.gpu_nodes * gpu["node_usd_h"]
        plan.assumptions.append(f"GPU {gpu_type}: models {gpu['speedup']:g}x faster than the benchmarked CPU replica "
                                f"(assumed, not measured), {TRITON_INSTANCES_PER_GPU} Triton instances per GPU, "
                                f"{gpu['instance']} nodes (${gpu['node_usd_h']}/h)")  # fmt: skip
    plan.assumptions.append("M/M/c queues (Poisson arrivals, exponential service); p95 = service + Erlang-C wait quantile")
    return plan
