"""Faults under serving: a Serve replica killed mid-load, S3 stopped, MLflow stopped, the whole stack
restarted. Serving must go on from the models it has loaded; registry work must fail in seconds with
one clear line; nothing may be lost. (The Triton backend down is in test_serving.py.)

They run on the session's shared stack and its served champions (training four more models on a stack
of their own cost about six minutes): each test brings every component back and checks it healthy, and
the module redeploys the session's Serve config when it ends.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import psutil
import pytest
from ray.util.state import list_actors

from pipelines.stack import EmbeddedStack
from tests.conftest import SERVE_TEST_CONFIG, TASKS, auth_headers, oncoserve
from tests.helpers import study_files, wait_until

pytestmark = pytest.mark.integration

# One replica of everything: a killed replica has no sibling to hide behind.
FAULT_CONFIG = """
application: oncoserve
watch_interval_s: 2.0
deployments:
  gateway: {num_cpus: 0.1, max_ongoing_requests: 32, autoscaling: {min_replicas: 1, max_replicas: 1}}
  localization: {autoscaling: {min_replicas: 1, max_replicas: 1}}
  segmentation: {autoscaling: {min_replicas: 1, max_replicas: 1}}
  classification: {autoscaling: {min_replicas: 1, max_replicas: 1}}
  survival: {autoscaling: {min_replicas: 1, max_replicas: 1}}
  reporting: {num_cpus: 0.1, autoscaling: {min_replicas: 1, max_replicas: 1}}
