"""The prepared GPU session runs end to end: its CPU dry run (toy sizes, gloo ranks) in the suite."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke
ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_session_runs_end_to_end_on_the_cpu(tmp_path):
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "gpu"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)  # fmt: skip
    steps = (tmp_path / "gpu" / "steps.log").read_text() if (tmp_path / "gpu" / "steps.log").exists() else ""
    assert r.returncode == 0, steps + r.stdout[-3000:] + r.stderr[-3000:]
    names = [line.split(":")[0] for line in steps.splitlines()]
    assert names[0] == "1-gpu-tests" and names[-1] == "6-sequence-study" and len(names) == 12
    assert all(": ok in" in line for line in steps.splitlines())
    assert (tmp_path / "gpu" / "machine.txt").exists() and (tmp_path / "gpu" / "student" / "metrics.jsonl").exists()
