"""The trust chain against a hostile local user, on the real stack (issue 18's acceptance list).

A champion moved behind the platform's back (a direct MLflow client, a record signed with another
key) is refused by the replicas: the signed version keeps answering, the untrusted-alias counter
rises, the audit log records it. A second home's fresh admin token cannot promote. The serving API
refuses anonymous and unknown callers (REST 401, gRPC UNAUTHENTICATED) and a viewer's stored-study
reads (403). No secret is on a command line; nothing under the home is readable by others.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import httpx
import pytest
from mlflow import MlflowClient

from oncoserve.audit import AuditLog
from oncoserve.auth import TokenStore
from oncoserve.signing import Signer
from serving import promotion_ledger as ledger
from tests.conftest import oncoserve
from tests.helpers import study_files, wait_until

pytestmark = pytest.mark.integration
TASK = "classification"


def _counter(url: str, task: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "oncoserve_untrusted_alias_total" and s.labels.get("task") == task)  # fmt: skip


def _token(settings, name: str, role: str) -> str:
    store = TokenStore(settings.tokens_file)
    return store.create(f"{name}-{os.urandom(3).hex()}", role, store.authenticate(settings.cli_token()))


def _copy_version(settings, version: str) -> str:
    """A second registered version with the champion's own artifacts (as a training job could register)."""
    from serving.registry import Registry

    registry, client = Registry(settings.mlflow_url), MlflowClient(settings.mlflow_url)
    info = registry.version(TASK, version)
    mv = client.get_model_version(TASK, version)
    tags = {k: v for k, v in info.tags.items() if k not in ("compiled_sha256", "compiled_repository")}
    return str(client.create_model_version(TASK, mv.source, run_id=mv.run_id, tags=tags).version)


@pytest.fixture(scope="module")
def intruder_version(served, trained):
    """A compiled classification version the platform never promoted."""
    from pipelines.platform_client import PlatformClient

    settings = served["settings"]
    version = _copy_version(settings, trained[TASK])
    PlatformClient(settings).compile(TASK, version, force=True, reason="trust test: a loadable, unpromoted version")
    return version


def _predict_version(served, case) -> str:
    r = httpx.post(f"{served['url']}/v1/{TASK}:predict", headers=served["auth"], files=study_files(case), timeout=180)
    assert r.status_code == 200, r.text
    return r.json()["model_version"]


