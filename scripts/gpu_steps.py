"""The steps of the prepared GPU session (scripts/gpu_check.sh) that run several `logitcache` commands in one process.

Each subcommand is one step of the session: it runs the `logitcache` command line in this process (one interpreter
start for many commands: a start costs seconds), prints one line per item (``item NAME: ok in S s ...`` or
``item NAME: FAILED ...``) and exits non-zero if any item failed. ``summary`` writes the session's summary file.

The datasets here are SYNTHETIC: random 3x32x32 RGB images with random labels, no real data and nothing to learn
beyond what a teacher memorises. They exist only to give the command line a dataset with 100 or 5,000 classes
(``scripts/gpu_steps.py:synthetic_100`` and ``:synthetic_5000`` as ``--dataset`` specs).

    python scripts/gpu_steps.py kd --classes 100 --encodings full,topk --work /tmp/w --device cuda
    python scripts/gpu_steps.py checks --multi /tmp/w/multi-fp32 --multi-device cpu --work /tmp/w --device cuda
    python scripts/gpu_steps.py options build|train [--quick]     (the torchrun steps' size options)
    python scripts/gpu_steps.py bench-options "benchmarks/bench_step.py --samples 12000" ...
    python scripts/gpu_steps.py summary --steps STEPS.tsv --logs DIR --out FILE ...

Only the standard library is imported at the top: ``summary``, ``options`` and ``bench-options`` run without torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve()
TRAIN_SAMPLES, TEST_SAMPLES = 2048, 512


class SyntheticImages:
    """SYNTHETIC data: ``n`` random 32x32 RGB images (PIL) with random labels in ``range(classes)``, a fixed function
    of ``seed``. Sample 0 has the last class, so the first N samples of any ``--limit`` span all ``classes`` (the
    number of classes of a run is its largest label + 1)."""

    def __init__(self, classes: int, n: int, seed: int):
        import numpy as np

        g = np.random.default_rng(seed)
        self.images = g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = g.integers(0, classes, n).astype(np.int64)
        self.targets[0] = classes - 1

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        if not 0 <= i < len(self.targets):
            raise IndexError(i)
        return Image.fromarray(self.images[i], mode="RGB"), int(self.targets[i])


def synthetic(classes: int, train: bool = True) -> SyntheticImages:
    return SyntheticImages(classes, TRAIN_SAMPLES if train else TEST_SAMPLES, seed=classes * 2 + (0 if train else 1))


def synthetic_100(train: bool = True) -> SyntheticImages:
    """SYNTHETIC: 2,048 (test: 512) random 3x32x32 images, labels in range(100)."""
    return synthetic(100, train)


def synthetic_5000(train: bool = True) -> SyntheticImages:
    """SYNTHETIC: 2,048 (test: 512) random 3x32x32 images, labels in range(5000)."""
    return synthetic(5000, train)


def spec(classes: int) -> str:
    if classes not in (100, 5000):
        raise SystemExit(f"synthetic datasets have 100 or 5000 classes, not {classes}")
    return f"{HERE}:synthetic_{classes}"


# Sizes: on a GPU, the synthetic set in full; --quick, toy sizes for the CPU dry run.
SIZES = {
    False: dict(limit=2048, test_limit=512, epochs=2, views=2, chunk_rows=512, batch=128, workers=4,
                model="small-resnet8"),
    True: dict(limit=256, test_limit=64, epochs=1, views=2, chunk_rows=64, batch=64, workers=0,
               model="small-resnet8-w8"),
}  # fmt: skip


def encoding_options(encoding: str, classes: int) -> list[str]:
    """sampled: draws at the training temperature (T = 2, which training checks); topk8 above 4096 classes: the flat
    tail (a C x C tail table is refused there)."""
    if encoding == "sampled":
        return ["--tau", "2.0"]
    if encoding == "topk8" and classes > 4096:
        return ["--tail-shape", "flat"]
    return []


class Failed(Exception):
    pass


def cli(*args: object) -> None:
    """``logitcache ARGS`` in this process; raises ``Failed`` on a non-zero exit."""
    from logitcache.cli import app

    argv = [str(a) for a in args]
    print("$ logitcache " + " ".join(argv), flush=True)
    try:
        code = app(argv, prog_name="logitcache", standalone_mode=False)
    except SystemExit as e:
        code = e.code
    if code not in (None, 0):
        raise Failed(f"logitcache {argv[0]} exited {code}")


class Items:
    """One line per item with its status and seconds; the step fails if any item did."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            detail = fn(*args, **kwargs)
        except Exception as e:  # one item's failure is reported and the others still run
            traceback.print_exc()
            sys.stdout.flush()
            print(f"item {name}: FAILED in {time.perf_counter() - start:.1f} s: {type(e).__name__}: {e}", flush=True)
            self.failed.append(name)
            return None
        print(f"item {name}: ok in {time.perf_counter() - start:.1f} s" + (f"; {detail}" if detail else ""), flush=True)
        return True

    def exit(self) -> None:
        if self.failed:
            print(f"failed: {', '.join(self.failed)}", flush=True)
            raise SystemExit(1)


