"""A multi-node Ray cluster on one machine: `oncoserve stack up --workers N` adds worker nodes to the shared
stack's head, Ray Train spreads its workers over two nodes, Serve places replicas on worker nodes, and a
killed worker node's replicas are replaced on the survivors while studies keep being answered (a request
lost with its replica is a 503 that says to retry, the documented behaviour; its retry succeeds).

Runs on the session's shared stack and served champions, after every other test (tests/conftest.py
RUN_LAST): it stops its worker nodes when it ends but leaves its own Serve config deployed.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import psutil
import pytest
from mlflow import MlflowClient
from ray.util.state import list_actors

from pipelines.stack import EmbeddedStack
from tests.conftest import TASKS, auth_headers, oncoserve
from tests.helpers import study_files, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.cluster]  # make test-cluster

WORKERS = 3
# Two segmentation replicas, each on a worker node of its own (the custom resource, one per node: Serve's
# spreading alone is best effort, and once put both on one node here); the third worker takes the replica of
# a lost one. 4 CPUs per worker leave room for the other deployments' replicas that Serve spreads there.
MULTINODE_CONFIG = """
application: oncoserve
watch_interval_s: 2.0
deployments:
  gateway: {num_cpus: 0.1, max_ongoing_requests: 32, autoscaling: {min_replicas: 1, max_replicas: 1}}
  localization: {autoscaling: {min_replicas: 1, max_replicas: 1}}
  segmentation: {resources: {oncoserve_worker: 0.5}, max_replicas_per_node: 1, autoscaling: {min_replicas: 2, max_replicas: 2}}
  classification: {autoscaling: {min_replicas: 1, max_replicas: 1}}
  survival: {autoscaling: {min_replicas: 1, max_replicas: 1}}
  reporting: {num_cpus: 0.1, autoscaling: {min_replicas: 1, max_replicas: 1}}
