"""The embedded stack with its real servers on loopback: lifecycle, persistence and failure paths.

The tests in this module share one private stack and run in order (each leaves it as the next expects).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from oncoserve.object_store import object_store
from pipelines.stack import EmbeddedStack, StackError
from pipelines.stack import process as proc
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

OBJECT_KEY = "tests/persist.txt"
PAYLOAD = b"an object that must survive down/up"
MODEL = "stack-test-model"


def cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "oncoserve"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, env=os.environ.copy())


def stack_pids(stack: EmbeddedStack) -> set[int]:
    pids: set[int] = set()
    for record in stack.records().values():
        pids |= set(proc.session_alive(record))
    return pids


@pytest.fixture(scope="module")
def stack(stack_settings, tmp_path_factory):
    # A user who once ran a local `ray.init()` has ~/.ray/auth_token, which switches `ray start` to token auth
    # unless told otherwise: the stack's Ray must come up and answer all the same.
    user_home = tmp_path_factory.mktemp("user-home")
    (user_home / ".ray").mkdir()
    (user_home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    saved_home = os.environ["HOME"]
    os.environ["HOME"] = str(user_home)
    s = EmbeddedStack(stack_settings)
    try:
        yield s
    finally:
        s.down()
        os.environ["HOME"] = saved_home


@pytest.fixture(scope="module")
def saved(stack):
    """What the first test wrote, for the persistence test to look for."""
    return {}


def test_up_brings_every_component_to_health(stack, stack_settings):
    parts = stack.up()
    assert {p.name for p in parts} == {"s3", "mlflow", "ray", "platform"}
    assert all(p.healthy for p in parts), [(p.name, p.detail) for p in parts]
    creds = stack_settings.credentials_file
    assert creds.stat().st_mode & 0o777 == 0o600
    for p in parts:
        assert Path(p.log).parent == stack_settings.logs_dir and Path(p.log).exists()


def test_the_demo_uses_the_accounts_its_own_stack_up_created(stack, stack_settings, monkeypatch):
    """`oncoserve demo` starts before the stack exists (a fresh home has no accounts yet): once its stack is
    up it must talk to MLflow as the training account, not anonymously (it did, and every train step got 401)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines.demo import use_stack_accounts

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    client = MlflowClient(stack_settings.mlflow_url)
    with pytest.raises(MlflowException, match="401|not authenticated"):
        client.search_registered_models(max_results=1)
    use_stack_accounts(stack_settings)
    assert client.search_registered_models(max_results=1) is not None


def test_second_up_starts_nothing_new(stack):
    before = {n: r.pid for n, r in stack.records().items()}
    stack.up()
    assert {n: r.pid for n, r in stack.records().items()} == before


def test_status_cli_reports_healthy_json(stack):
    result = cli("stack", "status", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["healthy"] is True
    assert set(doc["components"]) == {"s3", "mlflow", "ray", "platform"}


def test_servers_bind_loopback_only(stack, stack_settings):
    s = stack_settings
    for port in (s.s3_port, s.mlflow_port):
        conns = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
        assert conns and all(c.laddr.ip == "127.0.0.1" for c in conns), conns


def test_mlflow_needs_an_account_and_the_reader_cannot_write(stack, stack_settings):
    """MLflow runs its basic-auth app: no credentials is 401; the read-only account reads, and cannot
    change what another account made (MLflow lets any account create new models, which it then owns)."""
    import requests

    accounts = json.loads(stack_settings.mlflow_accounts_file.read_text())
    assert stack_settings.mlflow_accounts_file.stat().st_mode & 0o777 == 0o600
    api = f"{stack_settings.mlflow_url}/api/2.0/mlflow"
    anonymous = requests.get(f"{api}/experiments/search", params={"max_results": 1}, timeout=10)
    assert anonymous.status_code == 401
    assert requests.get(f"{stack_settings.mlflow_url}/", timeout=10).status_code == 401  # the UI too
    reader = (accounts["reader"]["username"], accounts["reader"]["password"])
    assert requests.get(f"{api}/experiments/search", params={"max_results": 1}, auth=reader, timeout=10).status_code == 200
    training = (accounts["training"]["username"], accounts["training"]["password"])
    assert requests.post(f"{api}/registered-models/create", json={"name": "acl-test"}, auth=training, timeout=10).status_code == 200
    for path, body in (("registered-models/alias", {"name": "acl-test", "alias": "champion", "version": "1"}),
                       ("registered-models/set-tag", {"name": "acl-test", "key": "k", "value": "v"})):  # fmt: skip
        assert requests.post(f"{api}/{path}", json=body, auth=reader, timeout=10).status_code == 403, path
    assert requests.get(f"{api}/registered-models/get", params={"name": "acl-test"}, auth=reader, timeout=10).status_code == 200
    wrong = requests.get(f"{api}/experiments/search", params={"max_results": 1}, auth=(reader[0], "guess"), timeout=10)
    assert wrong.status_code == 401


def test_s3_mlflow_ray_round_trips(stack, stack_settings, saved):
    from oncoserve.credentials import use_mlflow_account

    s = stack_settings
    assert use_mlflow_account(s.mlflow_accounts_file, "training")  # what a training job does
    store = object_store(s)
    store.put_object(s.bucket_data, OBJECT_KEY, io.BytesIO(PAYLOAD), len(PAYLOAD))
    assert store.get_object(s.bucket_data, OBJECT_KEY).read() == PAYLOAD

    client = MlflowClient(tracking_uri=s.mlflow_url)
    exp_id = client.create_experiment("stack-test")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "dice_wt", 0.91)
    client.log_text(run.info.run_id, "weights would go here", "model/README.txt")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(MODEL)
    mv = client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(MODEL, "champion", mv.version)
    saved.update(run_id=run.info.run_id, version=mv.version)

    # The run's artifact went through the MLflow server into the stack's S3 bucket.
    keys = [o.object_name for o in store.list_objects(s.bucket_artifacts, prefix="mlflow/", recursive=True)]
    assert any(k.endswith("model/README.txt") for k in keys), keys

    import ray

    ray.init(address=s.ray_address, logging_level="ERROR", log_to_driver=False)
    try:
        assert ray.get(ray.remote(lambda x: x + 1).remote(41)) == 42
    finally:
        ray.shutdown()