def common_data(classes: int, size: dict) -> list[object]:
    return ["--dataset", spec(classes), "--limit", size["limit"]]


def teacher(work: Path, classes: int, size: dict, device: str) -> Path:
    out = work / f"teacher-{classes}"
    if not (out / "model.safetensors").is_file():
        cli("train", "--out", out, *common_data(classes, size), "--test-limit", size["test_limit"], "--epochs", 1,
            "--model", size["model"], "--batch-size", size["batch"], "--workers", size["workers"], "--device", device,
            "--overwrite", "--quiet")  # fmt: skip
    return out


def build(teacher_dir: Path, out: Path, classes: int, size: dict, device: str, encoding: str, *extra: object) -> Path:
    cli("build", "--teacher", teacher_dir, *common_data(classes, size), "--out", out, "--encoding", encoding,
        "--views", size["views"], "--chunk-rows", size["chunk_rows"], "--batch-size", size["batch"],
        "--workers", size["workers"], "--device", device, "--overwrite", "--quiet",
        *encoding_options(encoding, classes), *extra)  # fmt: skip
    return out


class SyncDebugProbe:
    """Counts the trainer's ``torch.cuda.set_sync_debug_mode("error")`` calls during a run: on a GPU, a run under
    LOGITCACHE_SYNC_DEBUG=error that never turned the mode on has proved nothing about host syncs."""

    def __enter__(self) -> "SyncDebugProbe":
        import torch

        self.cuda, self.original, self.count = torch.cuda, torch.cuda.set_sync_debug_mode, 0

        def counting(mode):
            self.count += mode in ("error", 2)
            return self.original(mode)

        self.cuda.set_sync_debug_mode = counting
        return self

    def __exit__(self, *exc: object) -> None:
        self.cuda.set_sync_debug_mode = self.original


def train_cached(cache: Path, out: Path, size: dict, device: str, *extra: object) -> str:
    with SyncDebugProbe() as probe:
        cli("train", "--out", out, "--kd", "cached", "--cache", cache, "--epochs", size["epochs"],
            "--test-limit", size["test_limit"], "--model", size["model"], "--batch-size", size["batch"],
            "--workers", size["workers"], "--device", device, "--overwrite", "--quiet", *extra)  # fmt: skip
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    detail = f"{last['samples_per_second']:.0f} samples/s, test acc {last['test_accuracy']:.4f}"
    if device == "cuda" and os.environ.get("LOGITCACHE_SYNC_DEBUG") == "error":
        if not probe.count:
            raise Failed("LOGITCACHE_SYNC_DEBUG=error is set but the trainer never set CUDA's sync debug mode")
        detail += f"; sync debug 'error' turned on {probe.count} times, no host sync raised"
    return detail


def megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def cmd_kd(a: argparse.Namespace) -> None:
    """A teacher on the synthetic C-class set, then per encoding a build and a cached-KD training run."""
    size, work, items = SIZES[a.quick], Path(a.work), Items()
    t = work / f"teacher-{a.classes}"

    def train_teacher() -> str:
        teacher(work, a.classes, size, a.device)
        return f"{size['model']}, {size['limit']} samples, 1 epoch"

    if not items.run(f"teacher-{a.classes}", train_teacher):
        items.exit()
    for enc in a.encodings.split(","):
        cache = work / f"cache-{a.classes}-{enc}"

        def one(enc=enc, cache=cache) -> str:
            start = time.perf_counter()
            build(t, cache, a.classes, size, a.device, enc)
            built = f"build {time.perf_counter() - start:.1f} s ({megabytes(cache):.2f} MB); "
            return built + train_cached(cache, work / f"student-{a.classes}-{enc}", size, a.device)

        items.run(f"kd-{a.classes}-{enc}", one)
    items.exit()