"""
RETRIES = 5  # a client's retries of one study after a 503 "retry" (the documented answer to a lost replica)


def nodes(settings) -> list[dict]:
    """The cluster's live nodes as the head's GCS sees them (through the dashboard's state API)."""
    url = f"http://127.0.0.1:{settings.ray_dashboard_port}/api/v0/nodes?limit=100"
    return [n for n in httpx.get(url, timeout=10).json()["data"]["result"]["result"] if n["state"] == "ALIVE"]


def replica_nodes(settings, deployment: str) -> dict[int, str]:
    """pid -> node id of the deployment's live replicas."""
    actors = list_actors(address=f"http://127.0.0.1:{settings.ray_dashboard_port}",
                         filters=[("class_name", "=", f"ServeReplica:oncoserve:{deployment}"), ("state", "=", "ALIVE")])  # fmt: skip
    return {a.pid: a.node_id for a in actors}


@pytest.fixture(scope="module")
def cluster(served, trained, tiny_dataset, tmp_path_factory):
    settings = served["settings"]
    config = tmp_path_factory.mktemp("multinode") / "deployments.yaml"
    config.write_text(MULTINODE_CONFIG)
    os.environ["ONCOSERVE_RAY_WORKER_CPUS"] = "4"
    try:
        up = oncoserve("stack", "up", "--workers", str(WORKERS))
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield {"settings": settings, "config": config, "dataset": tiny_dataset, "url": settings.serve_url,
               "auth": auth_headers(settings), "versions": {**{t: trained[t] for t in TASKS}, "reporting": served["reporting"]},
               "files": study_files(sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[0])}  # fmt: skip
    finally:
        os.environ.pop("ONCOSERVE_RAY_WORKER_CPUS", None)
        down = oncoserve("stack", "up", "--workers", "0")  # worker nodes stopped, the rest kept
        assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
        assert not any(name.startswith("ray-worker-") for name in EmbeddedStack(settings).records())
        assert wait_until(lambda: [n["is_head_node"] for n in nodes(settings)] == [True], timeout_s=60, interval_s=0.5)


def test_worker_nodes_join_the_head_and_training_spreads_over_two_nodes(cluster):
    settings = cluster["settings"]
    status = json.loads(oncoserve("stack", "status", "--json").stdout)
    workers = {name: part for name, part in status["components"].items() if name.startswith("ray-worker-")}
    assert sorted(workers) == [f"ray-worker-{i}" for i in range(1, WORKERS + 1)] and all(p["healthy"] for p in workers.values()), workers
    alive = nodes(settings)
    head = [n["node_id"] for n in alive if n["is_head_node"]]
    worker_nodes = {n["node_id"] for n in alive if "oncoserve_worker" in n["resources_total"]}
    assert len(head) == 1 and len(worker_nodes) == WORKERS and len(alive) == WORKERS + 1
    assert all(n["resources_total"]["CPU"] == 4 for n in alive if n["node_id"] in worker_nodes)
    # More one-per-node workers than nodes is refused at once (Ray would wait for them forever).
    refused = oncoserve("train", "localization", "--data", str(cluster["dataset"]), "--epochs", "1", "--workers", str(WORKERS + 2),
                        "--placement", "strict-spread")  # fmt: skip
    assert refused.returncode == 1 and f"needs {WORKERS + 2} Ray nodes" in refused.stdout + refused.stderr, refused.stdout[-2000:]
    # Ray Train with one worker on each of two nodes, recorded on the MLflow run.
    run = oncoserve("train", "localization", "--data", str(cluster["dataset"]), "--epochs", "1", "--workers", "2",
                    "--placement", "strict-spread")  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    version = run.stdout.split("registered model localization version")[-1].split()[0]
    client = MlflowClient(settings.mlflow_url)
    run_id = client.get_model_version("localization", version).run_id
    placed = json.loads(client.get_run(run_id).data.tags["ray_train_nodes"])
    assert len(placed) == 2 and len(set(placed)) == 2 and set(placed) <= {n["node_id"] for n in alive}, placed
    assert client.get_run(run_id).data.params["placement"] == "STRICT_SPREAD"


def test_replicas_on_a_killed_worker_node_are_replaced_on_the_others(cluster):
    settings = cluster["settings"]
    up = oncoserve("serve", "up", "--config", str(cluster["config"]))
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    worker_node = {n["node_id"]: n for n in nodes(settings) if "oncoserve_worker" in n["resources_total"]}
    # Two segmentation replicas, on two different worker nodes.
    assert wait_until(lambda: len(replica_nodes(settings, "segmentation")) == 2, timeout_s=180, interval_s=0.5)
    placed = replica_nodes(settings, "segmentation")
    assert len(set(placed.values())) == 2 and set(placed.values()) <= set(worker_node), placed
    # Kill a worker node (its `ray start`, raylet and replicas: a node lost) that does not hold the gateway.
    gateway_node = set(replica_nodes(settings, "gateway").values())
    records = EmbeddedStack(settings).records()
    victim = next(name for name in records if name.startswith("ray-worker-") and
                  _node_of(records[name].pid, placed) not in gateway_node | {None})  # fmt: skip
    victim_node = _node_of(records[victim].pid, placed)
    outcomes: list[tuple[int, int, str]] = []  # (study, status, error)
    stop = threading.Event()

    def client():
        with httpx.Client(timeout=180) as http:
            for study in range(40):  # bounded
                if stop.is_set():
                    return
                for _ in range(RETRIES):
                    r = http.post(f"{cluster['url']}/v1/studies:analyze", headers=cluster["auth"], files=cluster["files"])
                    outcomes.append((study, r.status_code, r.text[:300] if r.status_code != 200 else ""))
                    if r.status_code != 503:
                        break

    sender = threading.Thread(target=client)
    sender.start()
    try:
        assert wait_until(lambda: len(outcomes) >= 2, timeout_s=180, interval_s=0.1)
        process = psutil.Process(records[victim].pid)
        for proc in [*process.children(recursive=True), process]:
            proc.send_signal(signal.SIGKILL)
        assert wait_until(lambda: victim_node not in {n["node_id"] for n in nodes(settings)}, timeout_s=120, interval_s=0.5)

        def replaced() -> bool:
            now = replica_nodes(settings, "segmentation")
            return len(set(now.values())) == 2 and victim_node not in now.values()

        assert wait_until(replaced, timeout_s=180, interval_s=0.5), "Serve did not replace the lost node's replica"
        during = len(outcomes)
        assert wait_until(lambda: len(outcomes) >= during + 3, timeout_s=240, interval_s=0.2)
    finally:
        stop.set()
        sender.join()
    # The replicas now on the two surviving worker nodes; every study was answered, a lost one after its retry.
    assert set(replica_nodes(settings, "segmentation").values()) == set(worker_node) - {victim_node}
    for status, text in ((s, t) for _, s, t in outcomes):
        assert status == 200 or (status == 503 and "retry" in json.loads(text)["error"]), (status, text)
    answered = {study for study, status, _ in outcomes if status == 200}
    assert answered == {study for study, _, _ in outcomes}, outcomes
    after = httpx.post(f"{cluster['url']}/v1/studies:analyze", headers=cluster["auth"], files=cluster["files"], timeout=180)
    assert after.status_code == 200 and after.json()["findings"]["model_versions"]["segmentation"] == cluster["versions"]["segmentation"]
    # The stack reports the lost node, and `stack up` brings it back into the cluster.
    status = json.loads(oncoserve("stack", "status", "--json").stdout)
    assert not status["components"][victim]["running"]
    again = oncoserve("stack", "up")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert len(nodes(settings)) == WORKERS + 1


def _node_of(start_pid: int, placed: dict[int, str]) -> str | None:
    """The node id of a worker node's `ray start` process: that of a replica among its descendants."""
    children = {p.pid for p in psutil.Process(start_pid).children(recursive=True)}
    return next((node for pid, node in placed.items() if pid in children), None)
