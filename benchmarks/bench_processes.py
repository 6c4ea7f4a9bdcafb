"""Stress: many short cached-KD trainings in every process layout, each under a timeout; counts hangs and failures.

Layouts: torchrun with 2 ranks (gloo) and forked DataLoader workers, and one process with workers started by fork,
spawn and forkserver. Every run reads a real Fashion-MNIST cache with background reads under way when workers start:
even runs hold each view in shared memory and prefetch the next one during the epoch, odd runs read it through the
ring of windows (``--target-memory-mb 0``). The target is 0 hangs and 0 failures.

    python benchmarks/bench_processes.py --runs 50
    python benchmarks/bench_processes.py --runs 30 --layouts torchrun --code /path/to/another/checkout  # compare

``--code`` runs the trainings with another checkout's logitcache (PYTHONPATH), e.g. an earlier commit, to show what
the layout did before a change; every run's outcome and time go to bench-out/processes/runs.jsonl, and the stacks of
a hung run's processes (with py-spy installed) to bench-out/processes/hung-LAYOUT-RUN.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.table import Table

from _common import OUT, console, record, show, trained_teacher

LAYOUTS = ("torchrun", "fork", "spawn", "forkserver")
QUICK_LAYOUTS = ("torchrun", "fork")  # the two kinds: ranks (each with its workers), one process with its workers


def _cache(teacher: str, limit: int) -> Path:
    out = OUT / f"processes-cache-{limit}-64"
    if not (out / "zarr.json").is_file():
        from logitcache import build_cache, specs

        ds = specs.resolve_dataset("fashion-mnist", limit=limit)
        tf, _ = specs.resolve_augment("pad-crop-flip", ds)
        build_cache(specs.resolve_teacher(teacher), ds, out, augment=tf, views=3, encoding="full", chunk_rows=64,
                    overwrite=True, progress=False,
                    specs={"teacher": teacher, "dataset": "fashion-mnist", "augment": "pad-crop-flip"})  # fmt: skip
    return out


def _command(layout: str, cache: Path, run: Path, limit: int, epochs: int, ring: bool, test_limit: int) -> list[str]:
    train = ["train", "--kd", "cached", "--cache", str(cache), "--out", str(run), "--overwrite", "--limit",
             str(limit), "--test-limit", str(test_limit), "--model", "small-resnet8-w4", "--epochs", str(epochs),
             "--batch-size", "128", "--workers", "2", "-q"]  # fmt: skip
    if ring:  # the view over the memory budget: 8 windows of one chunk through a ring of 3
        train += ["--target-memory-mb", "0", "--shuffle-window", "1"]
    if layout == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "-m", "logitcache", *train]  # fmt: skip
    return [sys.executable, "-m", "logitcache", *train, "--start-method", layout]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in sessions of their own, so killing torchrun's process
    group leaves them running: they are found through /proc before anything is killed)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stacks(pids: list[int]) -> str:
    """Python and native stacks of hung processes, when py-spy is installed (the evidence of what a hang waits on)."""
    spy = shutil.which("py-spy")
    if spy is None:
        return "(py-spy not installed: no stacks)"
    dumps = []
    for pid in pids:
        r = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
        dumps.append(r.stdout or r.stderr[-500:])  # whole: the main thread of a stuck process is what matters
        if shutil.which("gdb"):  # native frames py-spy cannot place (a process stuck before its Python threads)
            g = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
                               capture_output=True, text=True, timeout=120)  # fmt: skip
            frames = [ln for ln in g.stdout.splitlines() if ln.startswith(("#", "Thread"))]
            dumps.append(f"gdb {pid}:\n" + "\n".join(frames))
    return "\n".join(dumps)


def _once(cmd: list[str], env: dict, timeout: float, stacks_to: Path, cwd: str | None) -> tuple[str, float, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=cwd)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=timeout)
        outcome = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        below = _descendants(proc.pid)
        stacks_to.write_text(_stacks(below))
        for pid in [proc.pid, *below]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, err = proc.communicate()
        outcome = "hung"
    return outcome, time.perf_counter() - start, (err or "")[-1500:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50, help="Trainings per layout.")
    ap.add_argument("--layouts", help="Comma-separated subset of " + ", ".join(LAYOUTS) + " (default: all; --quick: "
                    + ",".join(QUICK_LAYOUTS) + ")")  # fmt: skip
    ap.add_argument("--limit", type=int, default=512, help="Fashion-MNIST samples per training.")
    ap.add_argument("--epochs", type=int, default=1, help="Epochs per training (workers start once per loader).")
    ap.add_argument("--timeout", type=float, default=120.0, help="Seconds before a run counts as hung.")
    ap.add_argument("--code", help="Run another checkout's logitcache (its root: the runs start there, so that "
                    "`python -m logitcache` imports it, and it is put first on PYTHONPATH).")  # fmt: skip
    ap.add_argument("--test-limit", type=int, default=500, help="Test samples each training evaluates.")
    ap.add_argument("--quick", action="store_true", help="One run of each kind of layout (torchrun ranks through the "
                    "ring; one process with forked workers, the next view prefetched) on 512 samples, not recorded.")
    args = ap.parse_args()
    if args.quick:  # a check that each kind of layout trains and exits, not a stress run (the recorded benchmark is)
        args.runs, args.limit, args.epochs, args.test_limit = 1, 512, 1, 128
    layouts = [x for x in (args.layouts or ",".join(QUICK_LAYOUTS if args.quick else LAYOUTS)).split(",") if x]
    teacher = trained_teacher(limit=2000, epochs=1, model="small-resnet8-w4", quick=args.quick)
    cache = _cache(teacher, args.limit).resolve()  # absolute: with --code the runs start in another folder
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 ranks x (1 + 2 workers) processes share the cores
    if args.code:
        env["PYTHONPATH"] = os.pathsep.join([args.code, env.get("PYTHONPATH", "")])
    log_dir = (OUT / "processes").resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    counts = {layout: {"ok": 0, "failed": 0, "hung": 0, "seconds": []} for layout in layouts}
    with open(log_dir / "runs.jsonl", "a") as log:
        for i in range(args.runs):  # layouts interleaved, so drift on the machine hits all alike
            for k, layout in enumerate(layouts):
                # half the runs through the ring: by run, so each layout takes both paths; quick (one run each): by
                # layout, the first through the ring (torchrun's ring runs met the hangs this benchmark found)
                ring = (i + k + 1 if args.quick else i) % 2 == 1
                cmd = _command(layout, cache, log_dir / f"run-{layout}", args.limit, args.epochs, ring, args.test_limit)
                outcome, seconds, err = _once(cmd, env, args.timeout, log_dir / f"hung-{layout}-{i}.txt", args.code)
                c = counts[layout]
                c[outcome] += 1
                c["seconds"].append(seconds)
                log.write(json.dumps({"layout": layout, "run": i, "ring": ring, "outcome": outcome,
                                      "seconds": round(seconds, 1),
                                      "code": args.code, "stderr": err if outcome != "ok" else ""}) + "\n")  # fmt: skip
                log.flush()
                if outcome != "ok":
                    console.print(f"[red]{layout} run {i}: {outcome}[/] {err.strip().splitlines()[-1:] or ''}")
            console.print(f"[dim]round {i + 1}/{args.runs}: " + ", ".join(
                f"{k} {v['ok']} ok {v['failed']} failed {v['hung']} hung" for k, v in counts.items()))  # fmt: skip
    paths = ("layouts alternately with the next view prefetched and through the ring" if args.quick
             else "half with the next view prefetched, half through the ring")  # fmt: skip
    table = Table(title=f"{args.runs} cached-KD trainings per layout ({args.limit} Fashion-MNIST samples, "
                  f"{args.epochs} epoch(s); {paths}; hung = no exit within {args.timeout:g} s)")  # fmt: skip
    for col in ("layout", "runs", "ok", "failed", "hung", "median s"):
        table.add_column(col, justify="right")
    for layout, c in counts.items():
        s = sorted(c["seconds"])
        table.add_row(layout, str(args.runs), str(c["ok"]), str(c["failed"]), str(c["hung"]), f"{s[len(s) // 2]:.1f}")
    body = show(table) + (f"\ncode: {args.code}" if args.code else "")
    record("Process layouts under stress (bench_processes.py)", body, args.quick)


if __name__ == "__main__":
    main()
