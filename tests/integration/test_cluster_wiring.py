"""The chart's wiring, run: the rendered MLflow, its accounts Job, the platform API and the DICOM receiver
started from their manifests (command, args, environment with Secrets, volumes, probes) in a private
network namespace where every Service name resolves, then called as other pods and browsers would
(tests/cluster_wiring.py). Reverting a wiring fix makes it fail: the run without MLflow's allowed hosts
is part of the test.

The pipeline RayJob's cluster is started as KubeRay starts it (head and train worker from their
rayStartParams, the worker joining the head by its Service name) and a driver is submitted to it with
`ray job submit`, as KubeRay's submitter does: it must reach the cluster from the pod's own settings
(ONCOSERVE_RAY_CLUSTER=auto, the head on the chart's port). The last test (`make test-cluster`) does what a
user does after `helm install`, every workload a pod of its own: the pipeline job trains four tasks on its
worker pod and promotes `champion` through the platform API, then the RayService's Serve app, deployed from
`serveConfigV2` through the head's dashboard, answers a study through the gateway Service.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster_wiring import job, ray_node, run_in_cluster_namespace, workload
from tests.unit.test_infra import one, render

pytestmark = pytest.mark.integration

VALUES = {"platformApi": {"publicUrl": "http://platform.wiring.test:8600"},
          "serve": {"publicUrl": "http://console.wiring.test:8000"},
          "dicom": {"enabled": True, "allowedAes": ["PACS"]},
          "s3": {"endpoint": "s3.wiring.test:18333", "secure": False, "credentialsSecret": "s3-keys"}}  # fmt: skip
PLATFORM = ("oncoserve-platform", "platform-secret")


def service_names(name: str) -> list[str]:
    """The names a Service answers to from a pod of the release's namespace."""
    return [f"{name}{suffix}" for suffix in ("", ".oncoserve", ".oncoserve.svc", ".oncoserve.svc.cluster.local")]


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
    hosts = [h for d in docs if d["kind"] == "Service" for h in service_names(d["metadata"]["name"])]
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


# What `oncoserve train` and `oncoserve pipeline run` do first (training/jobs.py run_job): check the cluster
# named by the pod's settings answers, then ray.init on it.
RAY_DRIVER = """
import json, time, ray
from oncoserve.settings import Settings
from training.jobs import require_cluster
address = Settings().ray_address
require_cluster(address)
ray.init(address, logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + 90
while time.monotonic() < deadline and sum(n["Alive"] for n in ray.nodes()) < 2:
    time.sleep(0.5)  # the train worker registering with the head
alive = [n for n in ray.nodes() if n["Alive"]]
print("DRIVER " + json.dumps({"address": address, "alive": len(alive), "cpus": ray.cluster_resources().get("CPU", 0)}))
"""


# KubeRay's submitter: the entrypoint through the head's job API, then its status until it ends (by HTTP
# polling: `ray job submit`'s log tailing over a WebSocket closes at once in this namespace).
SUBMITTER = """
import sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
job = client.submit_job(entrypoint=sys.argv[2])
deadline = time.monotonic() + (float(sys.argv[3]) if len(sys.argv) > 3 else 240)
while not (status := client.get_job_status(job)).is_terminal() and time.monotonic() < deadline:
    time.sleep(1)  # polling the job's state, as the submitter does
print(client.get_job_logs(job))
print("JOB", status)
sys.exit(0 if status == JobStatus.SUCCEEDED else 1)
"""


def rayjob_spec(docs: list[dict], values_secrets: dict, worker: bool = True) -> dict:
    rayjob = one(docs, "RayJob", "-pipeline")
    cluster = rayjob["spec"]["rayClusterSpec"]
    head, train = cluster["headGroupSpec"], cluster["workerGroupSpecs"][0]
    head_svc = f"{rayjob['metadata']['name']}-head-svc"  # the head Service KubeRay makes for the job's cluster
    gcs = f"{head_svc}:{head['rayStartParams']['port']}"
    # The worker shares this namespace with the head (pods would each have an IP): its fixed ports move.
    moved = {"metrics-export-port": "8081", "dashboard-agent-listen-port": "52366"}
    return {"hosts": [head_svc, f"{head_svc}.oncoserve.svc.cluster.local"], "steps": [
        ray_node("rayjob-head", head, values_secrets, "http://127.0.0.1:8265/api/gcs_healthz"),
        *([ray_node("rayjob-train-worker", train, values_secrets, None, head_address=gcs, overrides=moved)] if worker else []),
        {"run": {"name": "driver", "env": {},
                 "argv": ["python", "-c", SUBMITTER, f"http://{head_svc}:8265", f"python -c {shlex.quote(RAY_DRIVER)}"]}},
    ]}  # fmt: skip


