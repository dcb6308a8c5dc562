"""The platform API over real HTTP: the same promotion, roles and audit as the CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from oncoserve.auth import Identity, TokenStore
from serving.registry import Registry
from tests.helpers import wait_until

pytestmark = pytest.mark.integration
TASK = "survival"
GATES = """
version = 98
[defaults]
parity_max_abs_diff = 1e-3
latency_budget_ms = 60000
latency_runs = 1
[survival]
floors = {}  # the tiny test split has too few cases for a c-index
ceilings = {}
regression_tolerance = {}
[localization]
floors = { hit_rate = 2.0 }  # unreachable: every localization promotion is refused
ceilings = {}
regression_tolerance = {}
"""


@pytest.fixture(scope="module")
def api(live_stack, trained, tmp_path_factory):
    gates = tmp_path_factory.mktemp("gates") / "gates.toml"
    gates.write_text(GATES)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {"ONCOSERVE_GATES_FILE": str(gates)}
    exe = str(Path(sys.executable).parent / "oncoserve")
    proc = subprocess.Popen([exe, "platform", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    assert wait_until(up, timeout_s=60) and proc.poll() is None
    from pipelines.platform_client import PlatformClient

    if not Registry(live_stack.mlflow_url).version(TASK, trained[TASK]).tags.get("compiled_sha256"):
        PlatformClient(live_stack).compile(TASK, trained[TASK], force=True, reason="a champion must be compiled")
    store, admin = TokenStore(live_stack.tokens_file), Identity("test-admin", "admin")
    tokens = {r: store.create(f"api-{r}", r, admin) for r in ("viewer", "data-scientist", "platform")}
    yield {"url": url, "tokens": tokens, "version": trained[TASK], "settings": live_stack, "trained": trained}
    proc.terminate()
    proc.wait(timeout=30)


def call(api, method, path, role=None, **kwargs):
    headers = {"Authorization": f"Bearer {api['tokens'][role]}"} if role else {}
    return httpx.request(method, api["url"] + path, headers=headers, timeout=120, **kwargs)


def test_reads_need_a_valid_token(api):
    assert call(api, "GET", "/v1/models").status_code == 401
    forged = httpx.get(api["url"] + "/v1/models", headers={"Authorization": "Bearer osv_forged"})
    assert forged.status_code == 401 and "not valid" in forged.json()["error"]
    listed = call(api, "GET", "/v1/models", "viewer")
    assert listed.status_code == 200 and any(v["task"] == TASK for v in listed.json())
    missing = call(api, "GET", f"/v1/models/{TASK}/versions/999", "viewer")
    assert missing.status_code == 404 and "not in the registry" in missing.json()["error"]


def test_promotion_and_rollback_over_rest_with_roles(api):
    v = api["version"]
    path = f"/v1/models/{TASK}/versions/{v}:promote"
    assert call(api, "POST", path, json={"to": "champion"}).status_code == 401
    denied = call(api, "POST", path, "data-scientist", json={"to": "champion"})
    assert denied.status_code == 403 and "needs role platform" in denied.json()["error"]
    bad = call(api, "POST", path, "platform", json={"to": "everyone"})
    assert bad.status_code == 400
    ok = call(api, "POST", path, "platform", json={"to": "champion", "reason": "api test"})
    assert ok.status_code == 200, ok.text
    assert all(g["passed"] for g in ok.json()["gates"])
    assert Registry(api["settings"].mlflow_url).alias(TASK, "champion") == v
    none_to_restore = call(api, "POST", f"/v1/models/{TASK}:rollback", "platform", json={})
    assert none_to_restore.status_code == 404 and "previous" in none_to_restore.json()["error"]
    audit = call(api, "GET", f"/v1/audit?task={TASK}", "viewer").json()
    mine = [(e["action"], e["status"], e["gates_version"]) for e in audit if e["action"] == "promote" and e["actor"] == "api-platform"]
    assert mine == [("promote", "completed", 98)]  # this server's own gates file decided


def test_refused_promotion_is_409_with_every_gate(api):
    v = api["trained"]["localization"]
    refused = call(api, "POST", f"/v1/models/localization/versions/{v}:promote", "data-scientist", json={"to": "candidate"})
    assert refused.status_code == 409, refused.text
    failing = [g for g in refused.json()["gates"] if not g["passed"]]
    assert [g["name"] for g in failing] == ["floor:hit_rate"] and failing[0]["threshold"] == ">= 2.0"
    assert Registry(api["settings"].mlflow_url).alias("localization", "candidate") is None


def test_compile_of_a_version_that_fails_its_gates_is_refused_unless_an_admin_forces_it(api):
    v = api["trained"]["localization"]
    path = f"/v1/models/localization/versions/{v}:compile"
    refused = call(api, "POST", path, "data-scientist", json={})
    assert refused.status_code == 409 and [g["name"] for g in refused.json()["gates"] if not g["passed"]] == ["floor:hit_rate"]
    admin = {"Authorization": f"Bearer {api['settings'].cli_token()}"}
    no_reason = httpx.post(api["url"] + path, json={"force": True}, headers=admin, timeout=120)
    assert no_reason.status_code == 400 and "reason" in no_reason.json()["error"]
    forced = httpx.post(api["url"] + path, json={"force": True, "reason": "known weak"}, headers=admin, timeout=300)
    assert forced.status_code == 200 and f"localization/{v}/model.onnx" in forced.json()["files"], forced.text
    audit = call(api, "GET", "/v1/audit?task=localization", "viewer").json()
    compiles = [(e["status"], bool(e.get("forced"))) for e in audit if e["action"] == "compile" and str(e["version"]) == v]
    assert compiles[-2:] == [("refused", False), ("completed", True)]
