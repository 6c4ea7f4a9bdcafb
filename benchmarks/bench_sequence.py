"""Benchmark 4, the sequence of runs (the paper's claim), on real Fashion-MNIST.

Run 1 trains from scratch and is the teacher. Then a sweep of runs (different seeds) is trained in several arms with
the same budget: from scratch, online KD from run 1, cached KD from run 1, and cached KD only for the first 25% / 50%
of training. A second table varies the number of stored views. Arms are interleaved seed by seed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from rich.table import Table

from _common import OUT, console, record, show
from logitcache import TrainConfig, build_cache, specs, train
from logitcache.demo import plot_runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--sweep", type=int, default=4, help="runs in the sweep (seeds 1..N)")
    ap.add_argument("--model", default="small-resnet8-w8")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="run 1's budget (default: --epochs)")
    ap.add_argument("--kd-weight", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run, not recorded")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.epochs, args.sweep = 1000, 2, 1
    out = OUT / "sequence"
    common = dict(
        dataset="fashion-mnist",
        model=args.model,
        epochs=args.epochs,
        limit=args.samples,
        lr=0.05,
        workers=args.workers,
        overwrite=True,
        progress=False,
    )

    console.print("[bold]run 1 (teacher) from scratch")
    teacher_epochs = args.teacher_epochs or args.epochs
    run1 = train(TrainConfig(out=str(out / "run1"), seed=0, **{**common, "epochs": teacher_epochs}))
    kd_options = {"kd_weight": args.kd_weight, "temperature": args.temperature}
    reference = run1.final_accuracy
    ds = specs.resolve_dataset("fashion-mnist", limit=args.samples)
    tf, _ = specs.resolve_augment("pad-crop-flip", ds)
    teacher = specs.resolve_teacher(run1.run_dir)
    caches, build_seconds = {}, {}
    for views in sorted({1, 2, args.epochs}):
        start = time.perf_counter()
        caches[views] = build_cache(
            teacher,
            ds,
            out / f"cache-v{views}",
            augment=tf,
            views=views,
            encoding="full",
            workers=args.workers,
            overwrite=True,
            progress=False,
            specs={"augment": "pad-crop-flip", "dataset": "fashion-mnist"},
        )
        build_seconds[views] = time.perf_counter() - start

    full = str(caches[args.epochs].path)
    arms = {
        "scratch": dict(kd="none"),
        "online KD": dict(kd="online", teacher=run1.run_dir, **kd_options),
        "cached KD": dict(kd="cached", cache=full, **kd_options),
        "cached KD, first 25%": dict(kd="cached", cache=full, kd_until=0.25, **kd_options),
        "cached KD, first 50%": dict(kd="cached", cache=full, kd_until=0.5, **kd_options),
    }
    view_arms = {
        f"cached KD, {v} view{'s' if v > 1 else ''}": dict(kd="cached", cache=str(caches[v].path), **kd_options)
        for v in sorted(caches)
        if v != args.epochs
    }
    results: dict[str, list] = {name: [] for name in [*arms, *view_arms]}
    seeds = list(range(1, args.sweep + 1))
    for seed in seeds:
        names = list(arms) + list(view_arms)
        order = names[seed % len(names) :] + names[: seed % len(names)]
        for name in order:
            kw = arms.get(name) or view_arms[name]
            console.print(f"seed {seed}: {name}")
            results[name].append(
                train(
                    TrainConfig(
                        out=str(out / f"{name.replace(' ', '_')}-{seed}"),
                        seed=seed,
                        target_accuracy=reference,
                        **common,
                        **kw,
                    )
                )
            )

    def summarize(title: str, names: list[str]) -> str:
        table = Table(title=title)
        for col in (
            "arm",
            "final acc (mean +- sd)",
            "reached target",
            "epochs to target",
            "s to target",
            "teacher fwd (train)",
            "sweep cost s (+build)",
        ):
            table.add_column(col, justify="right")
        for name in names:
            runs = results[name]
            accs = [r.final_accuracy for r in runs]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            reached = [r for r in runs if r.target_epoch]
            # a run that never reaches the target counts as epochs + 1 (a lower bound on what it would need)
            epochs_to = statistics.mean([r.target_epoch or args.epochs + 1 for r in runs])
            secs = statistics.mean([r.target_seconds for r in reached]) if reached else float("nan")
            cost = sum(r.metrics[-1]["wall_seconds"] for r in runs)
            cache_views = (
                args.epochs
                if "cached" in name and "view" not in name
                else int(name.split(", ")[1].split()[0])
                if "view" in name
                else None
            )
            build = f" (+{build_seconds[cache_views]:.0f})" if cache_views else ""
            table.add_row(
                name,
                f"{statistics.mean(accs):.4f} +- {sd:.4f}",
                f"{len(reached)}/{len(runs)}",
                f"{epochs_to:.2f}",
                f"{secs:.1f}",
                f"{sum(r.teacher_forwards for r in runs):,}",
                f"{cost:.0f}{build}",
            )
        return show(table)

    text = [
        f"run 1 (teacher, seed 0, {teacher_epochs} epochs): final test accuracy {reference:.4f} = the target; sweep: "
        f"{args.samples} images, {args.epochs} epochs, {args.model}, lr 0.05, T={args.temperature:g}, "
        f"KD weight {args.kd_weight:g}",
        summarize(f"sweep of {len(seeds)} runs (seeds {seeds}), same budget", list(arms)),
        summarize("number of stored views (cached KD, whole training)", [*view_arms, "cached KD"]),
    ]
    text.append("epochs to target: mean over the sweep; a run that never reaches it counts as epochs + 1")
    curves = {}
    for name in arms:
        runs = results[name]
        curves[name] = [
            {
                "wall_seconds": statistics.mean(r.metrics[e]["wall_seconds"] for r in runs),
                "test_accuracy": statistics.mean(r.metrics[e]["test_accuracy"] for r in runs),
            }
            for e in range(args.epochs)
        ]
    plot = Path(__file__).parent / "sequence_accuracy_vs_time.png"
    if not args.quick and plot_runs(curves, plot, "Fashion-MNIST sweep: mean test accuracy vs wall time", reference):
        text.append(f"plot: benchmarks/{plot.name}")
    record("Sequence of runs (bench_sequence.py)", "\n".join(text), args.quick)


if __name__ == "__main__":
    main()