def test_a_direct_mlflow_alias_move_is_refused_by_every_replica(served, trained, intruder_version, tiny_dataset):
    settings, champion = served["settings"], trained[TASK]
    case = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[1]
    before = _counter(served["url"], TASK)
    # Without credentials MLflow itself refuses (its basic-auth app) ...
    from mlflow.exceptions import MlflowException

    saved = {k: os.environ.pop(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        with pytest.raises(MlflowException, match="401"):
            MlflowClient(settings.mlflow_url).set_registered_model_alias(TASK, "champion", intruder_version)
    finally:
        os.environ.update(saved)
    # ... but the training account may move aliases of the models it created: what serving must refuse.
    MlflowClient(settings.mlflow_url).set_registered_model_alias(TASK, "champion", intruder_version)
    try:
        assert wait_until(lambda: _counter(served["url"], TASK) > before, timeout_s=60, interval_s=0.25)
        assert _predict_version(served, case) == champion  # the signed version keeps answering
        ready = httpx.get(f"{served['url']}/readyz", timeout=10).json()
        assert ready["untrusted_aliases"][TASK]["version"] == intruder_version
        assert "signed record names v" + champion in ready["untrusted_aliases"][TASK]["reason"]
        status = oncoserve("serve", "status")
        assert "UNTRUSTED ALIAS" in status.stdout and intruder_version in status.stdout

        def audited() -> bool:
            return any(e.get("action") == "untrusted_alias" and e.get("task") == TASK and e.get("version") == intruder_version
                       for e in AuditLog(settings.audit_file).entries())  # fmt: skip

        assert wait_until(audited, timeout_s=60, interval_s=0.5), "the platform did not audit the unsigned move"
        history = oncoserve("models", "history", TASK, "--json")
        assert history.returncode == 0, history.stderr
        rows = json.loads(history.stdout)
        assert any(r["version"] == champion and r["signed"] for r in rows)
        assert any(r["version"] == intruder_version and not r["signed"] for r in rows)
    finally:
        MlflowClient(settings.mlflow_url).set_registered_model_alias(TASK, "champion", champion)
    assert wait_until(lambda: TASK not in httpx.get(f"{served['url']}/readyz", timeout=10).json()["untrusted_aliases"],
                      timeout_s=60, interval_s=0.25)  # fmt: skip


def test_a_record_signed_by_another_key_is_refused(served, trained, intruder_version, tiny_dataset):
    """A second platform (its own home and key) that could write the ledger still cannot promote."""
    settings = served["settings"]
    store = served["store"]
    original = ledger.head(store, settings.bucket_models, TASK)
    with tempfile.TemporaryDirectory() as other:
        forged = Signer.load_or_create(Path(other) / "k", Path(other) / "p").sign(
            {**original["record"], "version": intruder_version, "seq": original["record"]["seq"] + 1, "actor": "intruder"})
    body = json.dumps(forged).encode()
    before = _counter(served["url"], TASK)
    store.put_object(settings.bucket_models, f"promotions/{TASK}/head.json", io.BytesIO(body), len(body))
    MlflowClient(settings.mlflow_url).set_registered_model_alias(TASK, "champion", intruder_version)
    try:
        assert wait_until(lambda: _counter(served["url"], TASK) > before, timeout_s=60, interval_s=0.25)
        case = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[2]
        assert _predict_version(served, case) == trained[TASK]
        reason = httpx.get(f"{served['url']}/readyz", timeout=10).json()["untrusted_aliases"][TASK]["reason"]
        assert "does not verify" in reason
    finally:
        ledger.restore_head(store, settings.bucket_models, TASK, original)
        MlflowClient(settings.mlflow_url).set_registered_model_alias(TASK, "champion", trained[TASK])


def test_a_second_home_with_its_own_admin_token_cannot_promote(served, trained, tmp_path):
    home = tmp_path / "other-home"
    token = TokenStore(home / "auth" / "tokens.json").create("me", "admin", None)  # bootstrap of *its* home
    env = {**os.environ, "ONCOSERVE_HOME": str(home), "ONCOSERVE_TOKEN": token}
    exe = str(Path(sys.executable).parent / "oncoserve")
    for args in (("models", "promote", TASK, trained[TASK], "--to", "champion", "--force", "--reason", "mine now"),
                 ("models", "rollback", TASK), ("compile", TASK, "--version", trained[TASK])):  # fmt: skip
        run = subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 1 and "not valid" in run.stderr, (args, run.stdout, run.stderr)


def test_serving_rest_needs_a_token_and_the_right_role(served, tiny_dataset):
    url, settings = served["url"], served["settings"]
    files = study_files(sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[0])
    anonymous = httpx.post(f"{url}/v1/studies:analyze", files=files, timeout=60)
    assert anonymous.status_code == 401 and "needs a token" in anonymous.json()["error"]
    for header in ("Bearer osv_unknown", "Basic abc", "Bearer"):
        bad = httpx.post(f"{url}/v1/studies:analyze", files=files, headers={"authorization": header}, timeout=60)
        assert bad.status_code == 401, (header, bad.status_code, bad.text)
    store = TokenStore(settings.tokens_file)
    revoked = _token(settings, "gone", "app")
    store.revoke(next(e["name"] for e in store.list() if e["name"].startswith("gone-")), store.authenticate(settings.cli_token()))
    assert httpx.post(f"{url}/v1/studies:analyze", files=files, headers={"authorization": f"Bearer {revoked}"},
                      timeout=60).status_code == 401  # fmt: skip
    for path, kwargs in (("/v1/reports", {"json": {}}), ("/v1/segmentation:predict", {"files": files}),
                         ("/v2/models/localization/infer", {"content": b"{}"})):  # fmt: skip
        assert httpx.post(f"{url}{path}", timeout=60, **kwargs).status_code == 401, path
    viewer = {"authorization": f"Bearer {_token(settings, 'viewer', 'viewer')}"}
    app = {"authorization": f"Bearer {_token(settings, 'app', 'app')}"}
    clinician = {"authorization": f"Bearer {_token(settings, 'clinician', 'clinician')}"}
    stored = {"s3_uri": f"s3://{settings.bucket_data}/nothing-here/"}
    assert httpx.post(f"{url}/v1/studies:analyze", files=files, headers=viewer, timeout=60).status_code == 403
    for who, needed in ((viewer, "app"), (app, "clinician")):
        s3 = httpx.post(f"{url}/v1/studies:analyze", json=stored, headers=who, timeout=60)
        assert s3.status_code == 403 and f"role {needed}" in s3.json()["error"], s3.text
        preview = httpx.post(f"{url}/v1/studies:analyze?preview=true", files=files, headers=who, timeout=60)
        assert preview.status_code == 403, preview.text
    assert httpx.post(f"{url}/v1/studies:analyze", json=stored, headers=clinician, timeout=60).status_code == 404  # allowed, nothing there
    assert httpx.post(f"{url}/v1/segmentation:predict", files=files, headers=app, timeout=180).status_code == 200


def test_serving_grpc_needs_a_token_and_applies_rate_and_size_limits(served, trained):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from services.grpc_servicers import study_pb2
    from services.proto import study_pb2_grpc
    from tests.conftest import MAX_REQUEST_MB

    settings = served["settings"]
    junk = study_pb2.AnalyzeRequest(nifti={"t1": b"junk"})
    limits = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(served["grpc"], options=limits) as channel:
        stub = study_pb2_grpc.StudyServiceStub(channel)
        for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED),
                               ((("authorization", "Bearer osv_unknown"),), grpc.StatusCode.UNAUTHENTICATED),
                               ((("authorization", f"Bearer {_token(settings, 'gv', 'viewer')}"),), grpc.StatusCode.PERMISSION_DENIED)):  # fmt: skip
            with pytest.raises(grpc.RpcError) as refused:
                stub.Analyze(junk, timeout=60, metadata=metadata)
            assert refused.value.code() == code, refused.value.details()
        app = (("authorization", f"Bearer {_token(settings, 'ga', 'app')}"),)
        big = study_pb2.AnalyzeRequest(nifti={"t1": b"\0" * ((MAX_REQUEST_MB + 1) << 20)})
        with pytest.raises(grpc.RpcError) as too_big:
            stub.Analyze(big, timeout=60, metadata=app)
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        codes = []
        for _ in range(200):  # bounded: the burst is 60 and the rate 10/s
            try:
                stub.Analyze(junk, timeout=60, metadata=app)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "rate limit" in exc.details()
                    break
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED and set(codes[:-1]) <= {grpc.StatusCode.INVALID_ARGUMENT}
    import numpy as np

    client = grpcclient.InferenceServerClient(served["grpc"])
    image = grpcclient.InferInput("image", [1, 4], "FP32")
    image.set_data_from_numpy(np.zeros((1, 4), np.float32))
    with pytest.raises(InferenceServerException, match="needs a token"):
        client.infer("classification", [image])
    with pytest.raises(InferenceServerException, match="not valid"):
        client.infer("classification", [image], headers={"authorization": "Bearer osv_unknown"})


