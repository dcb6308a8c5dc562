"""Shared fixtures: isolated ONCOSERVE_HOME and free loopback ports for a private embedded stack."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from oncoserve.settings import Settings
from pipelines.stack.ports import private_stack_env


def stack_env(home: Path) -> dict[str, str]:
    """ONCOSERVE_* variables for a private stack: its own home and ports that are free right now."""
    return private_stack_env(home)


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


@contextlib.contextmanager
def compiled_champions(settings, versions: dict[str, str]):
    """Compile the given versions and make them champions; restore the previous aliases afterwards."""
    from oncoserve.object_store import object_store
    from serving.compile import compile_version
    from serving.registry import Registry

    registry, store = Registry(settings.mlflow_url), object_store(settings)
    before = {task: registry.alias(task, "champion") for task in versions}
    for task, version in versions.items():
        compile_version(registry, store, settings.bucket_models, settings.triton_repo_prefix, task, version)
        registry.set_alias(task, "champion", version)
    try:
        yield registry, store
    finally:
        for task, version in before.items():
            registry.set_alias(task, "champion", version) if version else registry.delete_alias(task, "champion")
