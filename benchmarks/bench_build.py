"""Benchmark 2, build throughput: `build_cache` versus a bare loop that runs the same teacher over the same
replayed, augmented loader (same batches, same workers) and throws the outputs away.

The ratio shows how much of encoding, compression and writing is hidden behind the teacher's compute. With
``--precisions fp32,bf16`` the bare loop and the full build also run in bf16 autocast, to show what bf16 does on this
machine's device. ``--encode-on auto,device`` builds full and topk targets both ways: ``auto`` (on a CPU the writer
thread encodes beside the teacher; on a GPU the device encodes) and ``device`` (the encoding right after each unit's
last batch, on the teacher's device, its fields copied to the host while the next batch runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.table import Table
from torch.utils.data import DataLoader

from _common import OUT, fashion_mnist, interleaved, median, record, show, timed
from logitcache import build_cache, specs
from logitcache.teacher.build import ReplayedViews, plan_batches
from logitcache.compute import Compute
from logitcache.store import Layout

HERE = Path(__file__).resolve().parent


def bare_loop(teacher, ds, tf, views: int, batch_size: int, chunk_rows: int, workers: int, compute: Compute) -> None:
    layout = Layout(views, len(ds), chunk_rows)
    units = [(v, c) for v in range(views) for c in range(layout.num_chunks)]
    plan = plan_batches(layout, units, batch_size)
    # pinned and copied without blocking, as the build's teacher pass does: the ratio compares like with like
    pin = compute.device.type == "cuda"
    batches = [batch.indices for batch in plan]
    loader = DataLoader(ReplayedViews(ds, tf, 0), batch_sampler=batches, num_workers=workers, pin_memory=pin)
    with torch.inference_mode(), compute.autocast():
        for x in loader:
            teacher(compute.inputs(x)).float().cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16", help="Teacher precisions of the bare loop and the full build.")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda.")
    ap.add_argument(
        "--encode-on", default="auto,device", help="Where the full and topk builds encode (build --encode-on)."
    )
    ap.add_argument("--quick", action="store_true", help="a few seconds' smoke run (every variant, 512 images, one "
                    "view), not recorded")  # fmt: skip
    args = ap.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]
    sides = [e for e in args.encode_on.split(",") if e]
    if args.quick:
        args.samples, args.views, args.reps = 512, 1, 1

    ds = fashion_mnist(args.samples)
    tf, _ = specs.resolve_augment("pad-crop-flip", ds)
    teacher = specs.resolve_teacher(f"{HERE}/bench_models.py:resnet8_fmnist")
    batch, rows = 256, 1024
    n = args.views * args.samples

    def build(encoding: str, precision: str = "fp32", encode_on: str = "auto") -> float:
        return n / timed(
            lambda: build_cache(
                teacher,
                ds,
                OUT / "build" / f"{encoding}-{precision}-{encode_on}",
                augment=tf,
                views=args.views,
                encoding=encoding,
                k=4,
                batch_size=batch,
                chunk_rows=rows,
                workers=args.workers,
                overwrite=True,
                progress=False,
                precision=precision,
                device=args.device,
                encode_on=encode_on,
            )
        )

    device = specs.resolve_device(args.device)
    teacher = teacher.to(device)

    def bare(precision: str) -> float:
        compute = Compute(device, precision)
        return n / timed(lambda: bare_loop(teacher, ds, tf, args.views, batch, rows, args.workers, compute))

    variants, same = {}, {}
    for p in precisions:
        variants[f"bare loop (teacher only), {p}"] = lambda p=p: bare(p)
        variants[f"build, full, {p}"] = lambda p=p: build("full", p)
        same[f"bare loop (teacher only), {p}"] = same[f"build, full, {p}"] = f"bare loop (teacher only), {p}"
    for enc, label in (("topk", "build, topk k=4, fp32"), ("quantized", "build, quantized, fp32")):
        variants[label] = lambda enc=enc: build(enc)
    for side in (s for s in sides if s != "auto"):
        for enc, label in (("full", "build, full, fp32"), ("topk", "build, topk k=4, fp32")):
            variants[f"{label}, encode on {side}"] = lambda enc=enc, side=side: build(enc, "fp32", side)
    for label in variants:
        same.setdefault(label, "bare loop (teacher only), fp32")
    rates = interleaved(variants, args.reps)
    fp32 = median(rates["bare loop (teacher only), fp32"]) if "fp32" in precisions else None
    table = Table(
        title=f"build throughput: {args.samples} Fashion-MNIST images x {args.views} views, "
        f"small-resnet8 teacher, {args.workers} workers, {args.reps} reps (medians), {device.type}"
    )
    for col in ("variant", "samples/s", "/ bare loop, same precision", "/ bare loop, fp32", "all runs (samples/s)"):
        table.add_column(col, justify="right")
    for name, xs in rates.items():
        base = median(rates[same[name]]) if same[name] in rates else float("nan")
        table.add_row(name, f"{median(xs):,.0f}", f"{median(xs) / base:.3f}x",
                      f"{median(xs) / fp32:.3f}x" if fp32 else "-", ", ".join(f"{x:,.0f}" for x in xs))  # fmt: skip
    record("Build throughput (bench_build.py)", show(table) + "\ntarget: build >= 0.95x of the bare loop", args.quick)


if __name__ == "__main__":
    main()
