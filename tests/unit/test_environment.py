"""The pinned environment: torch is the CPU build, the lock is complete, and re-running set-up is a no-op."""

import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_torch_is_the_pinned_cpu_build():
    assert torch.__version__.startswith("2.13.0")
    assert not torch.cuda.is_available() or torch.version.cuda is None


def test_lock_pins_every_line_exactly():
    lines = [ln for ln in (ROOT / "requirements.lock").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines, "empty lock"
    loose = [ln for ln in lines if "==" not in ln]
    assert loose == []
    assert not any(ln.startswith("torch==") for ln in lines), "torch is installed first, by the Makefile"


def test_second_make_venv_installs_nothing():
    # `make -q` exits 0 only when the target is up to date, i.e. the run would do nothing.
    result = subprocess.run(["make", "-q", "venv"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
