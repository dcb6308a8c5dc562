"""Shared fixtures: isolated ONCOSERVE_HOME and free loopback ports for a private embedded stack."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from oncoserve.settings import Settings
from pipelines.stack.ports import private_stack_env

# Where a stuck test is stuck: stacks, busiest processes and stack logs after ONCOSERVE_TEST_HANG_S.
pytest_plugins = ["tests.hang_report"]


def stack_env(home: Path) -> dict[str, str]:
    """ONCOSERVE_* variables for a private stack: its own home and ports that are free right now, and no
    DICOM receiver (the shared stack's PACS settings stay in the environment for the session)."""
    return private_stack_env(home) | {"ONCOSERVE_DICOM_ALLOWED_AES": "[]"}


@pytest.fixture(scope="module")
def stack_home():
    # Short path on purpose: Ray's unix sockets live under it (108-byte limit).
    home = Path(tempfile.mkdtemp(prefix="osv-", dir="/tmp"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def stack_settings(stack_home):
    """Settings of a private stack, also exported to the environment for CLI subprocesses."""
    env = stack_env(stack_home)
    saved = {k: os.environ.get(k) for k in [*env, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]}
    os.environ.update(env)
    try:
        yield Settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# The gates the shared test stack's platform API enforces (server side: a client's file has no effect).
# One-epoch models on eight cases are weak, so floors are open; what must fail is the no-regression
# gate (a version worse than the champion, an all-background segmentation, is refused on WT) and any
# survival promotion (an unreachable floor).
TEST_GATES = """
version = 99
[defaults]
parity_max_abs_diff = 1e-3
latency_budget_ms = 60000
latency_runs = 1
[segmentation]
floors = { dice_WT = 0.0 }
ceilings = { hd95_WT = 1000.0 }
regression_tolerance = { dice_WT = 0.005, hd95_WT = 5.0 }
[localization]
floors = {}
[classification]
floors = {}
[survival]
floors = { c_index = 2.0 }  # unreachable: the console test's promotion is refused (fixtures force theirs)
"""


@contextlib.contextmanager
def private_stack(prefix: str, admin_name: str, gates: str = TEST_GATES, extra_env: dict[str, str] | None = None):
    """A private embedded stack up for the block: its own home and free ports, exported to the
    environment (for CLI subprocesses), its platform API started with `gates`, and an admin token
    saved where the CLI looks for it."""
    from oncoserve.auth import TokenStore
    from oncoserve.credentials import use_mlflow_account
    from pipelines.stack import EmbeddedStack

    # Short path on purpose: Ray's unix sockets live under it (108-byte limit).
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    gates_file = Path(tempfile.mkdtemp(prefix="osg-")) / "gates.toml"
    gates_file.write_text(gates)
    env = stack_env(home) | {"ONCOSERVE_GATES_FILE": str(gates_file)} | (extra_env or {})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    stack = EmbeddedStack(Settings())
    saved |= {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        stack.up()
        settings = Settings()
        # The tests act as a training job does towards MLflow (and the CLI they start does the same).
        use_mlflow_account(settings.mlflow_accounts_file, "training")
        token = TokenStore(settings.tokens_file).create(admin_name, "admin", None)
        fd = os.open(settings.home / "token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token)
        yield settings
    finally:
        stack.down()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(gates_file.parent, ignore_errors=True)


# The test PACS (Orthanc, started by tests/integration/test_pacs.py) on ports fixed when the shared stack
# starts, so the stack's receiver accepts it and its job runner sends results there.
PACS = {"aet": "TESTPACS", "user": "pacs-admin", "password": "pacs-secret"}


# They reshape the shared stack (direct ingress restarts its Ray and puts it back; multi-node leaves it so).
RUN_LAST = ("tests/integration/test_direct_ingress.py", "tests/integration/test_multinode.py")


def pytest_collection_modifyitems(session, config, items):
    """Modules that restart the shared stack's Ray or turn it into a multi-node cluster run after every other
    test (in RUN_LAST's order): a failed restore can then disturb no other module."""
    last = [item for item in items if item.nodeid.startswith(RUN_LAST)]
    items[:] = [item for item in items if not item.nodeid.startswith(RUN_LAST)] + last


@pytest.fixture(scope="session")
def live_stack():
    """One private embedded stack shared by the integration tests that only use it (never stop it). Its
    DICOM receiver accepts the test PACS, and accepted results go back to it (retried every second)."""
    from pipelines.stack.process import port_free

    free = [p for p in range(30000, 31000) if port_free("127.0.0.1", p)]
    PACS.update(dicom_port=free[0], http_port=free[1])
    extra = {"ONCOSERVE_DICOM_ALLOWED_AES": f'["{PACS["aet"]}"]', "ONCOSERVE_DICOM_STUDY_IDLE_S": "2",
             "ONCOSERVE_PACS_DESTINATION": f"{PACS['aet']}@127.0.0.1:{PACS['dicom_port']}", "ONCOSERVE_PACS_RETRY_S": "1",
             "ONCOSERVE_PACS_MAX_ATTEMPTS": "120", "ONCOSERVE_DICOMWEB_URL": f"http://127.0.0.1:{PACS['http_port']}/dicom-web",
             "ONCOSERVE_DICOMWEB_USERNAME": PACS["user"], "ONCOSERVE_DICOMWEB_PASSWORD": PACS["password"]}  # fmt: skip
    with private_stack("osl-", "test-admin", extra_env=extra) as settings:
        yield settings


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Eight 2 mm phantom cases (two sites): enough for every task to train for an epoch."""
    from imaging.phantoms import synthesise

    return synthesise(tmp_path_factory.mktemp("data") / "tiny", n=8, seed=2, sites=2)


TASKS = ["localization", "segmentation", "classification", "survival"]


def oncoserve(*args: str, timeout: int = 600, token: str | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess with the current (test stack) environment."""
    exe = str(Path(sys.executable).parent / "oncoserve")
    env = os.environ.copy()
    if token is not None:
        env["ONCOSERVE_TOKEN"] = token
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def trained(live_stack, tiny_dataset):
    """One version per task, trained for one epoch through the CLI (Ray Train -> MLflow); two jobs at a time,
    as a cluster runs them (each spends much of its time starting, exporting and registering)."""
    from concurrent.futures import ThreadPoolExecutor

    def train(task: str) -> str:
        run = oncoserve("train", task, "--data", str(tiny_dataset), "--epochs", "1")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert f"registered model {task} version" in run.stdout
        return run.stdout.split(f"registered model {task} version")[-1].split()[0]

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(TASKS, pool.map(train, TASKS)))


def auth_headers(settings, headers: dict | None = None) -> dict:
    """The test admin's token as an Authorization header (serving requires a token by default)."""
    return {"authorization": f"Bearer {settings.cli_token()}", **(headers or {})}


def compile_and_promote(settings, task: str, version: str, reason: str = "tests: tiny one-epoch models") -> None:
    """Through the platform API, as a user would (compile, then a signed champion promotion); an admin
    forces what the test gates refuse, and the audit log says so."""
    from pipelines.platform_client import PlatformClient
    from serving.registry import Registry

    client = PlatformClient(settings)
    if not Registry(settings.mlflow_url).version(task, version).tags.get("compiled_sha256"):
        client.compile(task, version, force=True, reason=reason)
    client.promote(task, version, "champion", reason=reason, force=True)


@contextlib.contextmanager
def compiled_champions(settings, versions: dict[str, str]):
    """Compile the given versions and make them champions; restore the previous champions afterwards."""
    from oncoserve.object_store import object_store
    from serving.registry import Registry

    registry, store = Registry(settings.mlflow_url), object_store(settings)
    before = {task: registry.alias(task, "champion") for task in versions}
    for task, version in versions.items():
        compile_and_promote(settings, task, version)
    try:
        yield registry, store
    finally:
        for task, version in before.items():
            if version and registry.alias(task, "champion") != version:
                compile_and_promote(settings, task, version, "tests: restore the champion")


MAX_REQUEST_MB = 24  # above one raw OIP v2 study tensor (16.5 MB)
SERVE_TEST_CONFIG = """
application: oncoserve
watch_interval_s: 2.0
deployments:
  gateway: {num_cpus: 0.1, max_ongoing_requests: 32, autoscaling: {min_replicas: 1, max_replicas: 1}}
  # two replicas: the hot-swap test checks that both answer with one version during a swap (version barrier)
  localization: {autoscaling: {min_replicas: 2, max_replicas: 2}, batching: {max_batch_size: 4, batch_wait_timeout_s: 0.02}}
  segmentation:
    max_ongoing_requests: 2
    batching: {max_batch_size: 1}
    autoscaling: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 1, upscale_delay_s: 0.5, downscale_delay_s: 600,
                  look_back_period_s: 2.0}
  classification: {autoscaling: {min_replicas: 1, max_replicas: 1}}
  survival: {autoscaling: {min_replicas: 1, max_replicas: 1}}
  reporting: {num_cpus: 0.1, autoscaling: {min_replicas: 1, max_replicas: 1}, retrieval: true}
"""


@pytest.fixture(scope="session")
def served(live_stack, trained, tmp_path_factory):
    config = tmp_path_factory.mktemp("serve") / "deployments.yaml"
    config.write_text(SERVE_TEST_CONFIG)
    os.environ["ONCOSERVE_SERVE_MAX_REQUEST_MB"] = str(MAX_REQUEST_MB)
    """The Serve application on the shared stack, deployed by the real CLI (`oncoserve serve up`)."""
    with compiled_champions(live_stack, {t: trained[t] for t in TASKS}) as (registry, store):
        registered = oncoserve("reporting", "register")
        assert registered.returncode == 0, registered.stderr[-2000:]
        reporting = registered.stdout.split("registered model reporting version")[-1].split()[0]
        promoted = oncoserve("models", "promote", "reporting", reporting, "--to", "champion", "--reason", "serving tests")
        assert promoted.returncode == 0, promoted.stdout[-2000:] + promoted.stderr[-2000:]
        up = oncoserve("serve", "up", "--config", str(config))
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        try:
            yield {"url": live_stack.serve_url, "grpc": f"127.0.0.1:{live_stack.serve_grpc_port}", "auth": auth_headers(live_stack),
                   "registry": registry, "store": store, "settings": live_stack, "reporting": reporting}  # fmt: skip
        finally:
            down = oncoserve("serve", "down")
            os.environ.pop("ONCOSERVE_SERVE_MAX_REQUEST_MB", None)
            assert down.returncode == 0, down.stderr[-2000:]
