"""Shared fixtures: isolated ONCOSERVE_HOME and free loopback ports for a private embedded stack."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import shutil
import tempfile
from pathlib import Path

import pytest

from oncoserve.settings import Settings
from pipelines.stack.process import port_free

HOST = "127.0.0.1"


def _free_block(offsets: list[int], rng: random.Random) -> int:
    for _ in range(500):
        base = rng.randrange(20000, 29000)
        if all(port_free(HOST, base + off) for off in offsets):
            return base
    raise RuntimeError("no free port block found on 127.0.0.1")


def stack_env(home: Path) -> dict[str, str]:
    """ONCOSERVE_* variables for a private stack: its own home and ports that are free right now."""
    rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
    s3 = _free_block([0, 1, 2, 3, 4, 5, 10000, 10001, 10002, 10003, 10005], rng)
    other = _free_block([0, 1, 2, 3, 4, 5, 6], rng)
    return {
        "ONCOSERVE_HOME": str(home),
        "ONCOSERVE_S3_PORT": str(s3),
        "ONCOSERVE_MLFLOW_PORT": str(other),
        "ONCOSERVE_RAY_PORT": str(other + 1),
        "ONCOSERVE_RAY_DASHBOARD_PORT": str(other + 2),
        "ONCOSERVE_RAY_CLIENT_PORT": str(other + 3),
        "ONCOSERVE_RAY_DASHBOARD_AGENT_PORT": str(other + 4),
        "ONCOSERVE_POSTGRES_PORT": str(other + 5),
        "ONCOSERVE_RAY_NUM_CPUS": "2",
    }


@pytest.fixture(scope="module")
def stack_home():
    # Short path on purpose: Ray's unix sockets live under it (108-byte limit).
    home = Path(tempfile.mkdtemp(prefix="osv-", dir="/tmp"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def stack_settings(stack_home):
    """Settings of a private stack, also exported to the environment for CLI subprocesses."""
    env = stack_env(stack_home)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield Settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def live_stack():
    """One private embedded stack shared by the integration tests that only use it (never stop it)."""
    from pipelines.stack import EmbeddedStack

    home = Path(tempfile.mkdtemp(prefix="osl-", dir="/tmp"))
    env = stack_env(home)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    stack = EmbeddedStack(Settings())
    try:
        stack.up()
        settings = Settings()
        # The CLI in tests acts as an admin (the bootstrap token, saved where the CLI looks for it).
        from oncoserve.auth import TokenStore

        admin = TokenStore(settings.tokens_file).create("test-admin", "admin", None)
        (settings.home / "token").write_text(admin)
        yield settings
    finally:
        stack.down()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Eight 2 mm phantom cases (two sites): enough for every task to train for an epoch."""
    from imaging.phantoms import synthesise

    return synthesise(tmp_path_factory.mktemp("data") / "tiny", n=8, seed=2, sites=2)


TASKS = ["localization", "segmentation", "classification", "survival"]


def oncoserve(*args: str, timeout: int = 600, token: str | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess with the current (test stack) environment."""
    exe = str(Path(sys.executable).parent / "oncoserve")
    env = os.environ.copy()
    if token is not None:
        env["ONCOSERVE_TOKEN"] = token
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def trained(live_stack, tiny_dataset):
    """One version per task, trained for one epoch through the CLI (Ray Train -> MLflow)."""
    versions = {}
    for task in TASKS:
        run = oncoserve("train", task, "--data", str(tiny_dataset), "--epochs", "1")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert f"registered model {task} version" in run.stdout
        versions[task] = run.stdout.split(f"registered model {task} version")[-1].split()[0]
    return versions
