"""Free loopback ports for a private embedded stack (tests, benchmarks, a second stack beside the first)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from pipelines.stack.process import port_free

S3_OFFSETS = [0, 1, 2, 3, 4, 5, 10000, 10001, 10002, 10003, 10005]  # weed mini's servers and their gRPC ports
RAY_WORKER_PORTS = 6  # ports each embedded Ray worker node takes (pipelines/stack/components.py RayWorker)


def _free_block(host: str, offsets: list[int], rng: random.Random, taken: frozenset[int] = frozenset()) -> int:
    for _ in range(500):
        base = rng.randrange(20000, 29000)
        ports = [base + off for off in offsets]
        if not taken.intersection(ports) and all(port_free(host, p) for p in ports):
            return base
    raise RuntimeError(f"no free block of ports found on {host}")


def private_stack_env(home: Path, host: str = "127.0.0.1") -> dict[str, str]:
    """ONCOSERVE_* variables for a stack with its own home and ports that are free right now."""
    rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
    s3 = _free_block(host, S3_OFFSETS, rng)
    # The two blocks are picked independently; the second must not land on the first (both are free now).
    other = _free_block(host, list(range(10)), rng, frozenset(s3 + off for off in S3_OFFSETS))
    taken = frozenset([s3 + off for off in S3_OFFSETS] + [other + off for off in range(10)])
    workers = _free_block(host, list(range(RAY_WORKER_PORTS * 4)), rng, taken)  # room for four worker nodes
    return {
        "ONCOSERVE_HOME": str(home),
        "ONCOSERVE_S3_PORT": str(s3),
        "ONCOSERVE_MLFLOW_PORT": str(other),
        "ONCOSERVE_RAY_PORT": str(other + 1),
        "ONCOSERVE_RAY_DASHBOARD_PORT": str(other + 2),
        "ONCOSERVE_RAY_CLIENT_PORT": str(other + 3),
        "ONCOSERVE_RAY_DASHBOARD_AGENT_PORT": str(other + 4),
        "ONCOSERVE_POSTGRES_PORT": str(other + 5),
        "ONCOSERVE_SERVE_HTTP_PORT": str(other + 6),
        "ONCOSERVE_SERVE_GRPC_PORT": str(other + 7),
        "ONCOSERVE_PLATFORM_PORT": str(other + 8),
        "ONCOSERVE_DICOM_PORT": str(other + 9),
        "ONCOSERVE_RAY_WORKER_PORT_BASE": str(workers),
    }


def private_settings(home: Path, **overrides):
    """Settings of a private stack (free ports), without touching the process environment."""
    from oncoserve.settings import Settings

    env = private_stack_env(home)
    fields = {k.removeprefix("ONCOSERVE_").lower(): v for k, v in env.items()}
    return Settings(**{**fields, **overrides})
