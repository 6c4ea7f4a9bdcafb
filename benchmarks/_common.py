"""Shared plumbing for the benchmarks: real data, interleaved repetitions, medians, and RESULTS.md records."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from logitcache import TrainConfig, specs  # noqa: E402
from logitcache.store.identity import versions  # noqa: E402

RESULTS = Path(__file__).parent / "RESULTS.md"  # curated by question, by hand
RECORDS = Path(__file__).parent / "RECORDS.md"  # every recorded run, appended by record()
OUT = Path(os.environ.get("LOGITCACHE_BENCH_OUT", "bench-out"))
console = Console()

# every core, unless OMP_NUM_THREADS says otherwise (as the CLI reads it): the smoke test runs the quick modes with one
# thread, where two threads on a machine busy with other work wait on each other several times longer than they save
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)


def _memoize_idx_reads() -> None:
    """Read each Fashion-MNIST IDX file once per process: every `train` and `resolve_dataset` call otherwise
    decompresses the whole 47 MB training set again (about 0.3 s each, the bulk of a short run's set-up). The arrays
    are read-only and every reader copies them, so sharing one changes nothing else."""
    import functools

    from logitcache import datasets

    if not hasattr(datasets._read_idx, "cache_info"):
        datasets._read_idx = functools.lru_cache(maxsize=8)(datasets._read_idx)


_memoize_idx_reads()


def fashion_mnist(limit: int | None = None, train: bool = True):
    return specs.resolve_dataset("fashion-mnist", train=train, limit=limit)


def interleaved(variants: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run every variant once per repetition, rotating the order, so drift on a shared machine hits all alike."""
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            out[name].append(variants[name]())
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    v = versions()
    return (
        f"{os.cpu_count()} cores ({cpu}), {gpu}; torch {v['torch']}, torchvision {v['torchvision']}, "
        f"zarr {v['zarr']}, python {v['python']}"
    )


def target_bytes(cache) -> int:
    """Bytes of a cache's targets on disk: the chunk files of its encoding's fields and of its table (topk8's tail
    table, stored once). Not the per-array metadata documents (about 0.7 KB each, whatever the number of samples:
    0.035 B per kept entry at 10,000 samples x 10 entries, nothing at ImageNet's size), nor labels and digests, so
    that bytes per sample are what grows with data."""
    root = Path(cache.path)
    arrays = [*cache.field_names, *(["tail_table"] if cache.encoding.table_shape() else [])]  # topk8's, stored once
    return sum(f.stat().st_size for n in arrays for f in (root / n / "c").rglob("*") if f.is_file())


def show(table: Table) -> str:
    console.print(table)
    rec = Console(record=True, width=140, file=open(os.devnull, "w"))
    rec.print(table)
    return rec.export_text()


def record(title: str, body: str, quick: bool) -> None:
    """Append a result block with the exact command and machine to RECORDS.md (quick runs are not recorded); the
    section of RESULTS.md that answers the benchmark's question is then updated by hand from it."""
    if quick:
        console.print("[dim](--quick: not recorded)")
        return
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"\n## {title}\n\n- date: {stamp}\n- command: `{command}`\n- machine: {machine()}\n\n"
        f"```\n{body.rstrip()}\n```\n"
    )
    with open(RECORDS, "a") as f:
        f.write(block)
    console.print(f"[green]recorded in {RECORDS}[/]; its question's section in {RESULTS.name} cites the latest record")


# --quick runs check that a script runs and prints sane figures, in seconds: their teacher, a narrow small-resnet8,
# trains one epoch on 1,000 images in batches of 32 (about 35% test accuracy: far from chance, so its targets are a
# teacher's), trained once and shared by every quick run (bench_fidelity, bench_read, bench_processes). Quick runs
# train without worker processes where the workers are not what the script measures: at a few batches an epoch,
# starting them costs more than the run.
QUICK_TEACHER = dict(model="small-resnet8-w8", limit=1000, epochs=1, batch_size=32, test_limit=500, workers=0)


