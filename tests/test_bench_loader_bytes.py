"""benchmarks/bench_loader_bytes.py --quick runs end to end (synthetic, a few seconds) and prints sane figures: the
targets a batch carries from the workers are within 2x of the encoding's stored bytes, every figure is finite. No
timing is asserted. Marked ``smoke`` like the other benchmarks' runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.smoke


def test_loader_bytes_quick(tmp_path):
    before = {name: (BENCH / name).read_text() for name in ("RESULTS.md", "RECORDS.md")}
    env = {**os.environ, "LOGITCACHE_BENCH_OUT": str(tmp_path), "COLUMNS": "250", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, str(BENCH / "bench_loader_bytes.py"), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    out = r.stdout
    assert r.returncode == 0, out[-2000:] + r.stderr[-3000:]
    assert "not recorded" in out and "SYNTHETIC" in out and "topk8" in out
    assert not re.findall(r"(?<![\w.])(nan|inf)(?![\w])", out, flags=re.IGNORECASE), "a figure is NaN or infinite"

    pattern = r"targets sent from the workers: (\d+\.\d+) B/sample.*?uncompressed: (\d+) B/sample"
    ((sent, stored),) = re.findall(pattern, out)
    (ratio,) = re.findall(r"sent / stored: (\d+\.\d+)x", out)
    assert 0 < float(sent) and 0 < int(stored)
    assert abs(float(ratio) - float(sent) / int(stored)) < 1e-2
    assert float(ratio) <= 2, f"the batch carries {ratio}x the stored bytes"
    assert float(sent) < 4 * 1000 / 10  # far below a dense float32 row of 1000 classes

    (speed,) = re.findall(r"cached KD / images only: (\d+\.\d+)x", out)
    assert 0.02 < float(speed) < 50
    (loss,) = re.findall(r"KD loss on one batch .*: (-?\d+\.\d+)", out)
    assert 0 <= float(loss) < 100
    assert {name: (BENCH / name).read_text() for name in before} == before  # quick runs never touch the records
