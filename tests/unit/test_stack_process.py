import socket
import sys

import psutil
import pytest

from oncoserve.credentials import S3Credentials
from oncoserve.settings import Settings
from pipelines.stack import process
from pipelines.stack.components import RayHead, S3Server
from tests.helpers import wait_until


def test_port_free_sees_a_listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    try:
        assert process.port_free("127.0.0.1", port) is False
    finally:
        sock.close()
    assert process.port_free("127.0.0.1", port) is True


def test_stop_kills_the_whole_tree(tmp_path):
    # A parent that starts a child which ignores SIGTERM: stop must still leave nothing behind.
    script = "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); time.sleep(600)"
    record = process.spawn([sys.executable, "-c", script], {}, tmp_path / "x.log", cwd=tmp_path)
    proc = psutil.Process(record.pid)
    assert wait_until(lambda: len(proc.children()) == 1, timeout_s=20)
    child = proc.children()[0]
    process.stop(record, grace_s=1)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert process.find(record) is None
    assert process.session_alive(record) == []


def test_stop_also_kills_what_the_tree_starts_while_it_goes_down(tmp_path):
    """Defect: a stack whose Ray ran Serve's HAProxy ingress left an HAProxy running after `stack down`: the
    HAProxy manager reloads HAProxy as replicas leave, after stop had listed the tree. Here a parent starts a
    detached child (re-parented to init, as that HAProxy was) only once it is told to stop."""
    script = ("import os,signal,subprocess,sys,time\n"
              "def late(*_):\n"
              "    subprocess.Popen([sys.executable,'-c','import os,time; os.fork() and os._exit(0); time.sleep(600)'])\n"
              "    time.sleep(0.5); os._exit(0)\n"
              "signal.signal(signal.SIGTERM, late)\n"
              "print('handler', 'set', flush=True); time.sleep(600)\n")  # fmt: skip
    log = tmp_path / "late.log"
    record = process.spawn([sys.executable, "-c", script], {}, log, cwd=tmp_path)
    assert wait_until(lambda: "handler set" in log.read_text().splitlines(), timeout_s=20)  # (the log's header names the command)
    process.stop(record, grace_s=10)
    assert process.find(record) is None
    assert process.session_alive(record) == []


def test_recycled_pid_is_not_ours(tmp_path):
    record = process.spawn([sys.executable, "-c", "import time; time.sleep(60)"], {}, tmp_path / "y.log", cwd=tmp_path)
    forged = process.ProcessRecord(**{**record.to_json(), "create_time": record.create_time - 1000})
    assert process.find(forged) is None  # same PID, different start time: never signalled
    process.stop(forged)
    assert process.find(record) is not None
    process.stop(record)


def test_s3_ports_and_ray_temp_dir_are_short(tmp_path):
    creds = S3Credentials("a", "b")
    s = Settings(home=tmp_path / ("deep" * 20), s3_port=21000)
    ports = S3Server(s, creds).ports()
    assert 21000 in ports and 31000 in ports and len(set(ports)) == len(ports)
    (s.home / "ray").mkdir(parents=True)
    temp = RayHead(s, creds).temp_dir()
    assert len(str(temp)) < 40 and temp.resolve() == (s.home / "ray").resolve()


def test_log_tail_of_missing_log():
    assert process.log_tail("/nonexistent/x.log") == "(no log written)"


def test_status_of_a_never_started_stack_reports_down_and_writes_nothing(tmp_path):
    from pipelines.stack import EmbeddedStack

    home = tmp_path / "fresh"
    parts = EmbeddedStack(Settings(home=home, dicom_allowed_aes=[])).status()  # no receiver (the session may set one)
    assert {p.name for p in parts} == {"s3", "ray", "mlflow", "platform"}
    assert not any(p.running or p.healthy for p in parts)
    assert not home.exists()


def test_private_port_blocks_never_overlap():
    from pathlib import Path

    from pipelines.stack.ports import S3_OFFSETS, private_stack_env

    for _ in range(100):
        env = private_stack_env(Path("/tmp/unused"))
        s3, other = int(env["ONCOSERVE_S3_PORT"]), int(env["ONCOSERVE_MLFLOW_PORT"])
        assert not {s3 + off for off in S3_OFFSETS} & set(range(other, other + 9))
        workers = int(env["ONCOSERVE_RAY_WORKER_PORT_BASE"])
        assert not set(range(workers, workers + 24)) & ({s3 + off for off in S3_OFFSETS} | set(range(other, other + 10)))


