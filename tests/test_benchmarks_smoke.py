"""Every benchmark's --quick mode runs end to end (real Fashion-MNIST; bench_scale.py and bench_loader_bytes.py are
synthetic by design) and prints sane figures: no NaN, ratios finite and in range, the read amplification a path
promises. No timing is asserted. The runs share one output folder, so the quick teacher (`_common.QUICK_TEACHER`) is
trained once for all of them. Marked ``smoke``: ``pytest -m "not smoke"`` is the fast inner loop; the README's test
command runs everything.

A quick mode is a check that the script runs, in seconds, not a small benchmark: every part of every script, at a few
hundred images, one repetition, the fewest runs and child processes that take each part's code (the recorded runs in
RESULTS.md are the measurements). What the quick runs still prove: every figure is finite and every ratio in range;
bench_scale's paths read what they promise (the ring and a one-view store each row once, a store of several views
each view and the next, on disk and on the object store); bench_step prints its cached-KD-to-no-KD ratio (one quick
repetition is not a timing to bound); bench_processes's trainings under torchrun (through the ring) and in one
process with forked workers (the next view prefetched) all finish, none failed or hung; bench_sequence's runs learn
(accuracy above chance); bench_loader_bytes's batches carry the targets within 2x of the encoding's stored bytes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.smoke
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py") if p.name not in ("bench_models.py", "bench_data.py"))


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-out")  # shared: trained_teacher() and run_once() reuse what is there


def _cells(out: str, row_label: str) -> list[list[str]]:
    """The cells of every table row of ``out`` whose text holds ``row_label``."""
    rows = [line for line in out.splitlines() if "│" in line and row_label in line]
    return [[c.strip() for c in line.split("│")[1:-1]] for line in rows]


def _sane(script: str, out: str) -> None:
    assert not re.findall(r"(?<![\w.])(nan|inf)(?![\w])", out, flags=re.IGNORECASE), "a figure is NaN or infinite"
    for ratio in re.findall(r"(?<![\w.])(\d+\.\d+)x\b", out):
        assert 0.02 < float(ratio) < 50, f"ratio {ratio}x out of range"
    if script == "bench_scale.py":  # the reads each path promises
        # in the tables with a "read ampl." column (the sixth): the ring and a one-view store read each row once; a
        # store of several views is read once per view plus the next view, prefetched during the epoch
        ring = [r[5] for r in _cells(out, "chunk shuffle + ring") if len(r) in (7, 9)]
        shared = [(r[0], r[5]) for r in _cells(out, "shared view") if len(r) in (7, 9)]
        assert ring and all(a == "1.00" for a in ring), ring
        assert shared and all(
            a == ("1.00" if "x1 view" in label or "units" in label else "2.00") for label, a in shared
        ), shared
    if script == "bench_step.py":
        # the line is printed (its ratio in the sane range above); one quick repetition is no timing to bound
        assert len(re.findall(r"cached KD: (\d+\.\d+)x the time of no KD", out)) == 1, out[-2000:]
    if script == "bench_processes.py":  # every layout's runs finished: some ok, none failed, none hung
        last = [line for line in out.splitlines() if line.startswith("round ")][-1]
        counts = re.findall(r"(\w+) (\d+) ok (\d+) failed (\d+) hung", last)
        assert counts and all(int(ok) > 0 and failed == hung == "0" for _, ok, failed, hung in counts), last
    if script == "bench_loader_bytes.py":  # a batch carries the encoding's compact targets, not dense rows
        assert "SYNTHETIC" in out and "topk8" in out
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
    if script == "bench_sequence.py":
        accs = [float(a) for a in re.findall(r"(?<![\d.+-])[01]\.\d{4}\b", out)]  # accuracies, unsigned
        assert accs and all(0 <= a <= 1 for a in accs) and max(accs) > 0.1


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_quick_mode(script, bench_out):
    before = {name: (BENCH / name).read_text() for name in ("RESULTS.md", "RECORDS.md")}
    # wide tables: one row a line; one torch thread (tiny tensors, and two threads on a busy machine wait on each other)
    env = {**os.environ, "LOGITCACHE_BENCH_OUT": str(bench_out), "COLUMNS": "250", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=bench_out,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "not recorded" in r.stdout
    _sane(script, r.stdout)
    assert {name: (BENCH / name).read_text() for name in before} == before  # quick runs never touch the records
