"""Every benchmark's --quick mode runs end to end (real Fashion-MNIST; bench_scale.py is synthetic by design); no timing
is asserted."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "script", sorted(p.name for p in BENCH.glob("bench_*.py") if p.name not in ("bench_models.py", "bench_data.py"))
)
def test_benchmark_quick_mode(script, tmp_path):
    before = {name: (BENCH / name).read_text() for name in ("RESULTS.md", "RECORDS.md")}
    env = {**os.environ, "LOGITCACHE_BENCH_OUT": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "not recorded" in r.stdout
    assert {name: (BENCH / name).read_text() for name in before} == before  # quick runs never touch the records