def test_worker_nodes_join_the_head_on_ports_of_their_own_and_stay_until_asked_otherwise(tmp_path):
    from pipelines.stack import EmbeddedStack
    from pipelines.stack.components import RayWorker, components

    creds = S3Credentials("a", "b")
    s = Settings(home=tmp_path, ray_port=21001, ray_dashboard_agent_port=21004, ray_worker_port_base=22000, ray_workers=2,
                 ray_worker_cpus=3, dicom_allowed_aes=[])  # fmt: skip
    parts = components(s, creds)
    assert [p.name for p in parts] == ["s3", "ray", "ray-worker-1", "ray-worker-2", "mlflow", "platform"]
    head, one, two = parts[1], parts[2], parts[3]
    assert head.blocking and one.blocking  # nodes starting together collide on socket names in the shared temp dir
    taken = [port for part in parts for port in part.ports()]
    assert len(taken) == len(set(taken)), "two components share a port"
    command = " ".join(two.command())
    assert "--address=127.0.0.1:21001" in command and f"--temp-dir={head.temp_dir()}" in command and "--head" not in command
    assert "--num-cpus=3" in command and '"oncoserve_worker_2": 1' in command and "--block" in command
    # No worker node: the head need not wait before MLflow starts.
    assert not components(s.model_copy(update={"ray_workers": 0}), creds)[1].blocking
    # A stack's recorded worker nodes are kept by a plain `up`, and `up --workers N` sets their number.
    stack = EmbeddedStack(s.model_copy(update={"ray_workers": 0}))
    state = {"ray-worker-1": None, "ray-worker-3": None}
    assert [p.name for p in stack._components(state, create_credentials=False) if isinstance(p, RayWorker)] == \
        ["ray-worker-1", "ray-worker-2", "ray-worker-3"]  # fmt: skip
    assert not [p for p in stack._components(state, create_credentials=False, workers=0) if isinstance(p, RayWorker)]


def test_the_serving_ingress_is_in_every_ray_nodes_environment_and_serve_up_refuses_a_mismatch(tmp_path):
    """Ray reads its direct-ingress switches when its processes start: they go into the head's and the worker
    nodes' environment, at ports derived from the serving ports, and a deployment whose setting disagrees
    with the running cluster is refused with the way out."""
    from pipelines.serving import ServeError, _check_ingress
    from pipelines.stack.components import RAY_ENV, RayWorker

    creds = S3Credentials("a", "b")
    # Every field that matters is explicit: the suite's shared stack exports its own ONCOSERVE_* ports.
    proxy = Settings(home=tmp_path, serve_http_port=21006, serve_grpc_port=21007, serve_ingress="proxy")
    assert RayHead(proxy, creds).env() == RAY_ENV == RayWorker(proxy, creds, 1).env()
    direct = proxy.model_copy(update={"serve_ingress": "haproxy"})
    for env in (RayHead(direct, creds).env(), RayWorker(direct, creds, 2).env()):
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
        assert env["RAY_AUTH_MODE"] == "disabled"
        ports = [int(env[f"RAY_SERVE_{k}"]) for k in ("FALLBACK_PROXY_HTTP_PORT", "FALLBACK_PROXY_GRPC_PORT",
                                                         "HAPROXY_STATS_PORT", "HAPROXY_METRICS_PORT")]  # fmt: skip
        assert ports == [21506, 21507, 21410, 21108]  # the defaults' offsets (Ray's own 8500, 9500, 8404, 9101)
    default_ports = {f: Settings.model_fields[f].default for f in ("serve_http_port", "serve_grpc_port")}
    defaults = RayHead(Settings(home=tmp_path, serve_ingress="haproxy", **default_ports), creds).env()
    assert [defaults["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"], defaults["RAY_SERVE_HAPROXY_METRICS_PORT"]] == ["8500", "9101"]

    _check_ingress(direct, "haproxy")
    with pytest.raises(ServeError, match="started with the proxy ingress.*stack down"):
        _check_ingress(direct, "proxy")
    with pytest.raises(ServeError, match="serve_ingress is proxy"):
        _check_ingress(proxy, "haproxy")
    with pytest.raises(ValueError):
        Settings(home=tmp_path, serve_ingress="nginx")
