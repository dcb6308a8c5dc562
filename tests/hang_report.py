"""A pytest plugin that says where a stuck test is stuck. A test (setup and teardown included) that runs
longer than ONCOSERVE_TEST_HANG_S (default 1200 s; the slowest test takes about 330 s on a busy 2-core
machine) gets, every that many seconds until it ends: every thread's Python stack in the pytest process,
the busiest processes on the machine and the tail of each log of the stack the test environment names.
It only reports; it never stops a test (a slow test that finishes still passes)."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

import pytest

HANG_S = float(os.environ.get("ONCOSERVE_TEST_HANG_S", "1200"))
LOG_LINES = 30
_OUT: list = []  # the real stderr, kept before tests run (fd 2 is captured while a test runs)


def pytest_configure(config) -> None:
    # Capture is suspended while plugins configure, so fd 2 is the terminal's (as pytest's faulthandler does).
    try:
        _OUT[:] = [os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)]
    except (AttributeError, OSError, ValueError):  # a stderr without a descriptor (-p no:... setups, IDEs)
        _OUT[:] = [sys.__stderr__]


def _processes(out) -> None:
    import psutil

    rows = []
    for proc in psutil.process_iter(["pid", "ppid", "cpu_times", "status", "cmdline"]):
        info = proc.info
        cpu = sum(info["cpu_times"][:2]) if info["cpu_times"] else 0.0
        rows.append((cpu, info["pid"], info["ppid"], info["status"], " ".join(info["cmdline"] or [])[:200]))
    print("-- busiest processes (cpu s, pid, ppid, status, command)", file=out)
    for row in sorted(rows, reverse=True)[:25]:
        print(f"{row[0]:9.1f} {row[1]:>7} {row[2]:>7} {row[3]:<9} {row[4]}", file=out)


def _stack_logs(out) -> None:
    home = os.environ.get("ONCOSERVE_HOME")
    logs = sorted((Path(home) / "logs").glob("*.log")) if home else []
    for log in logs:
        try:
            lines = log.read_text(errors="replace").splitlines()[-LOG_LINES:]
        except OSError as exc:
            lines = [f"(unreadable: {exc})"]
        print(f"-- {log} (last {LOG_LINES} lines)", file=out)
        print("\n".join(lines), file=out)


def report(nodeid: str, started: float) -> None:
    out = _OUT[0] if _OUT else sys.__stderr__
    print(f"\n==== {nodeid} still running after {time.monotonic() - started:.0f} s: where it is ====", file=out, flush=True)
    faulthandler.dump_traceback(file=out, all_threads=True)
    for part in (_processes, _stack_logs):
        try:
            part(out)
        except Exception as exc:  # noqa: BLE001 - a report must never break the run it reports on
            print(f"({part.__name__} failed: {exc})", file=out)
    print(f"==== end of the report on {nodeid} ====", file=out, flush=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    done, started = threading.Event(), time.monotonic()

    def watch() -> None:
        while not done.wait(HANG_S):
            report(item.nodeid, started)

    threading.Thread(target=watch, name="hang-report", daemon=True).start()
    try:
        yield
    finally:
        done.set()
