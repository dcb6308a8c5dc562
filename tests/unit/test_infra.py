"""Offline validation of infra/: the Helm chart (Helm SDK render + lint + schema, kubernetes-validate
--strict, checkov) and Terraform (fmt, checkov). The tools live in `.venv-infra` (make test builds it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services import deploy_config
from services.app import serve_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "infra" / "helm" / "oncoserve"
TERRAFORM = ROOT / "infra" / "terraform"
INFRA_BIN = ROOT / ".venv-infra" / "bin"
GPU_VALUES = {"triton": {"enabled": True}, "ray": {"gpuWorkers": {"enabled": True}}, "serve": {"modelBackend": "triton"},
              "training": {"enabled": True, "gpu": True}, "pipeline": {"enabled": True, "gpu": True, "promote": "champion"}}  # fmt: skip
KSERVE_VALUES = {"triton": {"enabled": True, "mode": "kserve"}}
CORE_KINDS = {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "ConfigMap", "ServiceAccount"}


def render(values: dict, out: Path) -> tuple[dict, list[dict]]:
    run = subprocess.run([str(INFRA_BIN / "python"), str(ROOT / "tests/external/render_chart.py"), str(CHART), json.dumps(values), str(out)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((out / "_result.json").read_text())
    docs = [d for f in sorted(out.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return result, docs


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = {}
    for name, values in {"default": {}, "gpu": GPU_VALUES, "kserve": KSERVE_VALUES}.items():
        result, docs = render(values, tmp_path_factory.mktemp(name))
        assert "error" not in result, result
        out[name] = (result, docs, tmp_path_factory.getbasetemp() / name)
    return out


def kinds(docs) -> list[str]:
    return [d["kind"] for d in docs]


def one(docs, kind: str, suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{kind} *{suffix}: {len(found)} found"
    return found[0]


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec inside a rendered object (Deployments, and KubeRay's head/worker/submitter templates)."""
    spec = doc.get("spec", {})
    if doc["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    if doc["kind"] == "RayService":
        cluster = spec["rayClusterConfig"]
    elif doc["kind"] == "RayJob":
        cluster = spec["rayClusterSpec"]
        return [spec["submitterPodTemplate"]["spec"], cluster["headGroupSpec"]["template"]["spec"],
                *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]  # fmt: skip
    else:
        return []
    return [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]


def test_chart_lints_clean_and_renders_the_expected_objects(rendered):
    for name, (result, docs, _) in rendered.items():
        assert result["lint"]["errors"] == [], name
        assert all(m["severity"] < 2 for m in result["lint"]["messages"]), result["lint"]["messages"]
        assert {"RayService", "Service", "NetworkPolicy", "PodDisruptionBudget", "ServiceMonitor", "ConfigMap"} <= set(kinds(docs))
        assert "Secret" not in kinds(docs), "secrets are referenced, never rendered from values"
        assert all(d["metadata"].get("namespace") == "oncoserve" for d in docs)
    default, gpu, kserve = (rendered[n][1] for n in ("default", "gpu", "kserve"))
    assert "ScaledObject" not in kinds(default) and "InferenceService" not in kinds(default)
    assert "ScaledObject" in kinds(gpu) and "RayJob" in kinds(gpu)
    assert "InferenceService" in kinds(kserve) and not [d for d in kserve if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("triton")]


def test_gpu_values_request_gpus_on_the_gpu_pool(rendered):
    docs = rendered["gpu"][1]
    triton = one(docs, "Deployment", "-triton")
    container = triton["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["spec"]["template"]["spec"]["nodeSelector"] == {"oncoserve.io/pool": "gpu"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    groups = {g["groupName"]: g for g in one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups["gpu"]["minReplicas"] == 0  # scales from zero
    assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    scaled = one(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == triton["metadata"]["name"]
    assert "nv_inference_queue_duration_us" in scaled["spec"]["triggers"][0]["metadata"]["query"]
    app = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["backend"] == {"kind": "triton", "triton_url": "demo-oncoserve-triton:8001", "fallback_to_embedded": True}
    kserve = one(rendered["kserve"][1], "InferenceService")
    assert kserve["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_chart_serve_config_equals_what_the_embedded_stack_deploys(rendered):
    chart = yaml.safe_load(one(rendered["default"][1], "RayService")["spec"]["serveConfigV2"])
    assert "backend" not in chart["applications"][0]["args"]  # auto: each version's measured runtime
    ours = serve_config(deploy_config.load())
    assert chart["http_options"] == ours["http_options"] and chart["grpc_options"] == ours["grpc_options"]
    (c_app,), (o_app,) = chart["applications"], ours["applications"]
    assert {k: c_app[k] for k in ("name", "route_prefix", "import_path", "args")} == {k: o_app[k] for k in ("name", "route_prefix", "import_path", "args")}
    assert {d["name"]: d for d in c_app["deployments"]} == {d["name"]: d for d in o_app["deployments"]}
    # ... and the args build a valid config for the cluster's app builder.
    assert deploy_config.DeploymentConfig.model_validate(c_app["args"]["config"]).document() == deploy_config.load().document()


def test_a_forced_cpu_runtime_reaches_every_model_deployment(tmp_path):
    """serve.modelBackend openvino/onnxruntime pins the embedded runtime; auto (default) leaves the measured one."""
    result, docs = render({"serve": {"modelBackend": "openvino"}}, tmp_path)
    assert "error" not in result, result
    app = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["backend"] == {"kind": "openvino"}
    assert deploy_config.Backend.model_validate(app["args"]["backend"]).kind == "openvino"


def test_the_direct_ingress_reaches_every_ray_node_and_only_when_asked(rendered, tmp_path):
    """serve.ingress haproxy: Ray reads the switches when its processes start, so every node's container
    carries them (head and workers); the default (Serve's proxy) sets none. Unknown values are refused."""
    def ray_envs(docs) -> list[dict]:
        return [{e["name"]: e.get("value") for e in c.get("env", [])} for spec in pod_specs(one(docs, "RayService"))
                for c in spec["containers"]]  # fmt: skip

    assert not any("RAY_SERVE_ENABLE_HA_PROXY" in env for env in ray_envs(rendered["default"][1]))
    result, docs = render({"serve": {"ingress": "haproxy"}}, tmp_path)
    assert "error" not in result, result
    envs = ray_envs(docs)
    assert len(envs) >= 2 and all(env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
                                  and env["ONCOSERVE_SERVE_INGRESS"] == "haproxy" for env in envs)  # fmt: skip
    from oncoserve.settings import Settings
    from services.ingress import ingress_env

    embedded = ingress_env(Settings(serve_ingress="haproxy"))  # the embedded stack's Ray nodes get the same switches
    assert {k for k in embedded if k.startswith("RAY_SERVE_ENABLE")} == {k for k in envs[0] if k.startswith("RAY_SERVE_ENABLE")}
    refused, _ = render({"serve": {"ingress": "nginx"}}, tmp_path / "bad")
    assert "ingress" in str(refused.get("error", ""))


def test_every_pod_is_non_root_read_only_with_resources(rendered):
    for name, (_, docs, _) in rendered.items():
        specs = [s for d in docs for s in pod_specs(d)]
        assert specs, name
        for spec in specs:
            assert spec["securityContext"]["runAsNonRoot"] is True
            for c in spec["containers"]:
                assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False
                assert c["resources"]["requests"] and c["resources"]["limits"], (name, c["name"])


def test_only_the_ingress_kuberay_and_prometheus_come_in_from_other_namespaces(rendered, tmp_path):
    policies = {d["metadata"]["name"]: d for d in rendered["default"][1] if d["kind"] == "NetworkPolicy"}
    assert "ingress" not in policies["demo-oncoserve-default-deny"]["spec"]
    open_rules = [(n, r) for n, p in policies.items() for r in p["spec"].get("ingress", []) if "from" not in r]
    assert open_rules == [], "a port open to every namespace"
    sources = {n: [f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for r in p["spec"]["ingress"]
                   for f in r["from"] if "namespaceSelector" in f] for n, p in policies.items() if "ingress" in p["spec"]}  # fmt: skip
    assert sources["demo-oncoserve-gateway"] == ["ingress-nginx"] and sources["demo-oncoserve-platform-api"] == ["ingress-nginx"]
    assert sources["demo-oncoserve-kuberay-operator"] == ["kuberay-system"] and sources["demo-oncoserve-prometheus"] == ["monitoring"]
    operator = policies["demo-oncoserve-kuberay-operator"]["spec"]
    assert operator["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert {p["port"] for p in operator["ingress"][0]["ports"]} == {8265, 6379, 52365}
    assert policies["demo-oncoserve-same-namespace"]["spec"]["ingress"][0]["from"] == [{"podSelector": {}}]
    # Named client namespaces reach the gateway; PACS senders reach the receiver's port only, when it runs.
    result, docs = render({"networkPolicy": {"gatewayClientNamespaces": ["apps"]}, "dicom": {"enabled": True, "allowedAes": ["PACS"]}}, tmp_path)
    assert "error" not in result, result
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    gateway = policies["demo-oncoserve-gateway"]["spec"]["ingress"][0]["from"]
    assert [f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for f in gateway] == ["ingress-nginx", "apps"]
    open_rules = [r for p in policies.values() for r in p["spec"].get("ingress", []) if "from" not in r]
    assert [[p["port"] for p in r["ports"]] for r in open_rules] == [[11112]]


@pytest.mark.parametrize(
    "values, key",
    [
        ({"serve": {"modelBackend": "tensorflow"}}, "modelBackend"),
        ({"ray": {"cpuWorkers": {"maxReplicas": 0}}}, "maxReplicas"),
        ({"triton": {"mode": "sidecar"}}, "mode"),
        ({"replicas": 3}, "replicas"),
        ({"image": {"digest": "latest"}}, "digest"),
    ],
)
def test_values_schema_rejects_bad_values(values, key, tmp_path):
    result, _ = render(values, tmp_path)
    assert "error" in result and key in result["error"]


def test_core_objects_and_pod_templates_pass_kubernetes_validate_strict(rendered, tmp_path):
    docs = [d for name in rendered for d in rendered[name][1]]
    core = [d for d in docs if d["kind"] in CORE_KINDS]
    # KubeRay's CRD schemas are not vendored (megabytes of generated pod schema); their pod templates
    # are validated as core v1 PodTemplates instead, which is what KubeRay turns them into.
    templates = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}", "namespace": "oncoserve"},
                  "template": {"spec": spec}} for i, spec in enumerate(s for d in docs if d["kind"] in ("RayService", "RayJob") for s in pod_specs(d))]  # fmt: skip
    files = []
    for i, doc in enumerate(core + templates):
        path = tmp_path / f"{i:03d}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))
    run = subprocess.run([str(INFRA_BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", "1.31", *files],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len(templates) >= 6


def _checkov(path: Path, framework: str) -> dict:
    run = subprocess.run([str(INFRA_BIN / "checkov"), "-d", str(path), "--framework", framework, "--skip-download",
                          "--compact", "-o", "json"], capture_output=True, text=True, timeout=600)  # fmt: skip
    report = json.loads(run.stdout)
    report = report[0] if isinstance(report, list) else report
    return report


def test_checkov_passes_on_the_rendered_chart(rendered, tmp_path):
    for name in ("default", "gpu", "kserve"):
        folder = tmp_path / name
        folder.mkdir()
        for i, doc in enumerate(rendered[name][1]):
            (folder / f"{i:03d}.yaml").write_text(yaml.safe_dump(doc))
        report = _checkov(folder, "kubernetes")
        failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
        assert failed == [], (name, failed)
        # Every accepted finding carries its reason.
        skipped = report["results"].get("skipped_checks", [])
        assert skipped and all(c["check_result"].get("suppress_comment") for c in skipped)


def test_terraform_is_formatted_and_passes_checkov():
    terraform = shutil.which("terraform")
    assert terraform, "terraform is not installed (see ENVIRONMENT: terraform 1.11)"
    fmt = subprocess.run([terraform, "fmt", "-check", "-recursive", str(TERRAFORM)], capture_output=True, text=True, timeout=120)
    assert fmt.returncode == 0, f"not formatted: {fmt.stdout}"
    report = _checkov(TERRAFORM, "terraform")
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert failed == [] and report["summary"]["passed"] > 200
    assert all(c["check_result"].get("suppress_comment") for c in report["results"].get("skipped_checks", []))
    variables = (TERRAFORM / "variables.tf").read_text()
    assert variables.count("description") >= variables.count('variable "') and variables.count("validation {") >= 6


def test_pipeline_rayjob_runs_the_cli_command_with_a_valid_definition(rendered, tmp_path):
    """The chart's pipeline job: `oncoserve pipeline run --config` on a document the loader accepts."""
    from pipelines.cli.pipeline import run as cli_run
    from pipelines.pipeline_config import DEFAULT_CONFIG, PipelineConfig, load_config

    docs = rendered["gpu"][1]
    job = one(docs, "RayJob", "-pipeline")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:3] == ["oncoserve", "pipeline", "run"]
    options = dict(zip(entry[3::2], entry[4::2]))
    assert options["--config"] == "/etc/oncoserve/pipeline/pipeline.yaml" and options["--promote"] == "champion"
    # Every option the job passes is an option of the CLI command.
    import inspect

    cli_options = {p.default.param_decls[0] for p in inspect.signature(cli_run).parameters.values()}
    assert set(options) <= cli_options, set(options) - cli_options
    config_map = one(docs, "ConfigMap", "-pipeline")
    path = tmp_path / "pipeline.yaml"
    path.write_text(config_map["data"]["pipeline.yaml"])
    chart_config = load_config(path)
    assert chart_config.training.workers == 2 and chart_config.tasks == load_config(DEFAULT_CONFIG).tasks
    # Same schema both places (Helm drops null values, so the chart's document may leave optional keys out).
    fields = set(PipelineConfig.model_fields)
    assert set(yaml.safe_load(DEFAULT_CONFIG.read_text())) == fields
    assert fields - {"data", "gates"} <= set(yaml.safe_load(path.read_text())) <= fields
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert {"/data", "/etc/oncoserve/pipeline", "/var/lib/oncoserve/auth"} <= mounts  # the driver runs on the head
    assert any(e["name"] == "ONCOSERVE_TOKEN" and "secretKeyRef" in e["valueFrom"] for e in head["containers"][0]["env"])
    assert "RayJob" not in kinds(rendered["default"][1])  # jobs are opt-in


def test_trust_chain_wiring_mlflow_auth_accounts_audit_claim_and_public_key(rendered):
    docs = rendered["gpu"][1]
    mlflow = one(docs, "Deployment", "-mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name basic-auth" in mlflow["args"][0]
    env = {e["name"]: e for e in mlflow["env"]}
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_DATABASE_URI"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "oncoserve-mlflow-auth", name  # from a Secret
    assert not any(w in " ".join(mlflow["args"]) for w in ("password", "SECRET")), "a secret on the command line"
    accounts = {"RayService": "reader", "RayJob": "training"}
    for doc in docs:
        if doc["kind"] not in accounts:
            continue
        for spec in pod_specs(doc):
            for container in spec["containers"]:
                if container["name"] == "submitter":
                    continue
                env = {e["name"]: e for e in container["env"]}
                key = env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"]
                assert key == f"{accounts[doc['kind']]}-password", (doc["kind"], container["name"], key)
                assert env["ONCOSERVE_AUDIT_DIR"]["value"] == "/var/lib/oncoserve-audit"
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                volumes = {v["name"]: v for v in spec["volumes"]}
                audit = volumes[mounts["/var/lib/oncoserve-audit"]]
                assert audit["persistentVolumeClaim"]["claimName"] == "demo-oncoserve-audit" and "emptyDir" not in audit
                assert "configMap" in volumes[mounts["/etc/oncoserve/trust"]]
    claim = one(docs, "PersistentVolumeClaim", "-audit")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    job = one(docs, "Job", "-mlflow-accounts")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["python", "-m", "pipelines.mlflow_accounts"]


def test_the_cpu_workers_at_their_minimum_hold_the_serve_application_at_its_minimum():
    """A model replica reserves its runtime's cores (services/deployments.yaml): the RayService's minimum
    CPU workers must fit the application's minimum replicas, or it starts with replicas pending."""
    import yaml

    from services import deploy_config

    values = yaml.safe_load((Path(__file__).parents[2] / "infra/helm/oncoserve/values.yaml").read_text())
    workers = values["ray"]["cpuWorkers"]
    cores = float(workers["resources"]["limits"]["cpu"])
    assert workers["minReplicas"] * cores >= deploy_config.cpu_reservation(deploy_config.load(), "min_replicas")


def _env(container: dict) -> dict[str, str]:
    """A container's environment as the pod would see it (Secrets resolved to stand-in values)."""
    return {e["name"]: e.get("value", f"secret:{e['name'].lower()}") for e in container["env"]}


def _settings_from(container: dict, monkeypatch, tmp_path):
    """oncoserve's Settings built from exactly a rendered container's environment."""
    from oncoserve.settings import Settings

    for key in [k for k in os.environ if k.startswith("ONCOSERVE_")]:
        monkeypatch.delenv(key)
    for key, value in _env(container).items():
        monkeypatch.setenv(key, value)
    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("ONCOSERVE_HOME", str(tmp_path))  # the pod's /var/lib/oncoserve, writable here
    monkeypatch.chdir(tmp_path)  # no oncoserve.toml of the test run's working directory
    return Settings()


PLATFORM_VALUES = {"dicom": {"enabled": True, "allowedAes": ["PACS", "MODALITY1"], "pacsDestination": "PACS@pacs.hospital:104"},
                   "platformApi": {"ingress": {"enabled": True, "host": "oncoserve.example.org", "tlsSecret": "oncoserve-tls"}},
                   "serve": {"publicUrl": "https://console.example.org"}}  # fmt: skip


def test_the_platform_api_and_dicom_receiver_are_deployed_and_reachable_by_their_public_urls(tmp_path, monkeypatch):
    """Defect: no platform API was deployed, so the console sent browsers to 127.0.0.1:8600."""
    result, docs = render(PLATFORM_VALUES, tmp_path / "r")
    assert "error" not in result, result
    deployment = one(docs, "Deployment", "-platform")
    spec = deployment["spec"]["template"]["spec"]
    api, receiver = spec["containers"]
    assert api["command"] + api["args"] == ["oncoserve", "platform", "serve", "--port", "8600"]
    assert receiver["command"] == ["oncoserve", "pacs", "receive"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    # The job table, signing key and spool are on the claim both containers mount; the audit log on its own.
    for container in (api, receiver):
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/var/lib/oncoserve/jobs"]["name"] == "state" and mounts["/var/lib/oncoserve/platform"]["name"] == "state"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == one(docs, "PersistentVolumeClaim", "-platform")["metadata"]["name"]
    assert volumes["audit"]["persistentVolumeClaim"]["claimName"] == "demo-oncoserve-audit"
    service = one(docs, "Service", "-platform")
    assert service["spec"]["ports"][0]["port"] == 8600 and service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    dicom = one(docs, "Service", "-dicom")
    assert dicom["spec"]["ports"][0]["port"] == 11112 and dicom["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    ingress = one(docs, "Ingress", "-platform")
    assert ingress["spec"]["tls"] == [{"hosts": ["oncoserve.example.org"], "secretName": "oncoserve-tls"}]
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == service["metadata"]["name"]
    # Our own settings read the rendered environment the way the pods will.
    settings = _settings_from(api, monkeypatch, tmp_path / "api")
    assert settings.platform_url == "https://oncoserve.example.org" and settings.host == "0.0.0.0"
    assert settings.serve_url == "http://demo-oncoserve-gateway:8000" and settings.mlflow_url == "http://demo-oncoserve-mlflow:5000"
    assert settings.allowed_origins == ["https://console.example.org"]
    assert settings.signing_key_file.parent == settings.signing_public_key_file.parent == tmp_path / "api" / "platform"
    receiving = _settings_from(receiver, monkeypatch, tmp_path / "receiver")
    assert receiving.dicom_allowed_aes == ["PACS", "MODALITY1"] and receiving.pacs_destination == "PACS@pacs.hospital:104"
    assert receiving.deid_salt == settings.deid_salt == "secret:oncoserve_deid_salt"
    # The gateway pods name the same public URL to browsers and share the de-identification salt.
    head = one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    gateway = _settings_from(head, monkeypatch, tmp_path / "head")
    assert gateway.platform_url == settings.platform_url and gateway.deid_salt == settings.deid_salt
    assert gateway.signing_public_key_file == Path("/etc/oncoserve/trust/signing.pub")
    assert gateway.platform_client_url == settings.platform_client_url == "http://demo-oncoserve-platform:8600"  # in-cluster callers
    salt = {e["name"]: e for e in head["env"]}["ONCOSERVE_DEID_SALT"]["valueFrom"]["secretKeyRef"]
    assert salt == {"name": "oncoserve-deid", "key": "salt"}
    # Without an ingress, an explicit publicUrl wins; without either, the in-cluster Service URL.
    result, docs = render({"platformApi": {"publicUrl": "https://platform.example.org"}}, tmp_path / "r2")
    head = one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert _env(head)["ONCOSERVE_PLATFORM_PUBLIC_URL"] == "https://platform.example.org"
    assert [c["name"] for c in one(docs, "Deployment", "-platform")["spec"]["template"]["spec"]["containers"]] == ["platform-api"]
    assert not [d for d in docs if d["kind"] in ("Ingress",) or d["metadata"]["name"].endswith("-dicom")]


def test_the_platform_api_enforces_the_gates_given_in_values(tmp_path, monkeypatch):
    """Without it the platform API always judged promotions by the gates packaged in the image: an
    operator had no way to write a change-control plan for a cluster."""
    from pipelines.gates import load_gates

    gates = (Path(__file__).resolve().parents[2] / "pipelines" / "gates.toml").read_text().replace("version = ", "# ours\nversion = ", 1)
    result, docs = render({"platformApi": {"gates": gates}}, tmp_path / "r")
    assert "error" not in result, result
    template = one(docs, "Deployment", "-platform")["spec"]["template"]
    api = template["spec"]["containers"][0]
    mount = {m["name"]: m for m in api["volumeMounts"]}["gates"]
    volume = {v["name"]: v for v in template["spec"]["volumes"]}["gates"]
    config_map = one(docs, "ConfigMap", "-gates")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"] and mount["readOnly"]
    (tmp_path / "mounted").mkdir()
    for key, text in config_map["data"].items():  # the ConfigMap as the pod sees it
        (tmp_path / "mounted" / key).write_text(text)
    gates_file = Path(_env(api)["ONCOSERVE_GATES_FILE"])
    assert gates_file.parent == Path(mount["mountPath"])
    mounted = tmp_path / "mounted" / gates_file.name
    assert mounted.read_text() == gates and load_gates(mounted)  # the file the platform loads, and it parses
    assert template["metadata"]["annotations"]["checksum/gates"]  # new gates roll the pod
    # Without gates in values: the packaged gates, no ConfigMap, no mount.
    result, docs = render({}, tmp_path / "r2")
    api = one(docs, "Deployment", "-platform")["spec"]["template"]["spec"]["containers"][0]
    assert "ONCOSERVE_GATES_FILE" not in _env(api) and not [d for d in docs if d["metadata"]["name"].endswith("-gates")]


def test_ray_addresses_and_ports_come_from_the_chart(rendered, tmp_path, monkeypatch):
    """Defect: jobs called ray.init("127.0.0.1:6380") (the embedded head) while KubeRay's head listens on 6379."""
    docs = rendered["gpu"][1]
    head_group = one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    gcs = {p["name"]: p["containerPort"] for p in head_group["template"]["spec"]["containers"][0]["ports"]}["gcs"]
    assert head_group["rayStartParams"]["port"] == str(gcs) == "6379"
    for job in (d for d in docs if d["kind"] == "RayJob"):
        job_head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
        assert job_head["rayStartParams"]["port"] == "6379"
        settings = _settings_from(job_head["template"]["spec"]["containers"][0], monkeypatch, tmp_path / job["metadata"]["name"])
        assert settings.ray_address == "auto"  # the driver joins the RayJob's own cluster (RAY_ADDRESS)
    result, docs = render({"ray": {"headPort": 6390}}, tmp_path / "r")
    head_group = one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head_group["rayStartParams"]["port"] == "6390"
    policy = one(docs, "NetworkPolicy", "-kuberay-operator")
    assert 6390 in {p["port"] for p in policy["spec"]["ingress"][0]["ports"]}


def test_ray_train_checkpoints_of_a_rayjob_go_to_the_object_store(rendered, tmp_path, monkeypatch):
    """Defect (found running the pipeline RayJob from its manifests): Ray Train kept checkpoints under the
    driver's home, a folder the worker pods cannot see, and every training failed ("Unable to set up
    cluster storage"). The RayJob drivers name the object store; one machine keeps its home folder."""
    from training.checkpoint_storage import from_settings

    for suffix in ("-pipeline", "-train-segmentation"):
        cluster = one(rendered["gpu"][1], "RayJob", suffix)["spec"]["rayClusterSpec"]
        head = cluster["headGroupSpec"]["template"]["spec"]
        worker = cluster["workerGroupSpecs"][0]["template"]["spec"]  # reads a resumed run's checkpoint
        assert _env(worker["containers"][0])["ONCOSERVE_RAY_STORAGE"] == "s3"
        settings = _settings_from(head["containers"][0], monkeypatch, tmp_path / suffix)
        storage = from_settings(settings)
        assert storage.describe() == "s3://oncoserve-artifacts/ray-results"
        assert storage.s3["endpoint_override"] == "s3.us-east-1.amazonaws.com" and storage.s3["scheme"] == "https"
        assert "access_key" not in storage.s3  # no keys in values: the pod's IAM role (IRSA)
    settings = _settings_from({"env": [{"name": "ONCOSERVE_S3_ACCESS_KEY", "value": "key-id"}, {"name": "ONCOSERVE_S3_SECRET_KEY", "value": "secret-xyz"},
                                       {"name": "ONCOSERVE_S3_EXTERNAL_ENDPOINT", "value": "minio:9000"},
                                       {"name": "ONCOSERVE_RAY_STORAGE", "value": "s3"}]}, monkeypatch, tmp_path / "keys")  # fmt: skip
    storage = from_settings(settings)
    assert storage.s3["access_key"] == "key-id" and storage.s3["secret_key"] == "secret-xyz" and storage.s3["scheme"] == "http"
    assert "secret-xyz" not in repr(storage) and storage.filesystem().region  # keys never printed; a pyarrow S3 filesystem
    # One machine: the home folder, shared by the embedded stack's nodes (no filesystem object needed).
    local = from_settings(_settings_from({"env": []}, monkeypatch, tmp_path / "local"))
    assert local.path == str(tmp_path / "local" / "ray_results") and local.filesystem() is None


def test_the_service_account_is_the_one_the_terraform_irsa_role_trusts(rendered):
    """Defect: the IAM role trusted `oncoserve` while the chart created `<release>-oncoserve`."""
    import re

    variables = (TERRAFORM / "variables.tf").read_text()
    default = re.search(r'variable "service_account" \{.*?default\s*=\s*"([^"]+)"', variables, re.S).group(1)
    outputs = (TERRAFORM / "outputs.tf").read_text()
    helm_values = outputs[outputs.index('output "helm_values"'):]
    assert re.search(r"name\s*=\s*var\.service_account", helm_values) and "eks.amazonaws.com/role-arn" in helm_values
    iam = (TERRAFORM / "modules/iam/main.tf").read_text()
    assert "system:serviceaccount:${var.namespace}:${var.service_account}" in iam
    for name, (_, docs, _) in rendered.items():
        account = one(docs, "ServiceAccount")["metadata"]["name"]
        assert account == default, name
        used = {spec["serviceAccountName"] for d in docs for spec in pod_specs(d) if "serviceAccountName" in spec}
        assert used == {default}, (name, used)


MLFLOW_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


def _mlflow_server(tmp_path: Path, extra: list[str]):
    import socket
    import sys
    import time as _time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "mlflow"
    # As the chart runs it: no job-execution workers (each would be another long-lived process).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--default-artifact-root", str(tmp_path / "a"), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)  # fmt: skip
    import httpx

    deadline = _time.monotonic() + 120
    while _time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, "mlflow server exited"
        _time.sleep(0.5)  # polling a starting server's health, not synchronising on a guess
    _stop(proc)
    raise AssertionError("mlflow server did not come up")


def _stop(proc: subprocess.Popen) -> None:
    """The server and every process it started (uvicorn and its workers share its process group)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            os.killpg(proc.pid, 0)  # the leader is gone; are its children?
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def test_mlflow_answers_pods_that_call_it_by_its_service_name(rendered, tmp_path):
    """Defect: MLflow >= 3.5 answered 403 to the Service name pods use, while /health stayed green.
    The rendered --allowed-hosts is given to a real MLflow server; requests carry the in-cluster Host."""
    import shlex

    import httpx

    mlflow = one(rendered["default"][1], "Deployment", "-mlflow")["spec"]["template"]["spec"]["containers"][0]
    argv = shlex.split(mlflow["args"][0].split("exec ", 1)[1])
    hosts = argv[argv.index("--allowed-hosts") + 1]
    service = one(rendered["default"][1], "Service", "-mlflow")
    names = [service["metadata"]["name"], f"{service['metadata']['name']}.oncoserve.svc.cluster.local"]
    port = service["spec"]["ports"][0]["port"]
    for extra, expected in (([], 403), (["--allowed-hosts", hosts], 200)):
        proc, local = _mlflow_server(tmp_path / str(expected), extra)
        try:
            for name in names:
                for host in (name, f"{name}:{port}"):
                    answer = httpx.get(f"http://127.0.0.1:{local}{MLFLOW_PROBE}", headers={"host": host}, timeout=30)
                    assert answer.status_code == expected, (extra, host, answer.status_code)
            health = httpx.get(f"http://127.0.0.1:{local}/health", headers={"host": names[0]}, timeout=30)
            assert health.status_code == 200  # the probe is green either way: it never caught this
            if extra:
                stranger = httpx.get(f"http://127.0.0.1:{local}{MLFLOW_PROBE}", headers={"host": "evil.example"}, timeout=30)
                assert stranger.status_code == 403  # DNS rebinding protection stays on
        finally:
            _stop(proc)


def test_triton_reads_only_the_verified_local_repository(rendered):
    """Defect: Triton read the repository from S3 unverified. Now an init container and a sidecar
    (`oncoserve models sync-triton`) write verified files to a volume Triton reads and cannot write."""
    import inspect

    from pipelines.cli.models import sync_triton

    triton = one(rendered["gpu"][1], "Deployment", "-triton")["spec"]["template"]["spec"]
    server = next(c for c in triton["containers"] if c["name"] == "triton")
    assert "--model-repository=/models" in server["args"] and not any("s3://" in a for a in server["args"])
    assert not any(e["name"].startswith("AWS_ACCESS") for e in server.get("env", []))  # no S3 keys at all
    assert {m["mountPath"]: m.get("readOnly", False) for m in server["volumeMounts"]}["/models"] is True
    cli_options = {p.default.param_decls[0] for p in inspect.signature(sync_triton).parameters.values()}
    syncs = [*triton["initContainers"], *(c for c in triton["containers"] if c["name"] != "triton")]
    assert [c["name"] for c in syncs] == ["sync-models", "sync-models-watch"]
    for container in syncs:
        command = container["command"]
        assert command[:3] == ["oncoserve", "models", "sync-triton"]
        options = dict(zip(command[3::2], command[4::2]))
        assert set(options) <= cli_options and options["--dest"] == "/models"
        assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/models"] == "models"
        key = {e["name"]: e for e in container["env"]}["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"]
        assert key == "reader-password"
    assert "--every" not in syncs[0]["command"] and dict(zip(syncs[1]["command"][3::2], syncs[1]["command"][4::2]))["--every"] == "30"
    assert {v["name"]: v for v in triton["volumes"]}["models"]["emptyDir"]
