"""`--db postgresql`: MLflow's backend store in a PostgreSQL server run from the machine's binaries."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from oncoserve.settings import Settings
from pipelines.stack import EmbeddedStack
from tests.conftest import stack_env

pytestmark = pytest.mark.integration


def test_postgresql_backend_keeps_runs_in_the_database(monkeypatch):
    home = Path(tempfile.mkdtemp(prefix="osp-", dir="/tmp"))
    for key, value in stack_env(home).items():
        monkeypatch.setenv(key, value)
    settings = Settings(db="postgresql")
    stack = EmbeddedStack(settings)
    try:
        parts = {p.name: p for p in stack.up()}
        assert set(parts) == {"postgres", "s3", "ray", "mlflow", "platform"} and all(p.healthy for p in parts.values())
        from oncoserve.credentials import use_mlflow_account

        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(key, raising=False)  # restored with the rest after the test
        assert use_mlflow_account(settings.mlflow_accounts_file, "training")
        client = MlflowClient(settings.mlflow_url)
        run = client.create_run(client.create_experiment("pg"))
        psql = ["psql", "-h", "127.0.0.1", "-p", str(settings.postgres_port), "-U", "oncoserve", "-d", "mlflow", "-w", "-tAc"]
        # Password (SCRAM) authentication: without the home's password file the server refuses.
        refused = subprocess.run([*psql, "select 1"], capture_output=True, text=True, timeout=30,
                                 env={"PATH": "/usr/bin:/bin", "PGPASSFILE": "/dev/null"})  # fmt: skip
        assert refused.returncode != 0 and "password" in refused.stderr, refused.stderr
        env = {"PATH": "/usr/bin:/bin", "PGPASSFILE": str(settings.home / "auth" / "pgpass")}
        count = subprocess.run([*psql, f"select count(*) from runs where run_uuid = '{run.info.run_id}'"],
                               capture_output=True, text=True, timeout=30, env=env)  # fmt: skip
        assert count.stdout.strip() == "1", count.stderr
        # status/down of a stack brought up with postgres know about it without being told again.
        assert "postgres" in {p.name for p in EmbeddedStack(Settings()).status()}
        pg_pid = stack.records()["postgres"].pid
    finally:
        EmbeddedStack(Settings()).down()
        shutil.rmtree(home, ignore_errors=True)
    assert not psutil.pid_exists(pg_pid) or psutil.Process(pg_pid).status() == psutil.STATUS_ZOMBIE
