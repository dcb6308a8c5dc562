"""Serve's direct ingress (`serve_ingress = "haproxy"`) on the shared stack: its Ray head restarted with
HAProxy on the serving ports in front of the gateway replicas' own servers, the same champions deployed by
`oncoserve serve up`, and the same answers as through Serve's proxy: tritonclient over HTTP and gRPC
identical to the runtime's own output, a whole study analysed, a caller without a token refused. A
deployment whose setting disagrees with the cluster's Ray is refused with the reason.

Runs after the other serving modules (tests/conftest.py RUN_LAST) and puts the stack back on Serve's proxy
with the session's Serve config when it ends.
"""

from __future__ import annotations

import os

import httpx
import numpy as np
import psutil
import pytest

from imaging.dataset import read_case
from imaging.preprocess import preprocess
from oncoserve.settings import Settings
from pipelines.stack import EmbeddedStack
from pipelines.stack.process import stop
from serving.backends import EmbeddedBackend
from tests.conftest import SERVE_TEST_CONFIG, auth_headers, oncoserve
from tests.helpers import study_files, wait_until

pytestmark = pytest.mark.integration


def _restart_ray(ingress: str) -> Settings:
    """The stack's Ray head stopped and started again with `ingress` (everything else keeps running)."""
    os.environ["ONCOSERVE_SERVE_INGRESS"] = ingress
    settings = Settings()
    stack = EmbeddedStack(settings)
    stop(stack.records()["ray"], grace_s=20.0)
    stack.up()
    return settings


def _listener(port: int) -> str:
    """The name of the process that listens on 127.0.0.1:`port`."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid).name()
    return ""


@pytest.fixture(scope="module")
def direct(served, tmp_path_factory):
    config = tmp_path_factory.mktemp("ingress") / "deployments.yaml"
    config.write_text(SERVE_TEST_CONFIG)
    settings = _restart_ray("haproxy")
    try:
        # The setting and the cluster must agree: Serve would otherwise come up behind the other ingress.
        os.environ["ONCOSERVE_SERVE_INGRESS"] = "proxy"
        refused = oncoserve("serve", "up", "--config", str(config))
        said = " ".join(refused.stderr.split())  # the console wraps long lines
        assert refused.returncode == 1 and "started with the haproxy ingress" in said, refused.stdout + refused.stderr
        os.environ["ONCOSERVE_SERVE_INGRESS"] = "haproxy"
        up = oncoserve("serve", "up", "--config", str(config))
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        url = settings.serve_url
        assert wait_until(lambda: httpx.get(f"{url}/readyz", timeout=10).status_code == 200, timeout_s=180, interval_s=1.0)
        yield {**served, "settings": settings}
    finally:
        _restart_ray("proxy")
        os.environ.pop("ONCOSERVE_SERVE_INGRESS", None)
        back = oncoserve("serve", "up", "--config", str(config))
        assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-3000:]


def test_haproxy_listens_on_the_serving_ports_and_studies_are_analysed(direct, tiny_dataset):
    settings = direct["settings"]
    assert _listener(settings.serve_http_port) == "haproxy" and _listener(settings.serve_grpc_port) == "haproxy"
    case = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[0]
    files = study_files(case)
    refused = httpx.post(f"{settings.serve_url}/v1/studies:analyze", files=files, timeout=60)
    assert refused.status_code == 401 and "token" in refused.json()["error"].lower()
    answered = httpx.post(f"{settings.serve_url}/v1/studies:analyze", files=files, headers=auth_headers(settings), timeout=300)
    assert answered.status_code == 200, answered.text[:2000]
    body = answered.json()
    assert body["findings"]["case_id"] and body["mask_nifti_gz_b64"] and answered.headers.get("x-request-id")


def test_tritonclient_http_and_grpc_match_the_runtime_exactly(direct, tiny_dataset, trained, tmp_path):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    settings, task = direct["settings"], "classification"
    prepared = preprocess(read_case(tiny_dataset, sorted(p.name for p in tiny_dataset.iterdir() if p.is_dir())[1]))
    feeds = {"image": prepared.image[None], "presence": prepared.presence[None]}
    local = EmbeddedBackend.from_version(direct["registry"], direct["store"], settings.bucket_models, settings.triton_repo_prefix,
                                         task, trained[task], tmp_path)  # fmt: skip
    expected = local.infer(feeds)["probabilities"]

    http = httpclient.InferenceServerClient(settings.serve_url.removeprefix("http://"), network_timeout=120)
    inputs = [httpclient.InferInput(name, list(a.shape), "FP32") for name, a in feeds.items()]
    for item, array in zip(inputs, feeds.values()):
        item.set_data_from_numpy(array, binary_data=True)
    result = http.infer(task, inputs, headers=auth_headers(settings))
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)
    assert result.get_response()["model_version"] == trained[task]

    limits = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    client = grpcclient.InferenceServerClient(f"{settings.host}:{settings.serve_grpc_port}", channel_args=limits)
    g_inputs = [grpcclient.InferInput(name, list(a.shape), "FP32") for name, a in feeds.items()]
    for item, array in zip(g_inputs, feeds.values()):
        item.set_data_from_numpy(array)
    g_result = client.infer(task, g_inputs, client_timeout=120, headers=auth_headers(settings))
    np.testing.assert_array_equal(g_result.as_numpy("probabilities"), expected)
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="token"):  # the same caller checks on this path
        client.infer(task, g_inputs, client_timeout=60)
