"""The embedded stack on one machine: S3 (SeaweedFS), MLflow, a Ray head (and PostgreSQL on request).

State lives in ``ONCOSERVE_HOME/stack.json``: the PID and creation time of every process the stack
started. `up` is idempotent, `down` stops only recorded processes, `status` checks real health.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from oncoserve import credentials
from oncoserve.settings import Settings
from pipelines.stack import process
from pipelines.stack.components import WORKER_PREFIX, Component, Health, StackError, components

POLL_S = 0.5


@dataclass
class ComponentStatus:
    name: str
    running: bool
    healthy: bool
    pid: int | None
    url: str
    log: str
    detail: str


class EmbeddedStack:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.state_file = settings.home / "stack.json"

    # -- state -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One `up` / `down` at a time per home: a racing pair would otherwise start processes that
        the other's state file never records (and the next `down` would stop nothing)."""
        self.settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.settings.home / "stack.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load_state(self) -> dict[str, process.ProcessRecord]:
        if not self.state_file.exists():
            return {}
        raw = json.loads(self.state_file.read_text())
        return {name: process.ProcessRecord.from_json(rec) for name, rec in raw.items()}

    def _save_state(self, state: dict[str, process.ProcessRecord]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
            handle.write(json.dumps({n: r.to_json() for n, r in state.items()}, indent=2))
        os.replace(tmp, self.state_file)  # atomic: a crash never leaves half a state file

    def _components(self, state: dict | None = None, create_credentials: bool = True, workers: int | None = None) -> list[Component]:
        settings = self.settings
        # A stack brought up with `--db postgresql` keeps that database until it is brought down, and one
        # brought up with `--workers N` its worker nodes until another `up --workers` changes their number.
        if state and "postgres" in state and settings.db != "postgresql":
            settings = settings.model_copy(update={"db": "postgresql"})
        count = workers if workers is not None else max(settings.ray_workers, max(_worker_indexes(state or {}), default=0))
        if count != settings.ray_workers:
            settings = settings.model_copy(update={"ray_workers": count})
        if create_credentials or settings.credentials_file.exists():
            creds = credentials.load_or_create(settings.credentials_file)
        else:
            creds = credentials.S3Credentials("", "")  # never started: nothing to authenticate against
        return components(settings, creds)

    def records(self) -> dict[str, process.ProcessRecord]:
        return self._load_state()

    # -- up --------------------------------------------------------------------------------------
    def up(self, on_event: Callable[[str, str], None] = lambda name, msg: None, workers: int | None = None) -> list[ComponentStatus]:
        """Start what is not running, wait until every component is healthy; return their status. `workers`
        sets the number of Ray worker nodes (extra ones are stopped); None keeps what is running (or the
        `ray_workers` setting, when larger)."""
        old = os.umask(0o077)  # what `up` itself makes under the home (data folders, state) is the owner's only
        try:
            with self._locked():
                return self._up(on_event, workers)
        finally:
            os.umask(old)

    def _stop_extra_workers(self, state: dict, keep: int, on_event: Callable[[str, str], None]) -> None:
        extra = [f"{WORKER_PREFIX}{i}" for i in sorted(_worker_indexes(state), reverse=True) if i > keep]
        self._stop_together(state, extra, on_event, "stopped (fewer worker nodes asked for)")

    def _stop_together(self, state: dict, names: list[str], on_event: Callable[[str, str], None], said: str) -> None:
        """Stop worker nodes at the same time: each can take its whole grace period (a raylet drains
        before it exits), and nothing depends on the order they leave in."""
        if not names:
            return
        grace = {c.name: c.stop_grace_s for c in self._components(state)}
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            running = [n for n in names if process.find(state[n]) is not None]
            list(pool.map(lambda n: process.stop(state[n], grace_s=grace.get(n, 20.0)), running))
        for name in names:
            on_event(name, said if name in running else "was not running")
            del state[name]
        self._save_state(state)

    def _up(self, on_event: Callable[[str, str], None], workers: int | None = None) -> list[ComponentStatus]:
        home = self.settings.home
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        home.chmod(0o700 | (home.stat().st_mode & 0o001))  # keep o+x only where PostgreSQL needs to pass through
        self.settings.logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = self._load_state()
        for proc in process.unrecorded(home, list(state.values())):
            try:
                what = " ".join(proc.cmdline())[:120]
            except Exception:
                what = "?"
            on_event("stack", f"WARNING: process {proc.pid} ({what}) runs in this home but is not recorded; "
                              "stop it by hand (kill) if it is a leftover")  # fmt: skip
        if workers is not None:
            self._stop_extra_workers(state, workers, on_event)
        waiting: list[Component] = []
        for comp in self._components(state, workers=workers):
            record = state.get(comp.name)
            if record and process.find(record):
                on_event(comp.name, "already running")
            else:
                self._start(comp, state, on_event)
            waiting.append(comp)
            if comp.blocking:
                self._wait_healthy([comp], state, on_event)
        self._wait_healthy(waiting, state, on_event)
        return self.status()

    def _start(self, comp: Component, state: dict, on_event: Callable[[str, str], None]) -> None:
        busy = [p for p in comp.ports() if not process.port_free(self.settings.host, p)]
        if busy:
            raise StackError(
                f"{comp.name}: cannot start, port {busy[0]} on {self.settings.host} is already in use by "
                f"another process (ports needed: {', '.join(map(str, busy))}). Free it or choose another "
                f"port in oncoserve.toml / ONCOSERVE_* settings. Log: {comp.log}"
            )
        comp.prepare()
        record = process.spawn(comp.command(), comp.env(), comp.log, cwd=self.settings.home)
        state[comp.name] = record
        self._save_state(state)
        on_event(comp.name, f"started (pid {record.pid})")

    def _wait_healthy(self, comps: list[Component], state: dict, on_event: Callable[[str, str], None]) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        pending = {c.name: c for c in comps}
        last: dict[str, str] = {}
        while pending:
            for name, comp in list(pending.items()):
                record = state[name]
                if process.find(record) is None:
                    raise StackError(
                        f"{name}: exited during start-up. Log: {record.log}\n{process.log_tail(record.log)}"
                    )
                health = comp.health()
                last[name] = health.detail
                if health.ok:
                    on_event(name, f"healthy ({health.detail})")
                    del pending[name]
            if not pending:
                break
            if time.monotonic() > deadline:
                name = next(iter(pending))
                raise StackError(
                    f"{name}: not healthy after {self.settings.startup_timeout_s:.0f}s ({last.get(name)}). "
                    f"Log: {pending[name].log}"
                )
            time.sleep(POLL_S)  # polling a server's health endpoint, not synchronising a test

    # -- down ------------------------------------------------------------------------------------
    def down(self, on_event: Callable[[str, str], None] = lambda name, msg: None) -> None:
        with self._locked():
            self._down(on_event)

    def _down(self, on_event: Callable[[str, str], None]) -> None:
        state = self._load_state()
        by_name = {c.name: c for c in self._components(state)}
        # Worker nodes first, all together; then reverse start order: MLflow before the stores it writes to.
        self._stop_together(state, [n for n in state if n.startswith(WORKER_PREFIX)], on_event, "stopped")
        for name in reversed(list(state)):
            record = state[name]
            comp = by_name.get(name)
            if process.find(record) is None:
                on_event(name, "was not running")
            else:
                process.stop(record, sig=comp.stop_signal if comp else 15, grace_s=comp.stop_grace_s if comp else 20.0)
                on_event(name, "stopped")
            del state[name]
            self._save_state(state)
        if self.state_file.exists():
            self.state_file.unlink()

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> list[ComponentStatus]:
        state = self._load_state()
        result = []
        for comp in self._components(state, create_credentials=False):
            record = state.get(comp.name)
            alive = bool(record and process.find(record))
            health = comp.health() if alive else Health(False, "not running")
            result.append(
                ComponentStatus(
                    name=comp.name,
                    running=alive,
                    healthy=health.ok,
                    pid=record.pid if alive else None,
                    url=comp.url(),
                    log=str(comp.log),
                    detail=health.detail,
                )
            )
        return result

    def status_json(self, parts: list[ComponentStatus] | None = None) -> dict:
        parts = self.status() if parts is None else parts
        return {
            "healthy": all(p.healthy for p in parts),
            "home": str(self.settings.home),
            "components": {p.name: asdict(p) for p in parts},
        }


def _worker_indexes(state: dict) -> list[int]:
    """The Ray worker nodes a stack's state records (`ray-worker-<i>`)."""
    return [int(name.removeprefix(WORKER_PREFIX)) for name in state if name.startswith(WORKER_PREFIX)]


def is_healthy(parts: list[ComponentStatus]) -> bool:
    return all(p.healthy for p in parts)

