"""The security checklist of issue 10, one test per item that is not already tested where it lives.

docs/SECURITY.md maps every item to its test(s); the items tested elsewhere are named there (size limits
and hostile bodies: test_hostile_inputs; rate limit: test_rate_limit; UI headers and CORS: test_ui;
tampered ONNX: test_registry; hashed tokens: test_registry_parts).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from fastapi.testclient import TestClient

from oncoserve.auth import Identity, TokenStore
from oncoserve.settings import Settings
from pipelines.platform_api import create_app
from pipelines.stack import EmbeddedStack
from pipelines.stack.process import session_alive
from serving.artifacts import TamperedArtifact
from tests.helpers import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


def _mutating_routes(app) -> list[tuple[str, str]]:
    return [(method, route.path) for route in app.routes for method in sorted(getattr(route, "methods", ()) or ())
            if method in MUTATING]  # fmt: skip


def test_every_mutating_platform_route_needs_a_token_and_a_role(tmp_path):
    """Enumerated from the app itself: a route added later without a check fails here."""
    settings = Settings(home=tmp_path, mlflow_port=free_port())  # no registry: auth must come first
    app = create_app(settings)
    routes = _mutating_routes(app)
    assert {path for _, path in routes} >= {"/v1/models/{task}/versions/{version}:promote", "/v1/models/{task}:rollback"}
    store, admin = TokenStore(settings.tokens_file), Identity("sec-admin", "admin")
    store.create("sec-admin", "admin", None)
    viewer = store.create("sec-viewer", "viewer", admin)
    revoked = store.create("sec-gone", "platform", admin)
    store.revoke("sec-gone", admin)
    body = {"to": "champion", "reason": "security test"}
    with TestClient(app) as client:
        for method, path in routes:
            url = path.replace("{task}", "survival").replace("{version}", "1")
            for header, status in ((None, 401), ("Bearer osv_not-a-token", 401), (f"Basic {viewer}", 401),
                                   (f"Bearer {revoked}", 401), (f"Bearer {viewer}", 403)):  # fmt: skip
                headers = {"authorization": header} if header else {}
                r = client.request(method, url, json=body, headers=headers)
                assert r.status_code == status, (method, url, header and header[:12], r.text)
                assert r.json()["error"], r.text  # a message, not an empty body


@pytest.mark.parametrize("args", [
    ("models", "promote", "survival", "1", "--to", "candidate"),
    ("models", "rollback", "survival"),
    ("compile", "survival", "--version", "1"),
    ("train", "survival", "--data", "/nonexistent"),
    ("reporting", "register"),
    ("auth", "token", "create", "someone", "--role", "admin"),
])  # fmt: skip
def test_mutating_cli_commands_refuse_without_a_token(tmp_path, args):
    # A home with tokens already (an empty one lets the first caller create the admin token).
    TokenStore(Settings(home=tmp_path).tokens_file).create("owner", "admin", None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCOSERVE_")}
    env |= {"ONCOSERVE_HOME": str(tmp_path), "ONCOSERVE_MLFLOW_PORT": str(free_port())}
    exe = str(Path(sys.executable).parent / "oncoserve")
    run = subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert "token" in out and "Traceback" not in out, out


def _listeners(pids: set[int]) -> list[tuple[str, int, int, str]]:
    found = []
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.NoSuchProcess:
                continue
            found.append((conn.laddr.ip, conn.laddr.port, conn.pid, name))
    return found


def test_servers_listen_on_loopback_except_rays_own_internals(served):
    """Every server oncoserve starts itself is on 127.0.0.1. Ray's core (GCS, raylet, workers, agents),
    its client server and Serve's gRPC proxy bind every interface or the node's address whatever
    `--node-ip-address` says (Ray's design; docs/SECURITY.md): anything else off loopback fails here."""
    settings = served["settings"]
    stack = EmbeddedStack(settings)
    pids = {pid for record in stack.records().values() for pid in session_alive(record)}
    listening = _listeners(pids)
    configured = {settings.s3_port, settings.mlflow_port, settings.platform_port, settings.ray_dashboard_port,
                  settings.serve_http_port}  # fmt: skip
    assert configured <= {port for _, port, _, _ in listening}, listening
    loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    for ip, port, pid, name in listening:
        if port in configured:
            assert ip in loopback, (ip, port, name)
        elif ip not in loopback:
            cmdline = " ".join(psutil.Process(pid).cmdline())
            rays = name.startswith("ray::") or name in ("gcs_server", "raylet") or "/site-packages/ray/" in cmdline or " -m ray." in cmdline
            assert rays, (ip, port, name, cmdline)


FORBIDDEN_LOADERS = {"pickle", "cloudpickle", "dill", "joblib", "torch", "mlflow.pyfunc", "mlflow.pytorch", "shelve", "marshal"}


def test_serving_code_never_imports_an_unpickler():
    """serving/ and services/ load ONNX (and text) only: no module there can deserialize a pickle."""
    offenders = []
    for path in sorted([*ROOT.glob("serving/**/*.py"), *ROOT.glob("services/**/*.py")]):
        if "_pb2" in path.name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []  # fmt: skip
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n in FORBIDDEN_LOADERS or n.split(".")[0] in {"pickle", "cloudpickle", "dill", "joblib", "torch"}]  # fmt: skip
    assert offenders == []


class _Trap:
    """A pickle that would leave a file behind if anything unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_place_of_the_onnx_is_refused_and_never_run(tmp_path):
    from serving.artifacts import verify_file
    from serving.backends import EmbeddedBackend

    marker = tmp_path / "pickle-ran"
    model = tmp_path / "model.onnx"
    model.write_bytes(pickle.dumps(_Trap(marker)))
    verify_file(model, hashlib.sha256(model.read_bytes()).hexdigest())  # even with a matching digest ...
    with pytest.raises(Exception) as refused:  # ... onnxruntime parses protobuf, never pickles
        EmbeddedBackend(model, "segmentation", "1")
    assert "protobuf" in str(refused.value).lower() or "load model" in str(refused.value).lower(), refused.value
    assert not marker.exists()


def test_reporting_version_is_verified_before_it_loads(served, tmp_path):
    """A reporting version's files are hashed at registration and checked before serving loads them."""
    from oncoserve.object_store import object_store
    from pipelines.reporting_registry import register_reporting
    from services.reporting import model as reporting_model

    settings, registry = served["settings"], served["registry"]
    version, _ = register_reporting(settings)  # a new version, never promoted: the served one is untouched
    recorded = json.loads(registry.version("reporting", version).tags[reporting_model.DIGEST_TAG])
    assert "reporting.json" in recorded and any(k.startswith("knowledge/") for k in recorded)
    good = reporting_model.download_verified(registry, version, tmp_path / "good")
    assert reporting_model.load(good)[1]  # loads: a prompt version
    # Rewrite one knowledge document in the object store behind MLflow's back (MLflow proxies
    # `mlflow-artifacts:/...` to s3://<artifacts bucket>/mlflow/...).
    source = registry.version("reporting", version).source
    prefix = "mlflow/" + source.removeprefix("mlflow-artifacts:/").lstrip("/")
    name = next(k for k in sorted(recorded) if k.startswith("knowledge/"))
    forged = b"# forged\n"
    object_store(settings).put_object(settings.bucket_artifacts, f"{prefix}/{name}", io.BytesIO(forged), len(forged))
    with pytest.raises(TamperedArtifact, match=re.escape(name)):
        reporting_model.download_verified(registry, version, tmp_path / "bad")
