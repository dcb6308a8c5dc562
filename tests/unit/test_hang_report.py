"""The suite's hang report: a test past its time says where it is, on the terminal, and still passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_test_past_the_limit_gets_its_stack_and_the_busiest_processes_on_stderr_and_still_passes(tmp_path):
    waiting = tmp_path / "test_waiting.py"
    # Waits on an event that is never set: a stand-in for a call that does not come back in time.
    waiting.write_text("import threading\n\ndef test_waits_on_a_server():\n    threading.Event().wait(2.5)\n")
    conftest = tmp_path / "conftest.py"
    conftest.write_text('pytest_plugins = ["tests.hang_report"]\n')
    env = {**os.environ, "ONCOSERVE_TEST_HANG_S": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                          "-o", "addopts=", str(waiting)], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = run.stderr
    assert "test_waiting.py::test_waits_on_a_server still running after" in report
    assert 'test_waiting.py", line 4 in test_waits_on_a_server' in report  # the stuck test's own frame
    assert "-- busiest processes" in report and "end of the report" in report