def without_ray_cluster_setting(docs: list[dict]) -> list[dict]:
    """The chart before the fix: the job's pods do not name their cluster, so the driver aims at the embedded
    stack's default head (127.0.0.1:6380)."""
    docs = copy.deepcopy(docs)
    for group in [one(docs, "RayJob", "-pipeline")["spec"]["rayClusterSpec"]["headGroupSpec"]]:
        container = group["template"]["spec"]["containers"][0]
        container["env"] = [e for e in container["env"] if e["name"] != "ONCOSERVE_RAY_CLUSTER"]
    return docs


@pytest.fixture(scope="module")
def rendered_pipeline(tmp_path_factory):
    result, docs = render({**VALUES, "pipeline": {"enabled": True}}, tmp_path_factory.mktemp("chart-pipeline"))
    assert "error" not in result, result
    return docs


@pytest.mark.cluster  # make test-cluster (a Ray head and worker as processes)
def test_the_pipeline_rayjob_driver_reaches_its_cluster_on_the_charts_port(rendered_pipeline, tmp_path):
    values_secrets, _ = secrets(tmp_path)
    values_secrets |= {"oncoserve-job-token": {"token": "unused-here"}}
    report = by_step(run_in_cluster_namespace(rayjob_spec(rendered_pipeline, values_secrets), tmp_path))
    assert report["start rayjob-head"]["ok"], report["start rayjob-head"]["log"]
    assert report["start rayjob-train-worker"]["ok"], report["start rayjob-train-worker"]["log"]
    driver = report["run driver"]
    assert driver["ok"], driver["log"]
    seen = json.loads(next(line for line in driver["log"].splitlines() if line.startswith("DRIVER {"))[len("DRIVER "):])
    # `auto`: the job's own cluster; the head (no CPUs) and the train worker that joined it by Service name.
    assert seen["address"] == "auto" and seen["alive"] == 2 and seen["cpus"] > 0, seen


@pytest.mark.cluster  # make test-cluster (a Ray head and worker as processes)
def test_without_the_ray_cluster_setting_the_pipeline_driver_fails(rendered_pipeline, tmp_path):
    values_secrets, _ = secrets(tmp_path)
    values_secrets |= {"oncoserve-job-token": {"token": "unused-here"}}
    spec = rayjob_spec(without_ray_cluster_setting(rendered_pipeline), values_secrets, worker=False)
    report = by_step(run_in_cluster_namespace(spec, tmp_path))
    assert report["start rayjob-head"]["ok"]
    driver = report["run driver"]
    assert not driver["ok"] and "no Ray cluster answers at 127.0.0.1:6380" in driver["log"], driver["log"][-1500:]


# -- After `helm install`: the pipeline RayJob trains and promotes, the RayService serves a study ---------
# The cluster's own parts outside the chart stand in as pods too: an S3 server (SeaweedFS, what
# Terraform's buckets are on AWS) on the chart's S3 endpoint. Each Ray node is a pod of its own (an
# address each, so every node keeps the ports the chart gives it).
# One-epoch models: the wiring is under test, not the science (no floors; a latency budget for 2 cores).
STUDY_GATES = """
version = 1
[defaults]
parity_max_abs_diff = 1e-3
latency_budget_ms = 60000
latency_runs = 1
[segmentation]
floors = {}
[localization]
floors = {}
[classification]
floors = {}
[survival]
floors = {}
"""
TASKS = ["localization", "segmentation", "classification", "survival"]
PIPELINE_CONFIG = {"version": 1, "name": "wiring", "tasks": TASKS,
                   "training": {"seed": 1, "workers": 1, "epochs": dict.fromkeys(TASKS, 1)},
                   "compare": {"bootstrap": 50}, "compile": {"max_batch": 8}, "rollout": {"promote": "none"}}  # fmt: skip
# Where this machine differs from a node pod: Ray sizes a node's object store from the memory it sees
# (a pod's limit there, all 24 GiB of this machine here, for each of four nodes).
NODE = {"object-store-memory": str(512 * 2**20)}