def test_no_secret_on_any_command_line_and_nothing_under_the_home_is_readable_by_others(served):
    settings = served["settings"]
    creds = json.loads(settings.credentials_file.read_text())
    key_body = "".join(settings.signing_key_file.read_text().splitlines()[1:-1])
    secrets = {"s3 secret": creds["secret_key"], "admin token": settings.cli_token(), "signing key": key_body}
    args = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    for name, value in secrets.items():
        assert value and value not in args, f"the {name} is on a command line"
    exposed = []
    for root, dirs, files in os.walk(settings.home):
        for name in dirs + files:
            path = Path(root) / name
            try:
                mode = path.lstat().st_mode
            except FileNotFoundError:  # Ray's session files come and go
                continue
            if stat.S_ISLNK(mode) or stat.S_ISSOCK(mode):
                continue
            # Ray chmods the folders it makes to 0777 (ray._private.utils.try_to_create_directory); they
            # sit inside the 0700 home, which no other user can enter. Their files follow the umask.
            if stat.S_ISDIR(mode) and path.relative_to(settings.home).parts[0] == "ray":
                continue
            # SeaweedFS writes its volume-info files (*.vif) with an explicit 0644, whatever the umask.
            if path.suffix == ".vif" and path.relative_to(settings.home).parts[0] == "s3":
                continue
            if mode & 0o044:
                exposed.append(f"{path.relative_to(settings.home)} {oct(mode & 0o777)}")
    assert exposed == [], exposed[:20]
    assert settings.home.stat().st_mode & 0o077 in (0, 0o001)  # at most o+x (PostgreSQL's user passes through)


def test_audit_verify_passes_on_the_real_log_and_names_a_tampered_record(served, tmp_path):
    settings = served["settings"]
    ok = oncoserve("audit", "verify")
    assert ok.returncode == 0 and "intact" in ok.stdout, ok.stdout + ok.stderr
    copy = tmp_path / "audit.jsonl"
    shutil.copy(settings.audit_file, copy)
    lines = copy.read_text().splitlines()
    target = next(i for i, line in enumerate(lines) if json.loads(line).get("action") == "promote")
    record = json.loads(lines[target])
    record["actor"] = "someone-else"
    lines[target] = json.dumps(record, sort_keys=True)
    copy.write_text("\n".join(lines) + "\n")
    broken = oncoserve("audit", "verify", "--file", str(copy))
    assert broken.returncode == 1 and f"line {target + 1}" in broken.stderr, broken.stderr
    del lines[target]
    copy.write_text("\n".join(lines) + "\n")
    removed = oncoserve("audit", "verify", "--file", str(copy))
    assert removed.returncode == 1 and f"line {target + 1}" in removed.stderr, removed.stderr
