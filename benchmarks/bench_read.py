"""Benchmark 3, the read path.

(a) decode rate per encoding and codec: whole views read from Zarr and decoded to dense probabilities;
(b) the wrapper's DataLoader throughput versus the same replayed augmentation without targets;
(c) the same targets stored as one `torch.save` file per sample (as per-sample caches do): bytes and read rate
    versus the Zarr store, reading every sample of a view in random order;
(d) what checking every unit against its recorded digest (format 3, damage detection) costs a whole-view read.
Targets come from a real (trained) Fashion-MNIST teacher.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil

import torch
from rich.table import Table
from torch.utils.data import DataLoader

from _common import OUT, fashion_mnist, interleaved, median, record, show, timed, trained_teacher
from logitcache import CachedKDDataset, ReplayDataset, build_cache, specs, to_probs


def disk_usage(path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under ``path``."""
    apparent = allocated = 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a few seconds' smoke run (256 samples), not recorded")
    args = ap.parse_args()
    if args.quick:  # every part and store once, on the quick teacher: a check that the script runs
        args.samples, args.reps = 256, 1
    out = OUT / "read"
    ds = fashion_mnist(args.samples)
    tf, _ = specs.resolve_augment("pad-crop-flip", ds)
    teacher = specs.resolve_teacher(trained_teacher(quick=args.quick))
    sections = []

    # (a) decode rates
    caches = {}
    configs = [
        ("full", "blosc-lz4"),
        ("full", "zstd"),
        ("full", "none"),
        ("topk", "blosc-lz4"),
        ("topk", "zstd"),
        ("topk", "none"),
        ("sampled", "blosc-lz4"),
        ("quantized", "blosc-lz4"),
        ("quantized", "zstd"),
    ]
    for enc, codec in configs:
        caches[(enc, codec)] = build_cache(
            teacher,
            ds,
            out / f"{enc}-{codec}",
            augment=tf,
            views=2,
            encoding=enc,
            k=4,
            samples=20,
            codec=codec,
            overwrite=True,
            progress=False,
            specs={"augment": "pad-crop-flip"},
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    table = Table(title=f"(a) decode: whole views of {args.samples} samples, 1 torch thread, medians of {args.reps}")
    for col in ("encoding", "codec", "bytes/sample", "read samples/s", "read+to_probs samples/s"):
        table.add_column(col, justify="right")
    for (enc, codec), cache in caches.items():
        read = [args.samples / timed(lambda: cache.read(1)) for _ in range(args.reps)]
        dec = [
            args.samples / timed(lambda: to_probs(cache.read(1), 1.0, cache=cache))
            for _ in range(args.reps)
        ]
        stored = sum(cache.group[n].nbytes_stored() for n in cache.field_names) / (2 * args.samples)
        table.add_row(enc, codec, f"{stored:.1f}", f"{median(read):,.0f}", f"{median(dec):,.0f}")
    torch.set_num_threads(threads)
    sections.append(show(table))

    # (b) loader throughput with and without targets
    cache = caches[("topk", "blosc-lz4")]

    def epoch(make) -> float:
        ds_ = make()
        ds_.set_epoch(1)
        loader = DataLoader(ds_, batch_size=256, shuffle=True, num_workers=args.workers)
        return args.samples / timed(lambda: [None for _ in loader])

    rates = interleaved(
        {
            "replayed images only": lambda: epoch(lambda: ReplayDataset(ds, tf, seed=0, num_views=2)),
            "CachedKDDataset (images + targets)": lambda: epoch(lambda: CachedKDDataset(ds, cache)),
        },
        args.reps,
    )
    base = median(rates["replayed images only"])
    table = Table(title=f"(b) DataLoader: {args.workers} workers, batch 256, one epoch, medians of {args.reps}")
    for col in ("dataset", "samples/s", "ratio", "all runs"):
        table.add_column(col, justify="right")
    for name, xs in rates.items():
        table.add_row(name, f"{median(xs):,.0f}", f"{median(xs) / base:.3f}x", ", ".join(f"{x:,.0f}" for x in xs))
    sections.append(show(table) + "\ntarget: CachedKDDataset >= 0.97x")

    # (c) per-sample files versus the Zarr store
    per_sample = out / "per-sample-files"
    shutil.rmtree(per_sample, ignore_errors=True)
    per_sample.mkdir(parents=True)
    view = cache.read(1)
    for i in range(args.samples):
        torch.save({k: v[i].clone() for k, v in view.items()}, per_sample / f"{i}.pt")
    order = list(range(args.samples))
    random.Random(0).shuffle(order)

    def read_files() -> float:
        return args.samples / timed(lambda: [torch.load(per_sample / f"{i}.pt", weights_only=True) for i in order])

    def read_zarr_batched() -> float:
        ds_ = CachedKDDataset(ds, cache.path)  # fresh: cold chunk cache
        batches = [order[i : i + 256] for i in range(0, len(order), 256)]  # what a DataLoader's __getitems__ asks
        return args.samples / timed(lambda: [ds_.cached_targets(b, 1) for b in batches])

    def read_zarr_single() -> float:
        ds_ = CachedKDDataset(ds, cache.path)
        return args.samples / timed(lambda: [ds_.target(i, 1) for i in order])

    rates = interleaved(
        {
            "one torch.save file per sample": read_files,
            "Zarr store, batches of 256 (DataLoader)": read_zarr_batched,
            "Zarr store, one sample per call": read_zarr_single,
        },
        args.reps,
    )
    files_bytes = disk_usage(per_sample)
    zarr_bytes = tuple(b // 2 for b in disk_usage(cache.path))  # the store holds 2 views; compare one
    table = Table(title=f"(c) per-sample files vs Zarr: one view of {args.samples} top-4 targets, random order")
    for col in ("storage", "bytes (apparent)", "bytes (allocated)", "samples/s", "all runs"):
        table.add_column(col, justify="right")
    for (name, xs), (app, alloc) in zip(rates.items(), (files_bytes, zarr_bytes, zarr_bytes)):
        table.add_row(name, f"{app:,}", f"{alloc:,}", f"{median(xs):,.0f}", ", ".join(f"{x:,.0f}" for x in xs))
    speed = median(rates["Zarr store, batches of 256 (DataLoader)"]) / median(rates["one torch.save file per sample"])
    sections.append(
        show(table) + f"\nZarr (batched, as a DataLoader reads) {speed:.1f}x faster, "
        f"{files_bytes[1] / zarr_bytes[1]:.1f}x smaller "
        "on disk (allocated); target >= 20x faster, smaller"
    )

    # (d) the digest check on every unit read, on and off, same stores, interleaved
    torch.set_num_threads(1)
    table = Table(
        title=f"(d) digest check: whole views of {args.samples} samples, 1 torch thread, medians of {args.reps}"
    )
    for col in ("encoding", "checked samples/s", "unchecked samples/s", "checked / unchecked"):
        table.add_column(col, justify="right")
    for enc in ("full", "topk", "quantized"):
        cache = caches[(enc, "blosc-lz4")]

        def read_view(check: bool, cache=cache) -> float:
            cache.has_digests = check
            try:
                return args.samples / timed(lambda: cache.read(1))
            finally:
                cache.has_digests = True

        rates = interleaved({"checked": lambda: read_view(True), "unchecked": lambda: read_view(False)}, args.reps)
        on, off = median(rates["checked"]), median(rates["unchecked"])
        table.add_row(enc, f"{on:,.0f}", f"{off:,.0f}", f"{on / off:.3f}x")
    torch.set_num_threads(threads)
    sections.append(show(table) + "\ntarget: the check costs <= 5% of a read (ratio >= 0.95x)")
    record("Read path (bench_read.py)", "\n".join(sections), args.quick)


if __name__ == "__main__":
    main()
