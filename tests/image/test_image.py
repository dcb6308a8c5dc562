"""The built container image (`make image`): its entrypoints start inside it and answer.

Inside the unpacked image (tests/image/container.py: read-only root, the image's user and environment):
the entrypoint's default command; the embedded stack's servers as the chart runs them one per pod (S3,
Ray head, MLflow, the platform API, the DICOM receiver); the pipeline job (train, register, gate,
compile, promote); the gateway on Ray Serve answering /healthz and a study. Run by `make test-image`
(not `make test`: building the image takes minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
import yaml

from pipelines.stack.ports import private_stack_env
from tests.image.container import Image

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = Path(os.environ.get("IMAGE_DIR", ROOT / "build" / "image")) / "oci"
TAG = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("version ="))
HOME = "/var/lib/oncoserve"
GATES = """
version = 1
[defaults]
parity_max_abs_diff = 1e-3
latency_budget_ms = 20000
latency_runs = 1
[segmentation]
floors = { dice_WT = 0.0 }
[localization]
floors = {}
[classification]
floors = {}
[survival]
floors = {}
"""
SERVE = """
application: oncoserve
watch_interval_s: 2.0
deployments:
  gateway: {num_cpus: 0.1, autoscaling: {min_replicas: 1, max_replicas: 1}}
  localization: {autoscaling: {min_replicas: 1, max_replicas: 1}}
  segmentation: {autoscaling: {min_replicas: 1, max_replicas: 1}}
  classification: {autoscaling: {min_replicas: 1, max_replicas: 1}}
  survival: {autoscaling: {min_replicas: 1, max_replicas: 1}}
  reporting: {num_cpus: 0.1, autoscaling: {min_replicas: 1, max_replicas: 1}, retrieval: false}
"""


@pytest.fixture(scope="module")
def image():
    if not (LAYOUT / "index.json").exists():
        pytest.fail(f"no image at {LAYOUT}: run `make image` (make test-image does)")
    where = Path(tempfile.mkdtemp(prefix="osi-", dir="/tmp"))  # short: Ray's sockets live under the home
    try:
        yield Image.unpack(LAYOUT, TAG, where)
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(image):
    """The stack's settings for processes in the image: its home in the image, ports free on loopback."""
    env = private_stack_env(Path(HOME)) | {"ONCOSERVE_DICOM_ALLOWED_AES": '["IMAGETEST"]', "ONCOSERVE_GATES_FILE": f"{HOME}/gates.toml",
                                           "ONCOSERVE_DICOM_STUDY_IDLE_S": "2"}  # fmt: skip
    (image.home / "gates.toml").write_text(GATES)
    try:
        yield env
    finally:
        image.run(["oncoserve", "serve", "down"], env, timeout=120)
        down = image.run(["oncoserve", "stack", "down"], env, timeout=300)
        assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]


def test_the_entrypoint_runs_the_cli_as_the_unprivileged_user(image):
    result = image.run(image.default_args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stack" in result.stdout and "serve" in result.stdout and "pipeline" in result.stdout
    assert image.uid == 10001 and image.gid == 10001 and image.entrypoint[:2] == ["/usr/bin/tini", "--"]
    who = image.run(["python", "-c", "import os, torch, onnxruntime, ray, mlflow; print(os.getuid(), torch.__version__)"])
    assert who.returncode == 0 and who.stdout.split() == ["10001", "2.13.0+cpu"], who.stdout + who.stderr[-2000:]
    # Read-only root: nothing outside /tmp and the home can be written, as under readOnlyRootFilesystem.
    write = image.run(["sh", "-c", "touch /opt/oncoserve/x"])
    assert write.returncode != 0 and "Read-only file system" in write.stderr


def test_the_servers_start_inside_the_image_and_answer(image, stack):
    up = image.run(["oncoserve", "stack", "up"], stack, timeout=600)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    host = "127.0.0.1"
    assert httpx.get(f"http://{host}:{stack['ONCOSERVE_PLATFORM_PORT']}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"http://{host}:{stack['ONCOSERVE_MLFLOW_PORT']}/health", timeout=10).status_code == 200
    status = image.run(["oncoserve", "stack", "status", "--json"], stack, timeout=120)
    parts = json.loads(status.stdout)["components"]
    assert {name for name, part in parts.items() if part["healthy"]} == {"s3", "ray", "mlflow", "platform", "dicom"}, parts
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="IMAGETEST")
    ae.add_requested_context(Verification)
    association = ae.associate(host, int(stack["ONCOSERVE_DICOM_PORT"]), ae_title="ONCOSERVE")
    assert association.is_established, "the DICOM receiver in the image refused an allowed caller"
    try:
        assert association.send_c_echo().Status == 0x0000
    finally:
        association.release()


def test_the_pipeline_job_and_the_gateway_run_from_the_image(image, stack):
    token = image.run(["oncoserve", "auth", "token", "create", "--name", "image-admin", "--role", "admin", "--save"], stack)
    assert token.returncode == 0, token.stdout[-2000:] + token.stderr[-2000:]
    synth = image.run(["oncoserve", "data", "synth", "--out", f"{HOME}/data", "--n", "8", "--seed", "2", "--sites", "2"], stack)
    assert synth.returncode == 0, synth.stdout[-2000:] + synth.stderr[-2000:]
    config = {"version": 1, "name": "image", "data": f"{HOME}/data", "tasks": ["localization", "segmentation", "classification", "survival"],
              "training": {"seed": 1, "epochs": {"localization": 1, "segmentation": 1, "classification": 1, "survival": 1}},
              "gates": f"{HOME}/gates.toml", "compare": {"bootstrap": 50}}  # fmt: skip
    (image.home / "pipeline.yaml").write_text(yaml.safe_dump(config))
    (image.home / "serve.yaml").write_text(SERVE)
    # The chart's RayJob entrypoint, with the summary where the chart puts it.
    job = image.run(["oncoserve", "pipeline", "run", "--config", f"{HOME}/pipeline.yaml", "--data", f"{HOME}/data",
                     "--promote", "champion", "--summary", f"{HOME}/pipeline-summary.json"], stack, timeout=1800)  # fmt: skip
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    summary = json.loads((image.home / "pipeline-summary.json").read_text())
    assert summary, "the pipeline job wrote an empty summary"
    serve = image.run(["oncoserve", "serve", "up", "--config", f"{HOME}/serve.yaml"], stack, timeout=900)
    assert serve.returncode == 0, serve.stdout[-3000:] + serve.stderr[-3000:]
    url = f"http://127.0.0.1:{stack['ONCOSERVE_SERVE_HTTP_PORT']}"
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    token_value = (image.home / "token").read_text().strip()
    case = sorted(p for p in (image.home / "data").iterdir() if p.is_dir())[0]
    files = {m: (f.name, f.read_bytes()) for m in ("t1", "t1ce", "t2", "flair") if (f := case / f"{case.name}_{m}.nii.gz").exists()}
    study = httpx.post(f"{url}/v1/studies:analyze", headers={"authorization": f"Bearer {token_value}"}, files=files, timeout=600)
    assert study.status_code == 200, study.text[-2000:]
    assert set(study.json()["findings"]["model_versions"]) >= {"localization", "segmentation", "classification", "survival"}