def compare(a: Path, b: Path, exact: bool) -> str:
    """Every array of two stores: bitwise equal, or (unless ``exact``) float fields within 1e-2 and integer fields
    equal in at least 99% of rows, as float rounding of host and device can move a boundary; raises otherwise."""
    import numpy as np
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names_a, names_b = sorted(n for n, _ in ga.arrays()), sorted(n for n, _ in gb.arrays())
    if names_a != names_b:
        raise Failed(f"different arrays: {names_a} vs {names_b}")
    same, near = [], []
    for name in names_a:
        x, y = ga[name][...], gb[name][...]
        if x.dtype != y.dtype or x.shape != y.shape:
            raise Failed(f"{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
        if x.tobytes() == y.tobytes():
            same.append(name)
            continue
        if exact or name in ("labels", "complete"):
            raise Failed(f"{name} differs")
        if np.issubdtype(x.dtype, np.floating):
            diff = float(np.nanmax(np.abs(x.astype(np.float64) - y.astype(np.float64))))
            if not np.allclose(x.astype(np.float64), y.astype(np.float64), atol=1e-2, rtol=1e-2, equal_nan=True):
                raise Failed(f"{name}: max |difference| {diff:.3g} beyond 1e-2")
            near.append(f"{name} (max diff {diff:.2g})")
        elif name == "digests":
            near.append("digests (follow the fields)")
        else:
            rows = (x.reshape(len(x), -1) == y.reshape(len(y), -1)).all(1).mean() if len(x) else 1.0
            if rows < 0.99:
                raise Failed(f"{name}: only {rows:.2%} of rows equal")
            near.append(f"{name} ({rows:.2%} rows equal)")
    if not near:
        return f"all {len(same)} arrays bitwise equal ({', '.join(same)})"
    return f"bitwise: {', '.join(same)}; within rounding: {', '.join(near)}"


def cmd_checks(a: argparse.Namespace) -> None:
    """A single-process build equal to the torchrun build (every array, bitwise); topk built with --encode-on device
    equal to --encode-on host; a topk build and a cached-KD run at each reduced precision."""
    size, work, items = SIZES[a.quick], Path(a.work), Items()

    def single_equal() -> str:
        t = work / "teacher-100"
        single = build(t, work / "single-fp32", 100, size, a.multi_device, "topk", "--precision", "fp32")
        return "single-process build == torchrun build: " + compare(single, Path(a.multi), exact=True)

    items.run(f"single-eq-torchrun-{a.multi_device}", single_equal)
    for classes in (int(c) for c in a.encode_classes.split(",") if c):

        def encode_equal(classes=classes) -> str:
            t = teacher(work, classes, size, a.device)
            stores = [build(t, work / f"encode-{classes}-{side}", classes, size, a.device, "topk", "--encode-on", side,
                            "--precision", "fp32") for side in ("host", "device")]  # fmt: skip
            return compare(*stores, exact=False)

        items.run(f"encode-device-eq-host-{classes}", encode_equal)
    for p in (p for p in a.precisions.split(",") if p):

        def precision(p=p) -> str:
            t = teacher(work, 100, size, a.device)
            cache = build(t, work / f"cache-100-topk-{p}", 100, size, a.device, "topk", "--precision", p)
            return train_cached(cache, work / f"student-100-{p}", size, a.device, "--precision", p)

        items.run(f"precision-{p}", precision)
    items.exit()


def cmd_options(a: argparse.Namespace) -> None:
    """The size options of the torchrun steps, one a line: the same sizes as this file's builds and runs."""
    size = SIZES[a.quick]
    opts: list[object] = ["--limit", size["limit"], "--batch-size", size["batch"], "--workers", size["workers"]]
    if a.command == "build":
        opts += ["--dataset", spec(100), "--views", size["views"], "--chunk-rows", size["chunk_rows"]]
    else:
        opts += ["--epochs", size["epochs"], "--test-limit", size["test_limit"], "--model", size["model"]]
    print("\n".join(str(o) for o in opts))


def cmd_bench_options(a: argparse.Namespace) -> None:
    """Every option a benchmark command line uses is one its parser declares (read from its source, no import)."""
    bad = []
    for command in a.commands:
        script, *opts = command.split()
        known = set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', Path(script).read_text()))
        unknown = [o for o in opts if o.startswith("--") and o not in known]
        bad += unknown
        print(f"{Path(script).name}: {' '.join(o for o in opts if o.startswith('--'))}: "
              + (f"UNKNOWN {' '.join(unknown)}" if unknown else "all declared"))  # fmt: skip
    if bad:
        raise SystemExit(1)


# Key figures: lines of each step's log worth reading first, by step name prefix.
KEY_LINES = {
    "gpu-tests": r"(passed|failed|skipped|error)",
    "kd-": r"^item ",
    "checks": r"^item ",
    "torchrun-build": r"(done:|error)",
    "torchrun-train": r"(^\s*[│|]\s*\d+\s*[│|]|error)",
    "build-throughput": r"(bare loop|build,|target:)",
    "step-overhead": r"(KD|overhead|target)",
    "sequence-study": r"(reaches|sweep cost|^\s*[│|]\s*(scratch|cached|online|0\.)|Fashion-MNIST,)",
    "bench-options": r"\.py:",
}


def cmd_summary(a: argparse.Namespace) -> None:
    """The summary file: machine, steps with status and seconds, notes, and each step's key lines."""
    logs = Path(a.logs)
    rows = [line.split("\t") for line in Path(a.steps).read_text().splitlines() if line.strip()]
    lines = [f"logitcache prepared GPU session: part {a.part}, --device {a.device}" + (" --quick" if a.quick else ""),
             f"finished {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {a.elapsed} s in all (steps' budget {a.budget} s)",
             "", "machine:"]  # fmt: skip
    machine = Path(a.machine)
    lines += ["  " + line for line in (machine.read_text().splitlines() if machine.is_file() else ["(not recorded)"])]
    lines += ["", "steps (status, seconds, limit):"]
    width = max((len(r[0]) for r in rows), default=10)
    for name, status, seconds, limit in rows:
        timing = f"{seconds:>5} s  (limit {limit} s)" if limit != "0" else ""
        lines.append(f"  {name:<{width}}  {status:<24} {timing}".rstrip())
    notes = Path(a.notes)
    if notes.is_file() and notes.read_text().strip():
        lines += ["", "notes:"] + ["  " + line for line in notes.read_text().splitlines()]
    lines += ["", "key figures (from the logs in the tar):"]
    for name, status, _, _ in rows:
        log = logs / f"{name}.log"
        if not log.is_file():
            continue
        pattern = next((p for prefix, p in KEY_LINES.items() if name.startswith(prefix)), None)
        text = log.read_text(errors="replace").splitlines()
        picked = [t.rstrip() for t in text if pattern and re.search(pattern, t)]
        if status != "ok":  # a failed step: its last lines say why
            picked = picked[-10:] + ["  (log tail)"] + [t.rstrip() for t in text[-15:]]
        if picked:
            lines.append(f"  [{name}]")
            lines += ["    " + t[:200] for t in picked[-40:]]
    Path(a.out).write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def step(name: str, fn, **extra):
        p = sub.add_parser(name, help=fn.__doc__)
        p.set_defaults(fn=fn)
        p.add_argument("--work", required=True, help="scratch folder (teachers, stores, runs)")
        p.add_argument("--device", default="cuda")
        p.add_argument("--quick", action="store_true", help="toy sizes (the CPU dry run)")
        for flag, kw in extra.items():
            p.add_argument("--" + flag.replace("_", "-"), **kw)

    step("kd", cmd_kd, classes=dict(type=int, required=True), encodings=dict(required=True))
    step("checks", cmd_checks, multi=dict(required=True, help="the torchrun build's store"),
         multi_device=dict(default="cpu", help="the device of the torchrun build's ranks"),
         encode_classes=dict(default="100,5000"), precisions=dict(default="bf16,fp16"))  # fmt: skip
    p = sub.add_parser("options", help=cmd_options.__doc__)
    p.set_defaults(fn=cmd_options)
    p.add_argument("command", choices=("build", "train"))
    p.add_argument("--quick", action="store_true")
    p = sub.add_parser("bench-options", help=cmd_bench_options.__doc__)
    p.set_defaults(fn=cmd_bench_options)
    p.add_argument("commands", nargs="+", help="'SCRIPT --option value ...', one argument per command")
    p = sub.add_parser("summary", help=cmd_summary.__doc__)
    p.set_defaults(fn=cmd_summary)
    for flag in ("steps", "logs", "machine", "notes", "out", "part", "device", "elapsed", "budget"):
        p.add_argument("--" + flag, required=True)
    p.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
