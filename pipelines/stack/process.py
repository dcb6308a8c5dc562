"""Start, recognise and stop the processes the embedded stack owns.

A process is recorded by PID *and* creation time, so a recycled PID is never mistaken for ours and
`down` never signals a process the stack did not start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil


@dataclass
class ProcessRecord:
    pid: int
    create_time: float
    command: list[str]
    log: str
    started_at: float

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ProcessRecord":
        return cls(**data)


def spawn(command: list[str], env: dict[str, str], log: Path, cwd: Path) -> ProcessRecord:
    """Start a server in its own session (so its whole tree can be found and stopped), logging to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Logs can carry hostnames, paths and request details: readable by the stack's owner only.
    with os.fdopen(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(command)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env={**os.environ, **env},
            start_new_session=True,
            umask=0o077,  # everything a server writes under the home (Ray's session, the DB) is the owner's only
        )
    return ProcessRecord(
        pid=proc.pid,
        create_time=psutil.Process(proc.pid).create_time(),
        command=command,
        log=str(log),
        started_at=time.time(),
    )


def unrecorded(home: Path, records: list[ProcessRecord]) -> list[psutil.Process]:
    """Live processes working in `home` (the stack starts every server there) that belong to no
    recorded process's session: servers an interrupted `up` or a racing `down` left behind."""
    sessions = {r.pid for r in records if find(r) is not None}
    home = Path(home).resolve()
    found = []
    for proc in psutil.process_iter(["pid", "cwd"]):
        try:
            if proc.pid == os.getpid() or proc.info["cwd"] is None or Path(proc.info["cwd"]) != home:
                continue
            if os.getsid(proc.pid) in sessions or proc.pid in sessions:
                continue
            found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def find(record: ProcessRecord) -> psutil.Process | None:
    """The live process behind a record, or None when it has exited (or its PID was recycled)."""
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > 0.01:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.NoSuchProcess:
        return None


def _session_members(root: psutil.Process) -> list[psutil.Process]:
    """The root, its descendants, and anything still in its session (children re-parented to init)."""
    members = {root.pid: root}
    try:
        for child in root.children(recursive=True):
            members[child.pid] = child
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter():
        try:
            if proc.pid not in members and os.getsid(proc.pid) == root.pid:
                members[proc.pid] = proc
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return list(members.values())


def stop(record: ProcessRecord, sig: int = signal.SIGTERM, grace_s: float = 20.0) -> None:
    """Stop a recorded process and every process it started; escalate to SIGKILL after `grace_s`."""
    root = find(record)
    if root is None:
        return
    members = _session_members(root)
    try:
        root.send_signal(sig)
    except psutil.NoSuchProcess:
        pass
    _, alive = psutil.wait_procs(members, timeout=grace_s)
    _kill(alive)
    # A process started while the tree was going down was not in `members`: Serve's HAProxy manager, for one,
    # reloads HAProxy as the replicas leave, and the new HAProxy outlives its killed parent. It stays in the
    # session, so the session is swept until it is empty (bounded: each pass kills what it finds).
    for _ in range(5):
        late = []
        for pid in set(session_alive(record)) - {record.pid}:
            try:
                late.append(psutil.Process(pid))
            except psutil.NoSuchProcess:  # gone since it was listed
                continue
        if not late:
            break
        _kill(late)
    # Reap our own child if the stack was started by this very process (tests, demo).
    try:
        os.waitpid(record.pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _kill(procs: list[psutil.Process]) -> None:
    """SIGKILL each (one already gone is fine) and wait for them."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)


def session_alive(record: ProcessRecord) -> list[int]:
    """PIDs still alive in the recorded process's session (used to prove `down` left nothing behind)."""
    pids = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == record.pid and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return pids


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    # Also refuse a port something listens on at the wildcard address.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((host, port)) != 0


def log_tail(path: Path | str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text[-lines:])
