"""The chart's wiring, run: the rendered MLflow, its accounts Job, the platform API and the DICOM receiver
started from their manifests (command, args, environment with Secrets, volumes, probes) in a private
network namespace where every Service name resolves, then called as other pods and browsers would
(tests/cluster_wiring.py). Reverting a wiring fix makes it fail: the run without MLflow's allowed hosts
is part of the test.

Not covered here yet (issue 24): the RayService and RayJobs (Ray head on the chart's port, the pipeline
job training and promoting, a study through the gateway Service) and the container image.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cluster_wiring import job, run_in_cluster_namespace, workload
from tests.unit.test_infra import one, render

pytestmark = pytest.mark.integration

VALUES = {"platformApi": {"publicUrl": "http://platform.wiring.test:8600"},
          "serve": {"publicUrl": "http://console.wiring.test:8000"},
          "dicom": {"enabled": True, "allowedAes": ["PACS"]},
          "s3": {"endpoint": "s3.wiring.test:18333", "secure": False, "credentialsSecret": "s3-keys"}}  # fmt: skip
PLATFORM = ("oncoserve-platform", "platform-secret")


def secrets(tmp_path: Path) -> tuple[dict[str, dict[str, str]], str]:
    """The Secrets an operator creates before `helm install` (docs/DEPLOY.md step 4), and the admin token."""
    from oncoserve.auth import TokenStore

    store = TokenStore(tmp_path / "tokens.json")
    admin = store.create("first-admin", "admin", None)
    return {
        "oncoserve-mlflow-db": {"uri": "sqlite:////var/lib/wiring-home/mlflow.db"},
        "oncoserve-mlflow-auth": {"platform-username": PLATFORM[0], "platform-password": PLATFORM[1],
                                  "training-username": "oncoserve-training", "training-password": "training-secret",
                                  "reader-username": "oncoserve-reader", "reader-password": "reader-secret",
                                  "flask-secret-key": "wiring-flask-key", "auth-database-uri": "sqlite:////var/lib/wiring-home/auth.db"},
        "oncoserve-deid": {"salt": "0123456789abcdef0123456789abcdef"},
        "s3-keys": {"AWS_ACCESS_KEY_ID": "wiring", "AWS_SECRET_ACCESS_KEY": "wiring-secret"},
        "oncoserve-tokens": {"tokens.json": (tmp_path / "tokens.json").read_text()},
    }, admin  # fmt: skip


def spec(docs: list[dict], values_secrets: dict, admin: str) -> dict:
    services = [d["metadata"]["name"] for d in docs if d["kind"] == "Service"]
    hosts = [f"{n}{suffix}" for n in services for suffix in ("", ".oncoserve", ".oncoserve.svc", ".oncoserve.svc.cluster.local")]
    mlflow_pod = one(docs, "Deployment", "-mlflow")["spec"]["template"]["spec"]
    platform_pod = one(docs, "Deployment", "-platform")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in platform_pod["containers"]}
    accounts = one(docs, "Job", "-mlflow-accounts")["spec"]["template"]["spec"]["containers"][0]
    mlflow_svc, platform_svc = one(docs, "Service", "-mlflow"), one(docs, "Service", "-platform")
    mlflow_url = f"http://{mlflow_svc['metadata']['name']}:{mlflow_svc['spec']['ports'][0]['port']}"
    platform_url = f"http://{platform_svc['metadata']['name']}:{platform_svc['spec']['ports'][0]['port']}"
    bearer = {"authorization": f"Bearer {admin}"}
    return {"hosts": [*hosts, "platform.wiring.test", "console.wiring.test", "s3.wiring.test"], "steps": [
        workload("mlflow", mlflow_pod, mlflow_pod["containers"][0], values_secrets, "127.0.0.1"),
        {"get": {"name": "mlflow by its Service name", "url": f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1", "auth": PLATFORM}},
        job("mlflow-accounts", accounts, values_secrets),
        workload("platform-api", platform_pod, containers["platform-api"], values_secrets, "127.0.0.1"),
        workload("dicom-receiver", platform_pod, containers["dicom-receiver"], values_secrets, "127.0.0.1"),
        {"get": {"name": "platform health by its Service name", "url": f"{platform_url}/healthz"}},
        {"get": {"name": "registry through the platform API", "url": f"{platform_url}/v1/models", "headers": bearer}},
        {"get": {"name": "whoami on the public URL", "url": "http://platform.wiring.test:8600/v1/whoami", "headers": bearer}},
        {"get": {"name": "CORS from the console's origin", "url": "http://platform.wiring.test:8600/v1/platform",
                 "headers": {"origin": "http://console.wiring.test:8000"}}},
    ]}  # fmt: skip


def without_allowed_hosts(docs: list[dict]) -> list[dict]:
    """The chart before the fix: MLflow started with its default Host allow-list."""
    docs = copy.deepcopy(docs)
    container = one(docs, "Deployment", "-mlflow")["spec"]["template"]["spec"]["containers"][0]
    script = container["args"][0]  # a shell script: cut the option out of the text, quoting untouched
    stripped = re.sub(r"\s*--allowed-hosts '[^']*'", "", script)
    assert stripped != script
    container["args"][0] = stripped
    return docs


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.fail("the wiring test needs `unshare --net` (util-linux, as root): network namespaces are how it isolates the chart's ports")
    result, docs = render(VALUES, tmp_path_factory.mktemp("chart"))
    assert "error" not in result, result
    return docs


def by_step(report: dict) -> dict[str, dict]:
    return {r["step"]: r for r in report["steps"]}


def test_the_platform_api_mlflow_and_receiver_come_up_and_answer_by_their_service_names(rendered, tmp_path):
    values_secrets, admin = secrets(tmp_path)
    report = by_step(run_in_cluster_namespace(spec(rendered, values_secrets, admin), tmp_path))
    for name in ("start mlflow", "run mlflow-accounts", "start platform-api", "start dicom-receiver"):
        assert report[name]["ok"], (name, report[name].get("log"))
    assert report["get mlflow by its Service name"]["status"] == 200, report["get mlflow by its Service name"]
    assert report["get platform health by its Service name"]["status"] == 200
    models = report["get registry through the platform API"]
    assert models["status"] == 200 and models["body"].startswith("["), models  # the platform reached MLflow by name
    whoami = report["get whoami on the public URL"]
    assert whoami["status"] == 200 and '"role":"admin"' in whoami["body"].replace(" ", ""), whoami
    # Browsers on the console's public origin may call the platform API; the header names that origin only.
    cors = report["get CORS from the console's origin"]
    assert cors["status"] == 200 and cors["headers"].get("access-control-allow-origin") == "http://console.wiring.test:8000"


def test_without_mlflow_allowed_hosts_the_accounts_job_and_the_registry_fail(rendered, tmp_path):
    """The defect the fix removes: /health green, every API call by Service name refused (403)."""
    values_secrets, admin = secrets(tmp_path)
    report = by_step(run_in_cluster_namespace(spec(without_allowed_hosts(rendered), values_secrets, admin), tmp_path))
    assert report["start mlflow"]["ok"]  # the probe is green ...
    assert report["get mlflow by its Service name"]["status"] == 403  # ... the API is not
    assert not report["run mlflow-accounts"]["ok"] and "403" in report["run mlflow-accounts"]["log"]
    assert report["get registry through the platform API"]["status"] != 200
