"""Benchmark 2, build throughput: `build_cache` versus a bare loop that runs the same teacher over the same
replayed, augmented loader (same batches, same workers) and throws the outputs away.

The ratio shows how much of encoding, compression and writing is hidden behind the teacher's compute.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.table import Table
from torch.utils.data import DataLoader

from _common import OUT, fashion_mnist, interleaved, median, record, show, timed
from logitcache import build_cache, specs
from logitcache.build import ReplayedViews, plan_batches
from logitcache.store import Layout

HERE = Path(__file__).resolve().parent


def bare_loop(teacher, ds, tf, views: int, batch_size: int, chunk_rows: int, workers: int) -> None:
    layout = Layout(views, len(ds), chunk_rows)
    units = [(v, c) for v in range(views) for c in range(layout.num_chunks)]
    plan = plan_batches(layout, units, batch_size)
    loader = DataLoader(ReplayedViews(ds, tf, 0), batch_sampler=[batch.indices for batch in plan], num_workers=workers)
    with torch.inference_mode():
        for x in loader:
            teacher(x).float().cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run, not recorded")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.reps = 2048, 1

    ds = fashion_mnist(args.samples)
    tf, _ = specs.resolve_augment("pad-crop-flip", ds)
    teacher = specs.resolve_teacher(f"{HERE}/bench_models.py:resnet8_fmnist")
    batch, rows = 256, 1024
    n = args.views * args.samples

    def build(encoding: str) -> float:
        return n / timed(
            lambda: build_cache(
                teacher,
                ds,
                OUT / "build" / encoding,
                augment=tf,
                views=args.views,
                encoding=encoding,
                k=4,
                batch_size=batch,
                chunk_rows=rows,
                workers=args.workers,
                overwrite=True,
                progress=False,
            )
        )

    variants = {
        "bare loop (teacher only)": lambda: (
            n / timed(lambda: bare_loop(teacher, ds, tf, args.views, batch, rows, args.workers))
        ),
        "build, full": lambda: build("full"),
        "build, topk k=4": lambda: build("topk"),
        "build, quantized": lambda: build("quantized"),
    }
    rates = interleaved(variants, args.reps)
    base = median(rates["bare loop (teacher only)"])
    table = Table(
        title=f"build throughput: {args.samples} Fashion-MNIST images x {args.views} views, "
        f"small-resnet8 teacher, {args.workers} workers, {args.reps} reps (medians)"
    )
    for col in ("variant", "samples/s", "throughput / bare loop", "all runs (samples/s)"):
        table.add_column(col, justify="right")
    for name, xs in rates.items():
        table.add_row(name, f"{median(xs):,.0f}", f"{median(xs) / base:.3f}x", ", ".join(f"{x:,.0f}" for x in xs))
    record("Build throughput (bench_build.py)", show(table) + "\ntarget: build >= 0.95x of the bare loop", args.quick)


if __name__ == "__main__":
    main()