def trained_teacher(limit: int = 10000, epochs: int = 2, model: str = "small-resnet8", quick: bool = False) -> str:
    """A real (trained) Fashion-MNIST teacher run directory, trained once and reused by every benchmark; ``quick``:
    the small teacher every --quick run shares (`QUICK_TEACHER`), whatever the other arguments."""
    from logitcache import TrainConfig, train

    settings = dict(QUICK_TEACHER) if quick else dict(model=model, limit=limit, epochs=epochs)
    name = "teacher-quick" if quick else "teacher"
    run_dir = OUT / f"{name}-{settings['model']}-{settings['limit']}-{settings['epochs']}"
    if (
        not (run_dir / "model.safetensors").is_file()
        or len((run_dir / "metrics.jsonl").read_text().splitlines()) < settings["epochs"]
    ):
        console.print(f"[dim]training the benchmark teacher {run_dir} ...")
        train(TrainConfig(out=str(run_dir), overwrite=True, progress=False, lr=0.05, **settings))
    return str(run_dir)


# Settings that do not change what a run computes (a run with other values of these is the same run).
_NOT_IDENTITY = ("out", "overwrite", "progress", "workers", "start_method", "resume", "device", "target_accuracy")
# Fields added after earlier runs were keyed: at these values they change nothing (every benchmark view fits the
# memory budget; no mixing), so they are left out of the key and those runs stay shared.
_NEUTRAL = {
    "target_memory_mb": 4096, "shuffle_window": 8, "mix": None, "mix_alpha": 0.8, "cutmix_alpha": 1.0,
    "mix_prob": 1.0, "switch_prob": 0.5, "precision": "auto", "channels_last": False, "compile": False,
}  # fmt: skip
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


# KD settings do not change a run without KD (so changing their defaults does not orphan the scratch runs).
_KD_ONLY = ("kd_weight", "temperature", "kd_until", "kd_tail", "cache", "teacher")


def run_key(config: dict) -> str:
    """The identity of a run: a hash of the settings that change what it computes."""
    import hashlib
    import json

    ignored = _NOT_IDENTITY + (_KD_ONLY if config.get("kd") == "none" else ())
    settings = {
        k: v
        for k, v in config.items()
        if k not in ignored and k in _TRAIN_FIELDS and not (k in _NEUTRAL and v == _NEUTRAL[k])
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def run_once(cfg, tag: str = ""):
    """Train ``cfg`` under ``OUT/runs/<hash of its settings>``, or reuse that run if it finished earlier.

    Benchmarks share runs this way (run 1 of the recipe study is run 1 of the sequence benchmark), and an interrupted
    study continues where it stopped instead of starting over.
    """
    from logitcache import train
    from logitcache.student.loop import RunResult, load_metrics

    key = run_key(dataclasses.asdict(cfg))
    out = OUT / "runs" / (f"{tag}-{key}" if tag else key)
    try:
        rows = load_metrics(out)
        if len(rows) == cfg.epochs:
            result = RunResult(str(out), rows[-1]["test_accuracy"], rows, teacher_forwards=rows[-1]["teacher_forwards"])
            for row in rows:
                if cfg.target_accuracy is not None and (row["test_accuracy"] or 0) >= cfg.target_accuracy:
                    result.target_epoch, result.target_seconds = row["epoch"], row["wall_seconds"]
                    break
            return result
    except (OSError, ValueError):
        pass
    return train(dataclasses.replace(cfg, out=str(out), overwrite=True))


def cache_for(teacher: str, dataset: str, augment: str, limit: int, views: int, out: Path, mix=None) -> str:
    """A full-encoding cache of ``teacher``'s targets at ``out``, reusing a complete one of the same teacher and mixing
    with at least ``views`` views (the benchmarks' runs are keyed by the cache's path)."""
    from logitcache import build_cache
    from logitcache.augment.mix import Mix

    mix = mix or Mix()
    if (out / "zarr.json").is_file():
        from logitcache import open_cache

        c = open_cache(out)
        # views are a pure function of (seed, view, index): a cache with more views holds the same first ``views``
        same = c.meta.teacher.spec == teacher and c.num_views >= views and c.meta.mix == mix
        if c.is_complete and same:
            return str(out)
    ds = specs.resolve_dataset(dataset, limit=limit)
    tf, _ = specs.resolve_augment(augment, ds)
    build_cache(
        specs.resolve_teacher(teacher),
        ds,
        out,
        augment=tf,
        views=views,
        encoding="full",
        overwrite=True,
        progress=False,
        specs={"teacher": teacher, "dataset": dataset, "augment": augment},
        mix=mix,
    )
    return str(out)