"""
CLI_FAILS_WITHIN_S = 60  # MLflow's own retries would take about four minutes; the CLI shortens them


@pytest.fixture(scope="module")
def stack(served, trained, tiny_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    config, restore = folder / "deployments.yaml", folder / "served.yaml"
    config.write_text(FAULT_CONFIG)
    restore.write_text(SERVE_TEST_CONFIG)
    settings = served["settings"]
    up = oncoserve("serve", "up", "--config", str(config))
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    versions = {**{t: trained[t] for t in TASKS}, "reporting": served["reporting"]}
    try:
        yield {"settings": settings, "versions": versions, "url": settings.serve_url, "config": config,
               "auth": auth_headers(settings),
               "files": study_files(sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[0])}  # fmt: skip
    finally:
        assert all(part.healthy for part in EmbeddedStack(settings).up())
        back = oncoserve("serve", "up", "--config", str(restore))  # the session's Serve config again
        assert back.returncode == 0, back.stdout[-2000:] + back.stderr[-2000:]


def analyse(stack, timeout: float = 180) -> httpx.Response:
    return httpx.post(f"{stack['url']}/v1/studies:analyze", headers=stack["auth"], files=stack["files"], timeout=timeout)


def kill_component(settings, name: str) -> None:
    record = EmbeddedStack(settings).records()[name]
    os.killpg(record.pid, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(record.pid)], timeout=10)


def registry_actions() -> list[dict]:
    """The audit log without its analysis lines (every study analysed is audited too)."""
    return [e for e in json.loads(oncoserve("models", "audit", "--json").stdout) if e["action"] != "analyze"]


def segmentation_replica_pids(settings) -> set[int]:
    actors = list_actors(address=f"http://127.0.0.1:{settings.ray_dashboard_port}",
                         filters=[("class_name", "=", "ServeReplica:oncoserve:segmentation"), ("state", "=", "ALIVE")])  # fmt: skip
    return {a.pid for a in actors}


def test_killed_replica_is_replaced_and_requests_recover(stack):
    settings = stack["settings"]
    assert analyse(stack).status_code == 200  # warm
    # One replica (the redeploy may still be draining the session config's second one).
    assert wait_until(lambda: len(segmentation_replica_pids(settings)) == 1, timeout_s=120, interval_s=0.5)
    old = segmentation_replica_pids(settings)
    outcomes: list[tuple[int, str]] = []
    stop = threading.Event()

    def client():
        with httpx.Client(timeout=180) as http:
            for _ in range(60):  # bounded
                if stop.is_set():
                    return
                r = http.post(f"{stack['url']}/v1/studies:analyze", headers=stack["auth"], files=stack["files"])
                outcomes.append((r.status_code, r.text[:300] if r.status_code != 200 else ""))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for t in clients:
        t.start()
    try:
        assert wait_until(lambda: len(outcomes) >= 3, timeout_s=120, interval_s=0.1)
        killed = old.pop()
        os.kill(killed, signal.SIGKILL)

        def replaced_once() -> bool:
            pids = segmentation_replica_pids(settings)
            return len(pids) == 1 and killed not in pids

        replaced = wait_until(replaced_once, timeout_s=120, interval_s=0.5)
        assert replaced, "Serve did not start a new segmentation replica"
        during = len(outcomes)
        assert wait_until(lambda: len(outcomes) >= during + 6, timeout_s=180, interval_s=0.2)
    finally:
        stop.set()
        for t in clients:
            t.join()
    # In the window a request may have been lost with the replica: then it is a 503 that says so.
    for status, text in outcomes:
        assert status == 200 or (status == 503 and "replica was lost" in json.loads(text)["error"]), (status, text)
    assert all(status == 200 for status, _ in outcomes[during + 3:]), "requests still fail after the replacement"
    after = analyse(stack)
    assert after.status_code == 200 and after.json()["findings"]["model_versions"] == stack["versions"]


def test_s3_stopped_serving_goes_on_and_registry_writes_fail_clearly(stack):
    settings = stack["settings"]
    kill_component(settings, "s3")
    try:
        served = analyse(stack)
        assert served.status_code == 200, served.text
        assert served.json()["findings"]["model_versions"] == stack["versions"]
        uri = httpx.post(f"{stack['url']}/v1/studies:analyze", headers=stack["auth"], json={"s3_uri": f"s3://{settings.bucket_data}/x/"}, timeout=60)
        assert uri.status_code == 503 and "object store unavailable" in uri.json()["error"]
        write = oncoserve("reporting", "register", timeout=CLI_FAILS_WITHIN_S)
        assert write.returncode == 1
        assert "artifact store behind the registry failed" in write.stderr and "Traceback" not in write.stderr
    finally:
        assert all(part.healthy for part in EmbeddedStack(settings).up())
    assert analyse(stack).status_code == 200


def test_mlflow_stopped_serving_goes_on_and_promotion_fails_clearly(stack):
    settings = stack["settings"]
    audit_before = registry_actions()
    kill_component(settings, "mlflow")
    try:
        for _ in range(2):  # the replicas' alias watchers poll a registry that is gone
            served = analyse(stack)
            assert served.status_code == 200, served.text
        promote = oncoserve("models", "promote", "localization", stack["versions"]["localization"], "--to", "candidate",
                            timeout=CLI_FAILS_WITHIN_S)  # fmt: skip
        assert promote.returncode == 1
        assert settings.mlflow_url.split("//")[1] in promote.stderr and "Traceback" not in promote.stderr
    finally:
        assert all(part.healthy for part in EmbeddedStack(settings).up())
    assert registry_actions() == audit_before  # nothing half-done recorded
    served = analyse(stack)
    assert served.status_code == 200 and served.json()["findings"]["model_versions"] == stack["versions"]


def test_whole_stack_restart_keeps_registry_aliases_and_audit(stack, tiny_dataset):
    settings = stack["settings"]
    listed = json.loads(oncoserve("models", "list", "--json").stdout)
    # A job submitted while serving is down waits for it, through a whole stack restart, and completes.
    assert oncoserve("serve", "down").returncode == 0
    case = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[2]
    submitted = oncoserve("jobs", "submit", str(case))
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    job_id = submitted.stdout.split()[1]
    assert wait_until(lambda: "retrying in" in json.loads(oncoserve("jobs", "show", job_id).stdout)["detail"], timeout_s=60)
    audit = json.loads(oncoserve("models", "audit", "--json").stdout)
    assert any(entry["action"] == "promote" for entry in audit)
    down = oncoserve("stack", "down")
    assert down.returncode == 0, down.stderr[-2000:]
    with pytest.raises(httpx.ConnectError):  # serving went down with Ray
        httpx.get(f"{settings.serve_url}/healthz", timeout=5)
    up = oncoserve("stack", "up")
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    assert json.loads(oncoserve("models", "list", "--json").stdout) == listed
    assert json.loads(oncoserve("models", "audit", "--json").stdout) == audit
    serve = oncoserve("serve", "up", "--config", str(stack["config"]))
    assert serve.returncode == 0, serve.stdout[-2000:] + serve.stderr[-2000:]
    served = analyse(stack)
    assert served.status_code == 200 and served.json()["findings"]["model_versions"] == stack["versions"]
    waited = oncoserve("jobs", "wait", job_id, "--timeout", "300")
    assert waited.returncode == 0 and "completed" in waited.stdout, waited.stdout[-2000:] + waited.stderr[-2000:]