def serve_config(docs: list[dict]) -> dict:
    import yaml

    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The chart rendered as an operator installs it for a first promotion (docs/DEPLOY.md): the pipeline
    RayJob promoting to champion, the platform's gates and public key in values, a signing key and the
    Secrets made beforehand, phantom studies on the data volume."""
    from oncoserve.auth import TokenStore
    from oncoserve.signing import Signer

    work = tmp_path_factory.mktemp("installed")
    signer = Signer.load_or_create(work / "signing.key", work / "signing.pub")
    values = {**VALUES, "trust": {"publicKeyPem": signer.public_pem.decode()},
              "platformApi": {**VALUES["platformApi"], "gates": STUDY_GATES},
              "pipeline": {"enabled": True, "promote": "champion", "workers": 1, "config": PIPELINE_CONFIG}}  # fmt: skip
    result, docs = render(values, work / "chart")
    assert "error" not in result, result
    values_secrets, admin = secrets(work)
    store = TokenStore(work / "tokens.json")
    job_token = store.create("pipeline-job", "platform", store.authenticate(admin))
    values_secrets["oncoserve-tokens"]["tokens.json"] = (work / "tokens.json").read_text()
    values_secrets["oncoserve-job-token"] = {"token": job_token}
    synth = subprocess.run([str(Path(sys.executable).parent / "oncoserve"), "data", "synth", "--out", str(work / "data"), "--n", "8", "--seed", "2", "--sites", "2"],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert synth.returncode == 0, synth.stdout[-2000:] + synth.stderr[-2000:]
    return {"docs": docs, "secrets": values_secrets, "admin": admin, "work": work,
            "signing_key": (work / "signing.key").read_text()}  # fmt: skip


def install_spec(installed: dict) -> dict:
    from oncoserve.credentials import S3Credentials
    from oncoserve.settings import Settings
    from pipelines.stack.components import S3Server
    from tests.cluster_wiring import CLAIMS_DIR, config_maps

    docs, values_secrets = installed["docs"], installed["secrets"]
    maps = config_maps(docs)
    name = lambda kind, suffix: one(docs, kind, suffix)["metadata"]["name"]  # noqa: E731
    mlflow_pod = one(docs, "Deployment", "-mlflow")["spec"]["template"]["spec"]
    platform_pod = one(docs, "Deployment", "-platform")["spec"]["template"]["spec"]
    accounts = one(docs, "Job", "-mlflow-accounts")["spec"]["template"]["spec"]["containers"][0]
    rayjob = one(docs, "RayJob", "-pipeline")
    job_cluster = rayjob["spec"]["rayClusterSpec"]
    job_head_svc = f"{rayjob['metadata']['name']}-head-svc"
    rayservice = one(docs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    head_svc = f"{rayservice['metadata']['name']}-head-svc"  # what KubeRay names the RayService head's Service
    gateway = one(docs, "Service", "-gateway")
    gateway_url = f"http://{gateway['metadata']['name']}:{gateway['spec']['ports'][0]['port']}"
    platform_svc = one(docs, "Service", "-platform")
    platform_url = f"http://{platform_svc['metadata']['name']}:{platform_svc['spec']['ports'][0]['port']}"
    port = cluster["headGroupSpec"]["rayStartParams"]["port"]
    bearer = {"authorization": f"Bearer {installed['admin']}"}
    s3 = S3Server(Settings(home=Path("/var/lib/s3"), host="s3.wiring.test", s3_port=18333), S3Credentials("wiring", "wiring-secret"))
    case = sorted(p for p in (installed["work"] / "data").iterdir() if p.is_dir())[0]
    study = {m: [f.name, str(f)] for m in ("t1", "t1ce", "t2", "flair") if (f := case / f"{case.name}_{m}.nii.gz").exists()}
    cpu = cluster["workerGroupSpecs"][0]
    # the operator's data on the pipeline's claim, at the definition's data path
    data_path = rayjob["spec"]["entrypoint"].split("--data ")[1].split()[0]
    data_claim = next(v for v in job_cluster["headGroupSpec"]["template"]["spec"]["volumes"] if v["name"] == "data")
    data_dir = f"{CLAIMS_DIR}/{data_claim['persistentVolumeClaim']['claimName']}{data_path.removeprefix('/data')}"
    platform_claim = next(v for v in platform_pod["volumes"] if v["name"] == "state")["persistentVolumeClaim"]["claimName"]
    return {
        "pods": {"s3": ["s3.wiring.test"], "mlflow": service_names(name("Service", "-mlflow")),
                 "platform": [*service_names(platform_svc["metadata"]["name"]), "platform.wiring.test"],
                 "job-head": service_names(job_head_svc), "job-worker": [],
                 "ray-head": [*service_names(head_svc), *service_names(gateway["metadata"]["name"])],
                 "ray-cpu-0": [], "ray-cpu-1": []},
        "claims": {f"{platform_claim}/platform/signing.key": installed["signing_key"]},
        "steps": [
            {"start": {"name": "s3", "pod": "s3", "argv": s3.command(), "env": s3.env(), "mounts": [], "dirs": [str(s3.data_dir)],
                       "ready": {"tcp": ["s3.wiring.test", 18333]}}},
            workload("mlflow", mlflow_pod, mlflow_pod["containers"][0], values_secrets, "", "mlflow", maps),
            job("mlflow-accounts", accounts, values_secrets),
            *(workload(c["name"], platform_pod, c, values_secrets, "", "platform", maps) for c in platform_pod["containers"]),
            {"run": {"name": "data onto the claim", "env": {}, "argv": ["sh", "-c", f"mkdir -p {data_dir} && cp -r {installed['work']}/data/. {data_dir}/"]}},
            # The pipeline RayJob: its cluster, its entrypoint through the job API, then the cluster deleted.
            ray_node("job-head", job_cluster["headGroupSpec"], values_secrets, "http://job-head:8265/api/gcs_healthz",
                     overrides=NODE, pod_name="job-head", maps=maps),
            ray_node("job-worker", job_cluster["workerGroupSpecs"][0], values_secrets, None, head_address=f"{job_head_svc}:{port}",
                     overrides=NODE, pod_name="job-worker", maps=maps),
            {"run": {"name": "pipeline job", "env": {}, "timeout_s": 1500, "log_chars": 6000,
                     "argv": ["python", "-c", SUBMITTER, f"http://{job_head_svc}:8265", rayjob["spec"]["entrypoint"], "1400"]}},
            {"stop": {"pod": "job-worker"}}, {"stop": {"pod": "job-head"}},
            {"get": {"name": "champions", "url": f"{platform_url}/v1/models", "headers": bearer, "body_chars": 10**8}},
            # The RayService: its cluster, then serveConfigV2 deployed through the head's dashboard, as KubeRay does.
            ray_node("ray-head", cluster["headGroupSpec"], values_secrets, "http://ray-head:8265/api/gcs_healthz",
                     overrides=NODE, pod_name="ray-head", maps=maps, autoscaling=cluster.get("enableInTreeAutoscaling", False)),
            *(ray_node(f"ray-cpu-{i}", cpu, values_secrets, None, head_address=f"{head_svc}:{port}", overrides=NODE,
                       pod_name=f"ray-cpu-{i}", maps=maps) for i in range(cpu["minReplicas"])),
            {"http": {"name": "serve app deployed", "method": "PUT", "url": f"http://{head_svc}:8265/api/serve/applications/",
                      "json": serve_config(docs), "timeout_s": 120}},
            {"http": {"name": "serve app running", "url": f"http://{head_svc}:8265/api/serve/applications/",
                      "until": {"json": [["applications", "oncoserve", "status"], "RUNNING"], "within_s": 900}}},
            {"http": {"name": "study through the gateway Service", "method": "POST", "url": f"{gateway_url}/v1/studies:analyze",
                      "headers": bearer, "files": study, "timeout_s": 600, "body_chars": 10**8}},
            {"get": {"name": "console API on its public URL", "url": "http://platform.wiring.test:8600/v1/models", "headers": bearer}},
        ],
    }  # fmt: skip


@pytest.mark.cluster  # make test-cluster (four tasks trained on a RayJob cluster, the Serve app on a RayService cluster)
def test_after_helm_install_the_pipeline_job_promotes_and_the_rayservice_serves_a_study_by_service_name(installed, tmp_path):
    report = by_step(run_in_cluster_namespace({**install_spec(installed), "start_timeout_s": 240}, tmp_path, timeout_s=3000))
    for step, result in report.items():
        if step.startswith(("start ", "run ")):
            assert result["ok"], (step, result.get("log"))
    assert "JOB SUCCEEDED" in report["run pipeline job"]["log"], report["run pipeline job"]["log"]
    assert report["get champions"]["status"] == 200, report["get champions"]
    versions = json.loads(report["get champions"]["body"])
    champions = {v["task"]: v["version"] for v in versions if "champion" in v["aliases"]}
    assert set(champions) == set(TASKS), versions  # the job's promotion moved each task's champion (platform API)
    deployed = report["put serve app deployed"]
    assert deployed["status"] == 200, deployed
    running = report["get serve app running"]
    assert running["status"] == 200 and '"RUNNING"' in running["body"], running["body"][-3000:]
    answer = report["post study through the gateway Service"]
    assert answer["status"] == 200, answer["body"][-3000:]
    served = json.loads(answer["body"])["findings"]["model_versions"]
    assert {task: served[task] for task in TASKS} == champions  # the RayService serves what the job promoted
    assert report["get console API on its public URL"]["status"] == 200
