import socket
import sys

import psutil

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