def test_down_leaves_no_stack_process(stack):
    records = stack.records()
    assert set(records) == {"s3", "mlflow", "ray", "platform"}
    pids = stack_pids(stack)
    assert pids
    stack.down()
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    assert stack.records() == {}
    status = cli("stack", "status")
    assert status.returncode == 1


def test_data_survives_down_and_up(stack, stack_settings, saved):
    s = stack_settings
    assert all(p.healthy for p in stack.up())
    assert object_store(s).get_object(s.bucket_data, OBJECT_KEY).read() == PAYLOAD
    client = MlflowClient(tracking_uri=s.mlflow_url)
    assert client.get_run(saved["run_id"]).data.metrics["dice_wt"] == pytest.approx(0.91)
    assert client.get_model_version_by_alias(MODEL, "champion").version == saved["version"]


def test_killed_component_is_reported_then_restarted_with_data(stack, stack_settings, saved):
    record = stack.records()["mlflow"]
    os.killpg(record.pid, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(record.pid)], timeout=10)
    status = cli("stack", "status", "--json")
    assert status.returncode == 1
    doc = json.loads(status.stdout)
    assert doc["healthy"] is False
    assert doc["components"]["mlflow"]["healthy"] is False
    assert doc["components"]["s3"]["healthy"] is True

    parts = {p.name: p for p in stack.up()}
    assert parts["mlflow"].healthy and parts["mlflow"].pid != record.pid
    client = MlflowClient(tracking_uri=stack_settings.mlflow_url)
    assert client.get_model_version_by_alias(MODEL, "champion").version == saved["version"]


def test_port_in_use_names_the_component(stack, stack_settings):
    stack.down()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the old server's TIME_WAITs
    blocker.bind(("127.0.0.1", stack_settings.mlflow_port))
    blocker.listen()
    try:
        with pytest.raises(StackError) as err:
            stack.up()
        message = str(err.value)
        assert message.startswith("mlflow:")
        assert str(stack_settings.mlflow_port) in message and "mlflow.log" in message

        result = cli("stack", "up")
        assert result.returncode == 1
        assert "mlflow" in result.stderr and "already in use" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    finally:
        blocker.close()
        stack.down()
    assert stack_pids(stack) == set()


def test_racing_up_and_down_never_orphan_a_process(stack_settings):
    """`stack up` and `stack down` at once on one home: one waits for the other (a lock), so whatever
    runs afterwards is recorded, and the next `down` stops it all."""
    env = os.environ.copy()
    exe = str(Path(sys.executable).parent / "oncoserve")
    up = subprocess.Popen([exe, "stack", "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_until(lambda: (stack_settings.home / "stack.json").exists(), timeout_s=120)  # up is under way
    down = subprocess.run([exe, "stack", "down"], env=env, capture_output=True, text=True, timeout=600)
    up.communicate(timeout=600)
    assert down.returncode == 0, down.stdout + down.stderr
    final = subprocess.run([exe, "stack", "down"], env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    home = stack_settings.home.resolve()
    left = [p.pid for p in psutil.process_iter(["cwd"]) if p.info["cwd"] and Path(p.info["cwd"]) == home]
    assert left == [], [" ".join(psutil.Process(p).cmdline())[:100] for p in left if psutil.pid_exists(p)]
