"""Benchmark 1, step overhead: training throughput (loader + step) with no KD, cached KD, and online KD.

Every variant trains the same student (small-resnet8) on real Fashion-MNIST for 2 epochs through
`logitcache.student.loop`; the second epoch's images/s is the measurement (the first pays for worker start-up).
Variants are interleaved in rotating order, repeated, and compared by median ratios.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from _common import OUT, fashion_mnist, interleaved, median, record, show
from logitcache import TrainConfig, build_cache, specs, train

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=12000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="a few seconds' smoke run (512 images), not recorded")
    args = ap.parse_args()
    if args.quick:  # 8 steps in the measured epoch: cached KD stays within 2x of no KD on a busy machine (0.7-1.2x)
        args.samples, args.reps, args.batch_size = 512, 1, 64

    out = OUT / "step"
    ds = fashion_mnist(args.samples)
    tf, _ = specs.resolve_augment("pad-crop-flip", ds)
    same, large = f"{HERE}/bench_models.py:resnet8_fmnist", f"{HERE}/bench_models.py:resnet20_fmnist"
    cache = build_cache(
        specs.resolve_teacher(same),
        ds,
        out / "cache",
        augment=tf,
        views=2,
        encoding="full",
        overwrite=True,
        progress=False,
        specs={"augment": "pad-crop-flip"},
    )
    common = dict(
        dataset="fashion-mnist",
        model="small-resnet8",
        epochs=2,
        limit=args.samples,
        test_limit=256,
        eval_every=2 if args.quick else 1,  # quick: evaluated once, at the end (not part of the measured time)
        workers=args.workers,
        batch_size=args.batch_size,
        overwrite=True,
        progress=False,
        seed=0,
    )

    def run(name: str, **kw) -> float:
        result = train(TrainConfig(out=str(out / name), **common, **kw))
        return result.metrics[1]["samples_per_second"]

    variants = {
        "no KD": lambda: run("none"),
        "cached KD": lambda: run("cached", kd="cached", cache=str(cache.path)),
        "online KD, same teacher": lambda: run("online-same", kd="online", teacher=same),
        "online KD, 3x teacher": lambda: run("online-large", kd="online", teacher=large),
    }
    rates = interleaved(variants, args.reps)
    base = median(rates["no KD"])
    table = Table(
        title=f"step overhead: {args.samples} Fashion-MNIST images/epoch, small-resnet8 student, "
        f"batch {args.batch_size}, {args.workers} workers, {args.reps} reps (medians)"
    )
    for col in ("variant", "images/s", "time / no-KD time", "all runs (images/s)"):
        table.add_column(col, justify="right")
    for name, xs in rates.items():
        table.add_row(name, f"{median(xs):,.0f}", f"{base / median(xs):.3f}x", ", ".join(f"{x:,.0f}" for x in xs))
    text = show(table)
    t_none, t_cached = 1 / base, 1 / median(rates["cached KD"])
    lines = []
    for teacher in ("online KD, same teacher", "online KD, 3x teacher"):
        t_online = 1 / median(rates[teacher])
        overhead = f"{teacher}: overhead {t_online / t_none - 1:+.1%}"
        if t_online > t_none:
            removed = 1 - (t_cached - t_none) / (t_online - t_none)
            lines.append(f"{overhead}; the cache removes {removed:.1%} of it")
        else:  # a teacher this cheap next to the noise of the runs: nothing measurable to remove
            lines.append(f"{overhead}: no overhead measured, so nothing for the cache to remove")
    lines.append(f"cached KD: {t_cached / t_none:.3f}x the time of no KD (target <= 1.02x)")
    for line in lines:
        print(line)
    record("Step overhead (bench_step.py)", text + "\n" + "\n".join(lines), args.quick)


if __name__ == "__main__":
    main()
