"""The prepared GPU session runs end to end: both parts' CPU dry run (toy sizes, gloo ranks) in the suite."""

import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke
ROOT = Path(__file__).resolve().parents[1]

# Every step of each part, in order, and those the CPU dry run skips (it says why).
PARTS = {
    "correctness": (["gpu-tests", "kd-100", "kd-5000", "torchrun-build", "torchrun-train", "checks"], {"gpu-tests"}),
    "measure": (["bench-options", "build-throughput", "step-overhead", "sequence-study"],
                {"step-overhead", "sequence-study"}),
}  # fmt: skip
STEP_LINE = re.compile(r"^([a-z0-9-]+): (ok in (\d+) s|skipped \(.+\)|.+ in \d+ s)$")


@pytest.mark.parametrize("part", list(PARTS))
def test_the_gpu_session_runs_on_the_cpu(tmp_path, part):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    env = {**os.environ, "PY": sys.executable, "OUT": str(out), "SCRATCH": str(scratch), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--part", part, "--device", "cpu", "--quick"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    print(f"{part}: {time.perf_counter() - start:.1f} s\n{r.stdout}")
    summary_file = out / f"summary-{part}.txt"
    summary = summary_file.read_text() if summary_file.exists() else "(no summary)"
    assert r.returncode == 0, summary[-4000:] + r.stdout[-2000:] + r.stderr[-2000:]

    steps = {m[1]: m[2] for m in map(STEP_LINE.match, r.stdout.splitlines()) if m}
    names, skipped = PARTS[part]
    assert list(steps) == names, r.stdout
    for name, status in steps.items():  # every step ran and printed its time, but those the dry run skips
        assert status.startswith("skipped (") if name in skipped else re.fullmatch(r"ok in \d+ s", status), name

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert f"summary-{part}.txt" in files and f"logs-{part}.tar.gz" in files and len(files) <= 8, files
    assert set(files) <= {f"summary-{part}.txt", f"logs-{part}.tar.gz", f"RECORDS-{part}.diff"}, files
    for name in names:
        assert re.search(rf"^  {name} +(ok|skipped)", summary, re.M), (name, summary)
    assert "machine:" in summary and "notes:" in summary and "key figures" in summary
    with tarfile.open(out / f"logs-{part}.tar.gz") as tar:
        logged = set(tar.getnames())
    assert {"logs/steps.tsv", "logs/machine.txt"} <= logged
    assert {f"logs/{name}.log" for name in names if name not in skipped} <= logged, logged
    assert not scratch.exists()  # scratch data is removed; only $OUT remains

    if part == "correctness":  # the multi-rank build equals the single-process one, and each KD item ran
        assert "single-process build == torchrun build: all " in summary and "arrays bitwise equal" in summary
        assert len(re.findall(r"item kd-\d+-\w+: ok", summary)) == 4
    else:  # the records the benchmark appended come back as a diff that applies to benchmarks/RECORDS.md
        diff = (out / "RECORDS-measure.diff").read_text()
        assert diff.startswith("--- a/benchmarks/RECORDS.md") and "+## Build throughput" in diff
        assert "`python benchmarks/bench_build.py --samples 64" in diff
