"""Benchmark 4, the sequence of runs (the product's claim), on real Fashion-MNIST, measured as the literature does.

Every arm trains *complete* schedules (warm-up + cosine) at reduced budgets; its time to accuracy is the smallest
budget whose final accuracy, averaged over seeds, reaches the target (`logitcache.student.budgets`).

Part A, the budget curve: run 1 (seed 0, full budget, the teacher); run 2 from scratch at several budgets; run 2 with
cached KD (the library's default recipe: KD for the first half of the steps, as KD early in training works best,
Blakeney et al.) at reduced budgets and the full one; cached KD for all steps at the same budgets; online KD at one
budget. Targets: run 1's accuracy, and
scratch's mean at the full budget.
Part B, a sweep of learning rates (run 1's and three more): each member from scratch at the full budget, and with
cached KD from run 1's one cache at the budget part A found; the sweep's total cost with and without KD, the one
build included.
Part C (--best-teacher), the same sweep run in order as a user runs it, each member distilled from the best run of
the sweep so far (by final test accuracy; run 1 to begin with), one build per new best: against part B's fixed
teacher and against scratch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from rich.table import Table

from _common import OUT, console, record, run_once, show
from logitcache import BuildConfig, TrainConfig, build_cache, specs
from logitcache.student.budgets import Arm, budget_epochs, plot_budgets
from logitcache.sequence.runs import Sequence


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--model", default="small-resnet8-w8")
    ap.add_argument("--epochs", type=int, default=8, help="the full budget (run 1's)")
    ap.add_argument("--lr", type=float, default=0.05, help="run 1's learning rate")
    ap.add_argument("--scratch-budgets", type=floats, default=floats("0.5,0.75,1.0"))
    ap.add_argument("--kd-budgets", type=floats, default=floats("0.5,0.625,0.75,0.875,1.0"))
    ap.add_argument(
        "--throughout-budgets",
        type=floats,
        default=floats("0.5,0.625,0.75,0.875,1.0"),
        help="cached KD for all steps (the default is the first half)",
    )
    ap.add_argument("--online-budget", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sweep-lrs", type=floats, default=floats("0.025,0.1,0.2"), help="the sweep's other members")
    ap.add_argument("--sweep-seeds", type=int, default=2, help="seeds per sweep member (part B)")
    ap.add_argument("--best-teacher", action="store_true", help="part C: each member's teacher is the best run so far")
    ap.add_argument("--eval-every", type=int, default=10**6, help="default: only the final accuracy")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a few seconds' smoke run of every part, not recorded")
    args = ap.parse_args()
    if args.quick:  # every part once on 256 images: a check that the script runs, not a measurement
        args.samples, args.epochs, args.seeds, args.model = 256, 4, 1, "small-resnet8-w8"
        args.workers = 0  # a few batches an epoch: starting worker processes would cost more than the runs
        args.scratch_budgets, args.kd_budgets, args.throughout_budgets, args.sweep_lrs = [1.0], [0.5], [], [0.1]
        args.best_teacher = True
    seeds = list(range(1, args.seeds + 1))
    common = dict(
        dataset="fashion-mnist",
        augment="pad-crop-flip",  # named as bench_recipe.py names it: identical runs are shared (run_once)
        model=args.model,
        limit=args.samples,
        workers=args.workers,
        progress=False,
        eval_every=args.eval_every,
        test_limit=256 if args.quick else None,
        # quick: batches of 32, so that 256 images x 4 epochs are 32 steps, enough to learn (about 35% accuracy)
        **(dict(batch_size=32) if args.quick else {}),
    )

    def trained(arm: Arm, fraction: float, seed: int, lr: float, **kw):
        epochs = budget_epochs(args.epochs, fraction)
        console.print(f"[dim]{arm.name}: {epochs} epochs, seed {seed}")
        r = run_once(TrainConfig(out="", seed=seed, epochs=epochs, lr=lr, **common, **kw))
        arm.add(epochs, r.final_accuracy, r.metrics[-1]["wall_seconds"], r.teacher_forwards)
        return r

    console.print("[bold]run 1 (the teacher) from scratch at the full budget")
    run1 = run_once(TrainConfig(out="", seed=0, epochs=args.epochs, lr=args.lr, **common), tag="run1")
    target = run1.final_accuracy
    views = budget_epochs(args.epochs, max(args.kd_budgets + args.throughout_budgets + [args.online_budget]))
    ds = specs.resolve_dataset("fashion-mnist", limit=args.samples)
    tf, _ = specs.resolve_augment("pad-crop-flip", ds)
    start = time.perf_counter()
    cache = build_cache(
        specs.resolve_teacher(run1.run_dir),
        ds,
        OUT / "sequence-cache",
        augment=tf,
        views=views,
        encoding="full",
        workers=args.workers,
        overwrite=True,
        progress=False,
        specs={"teacher": run1.run_dir, "augment": "pad-crop-flip", "dataset": "fashion-mnist"},
    )
    build_seconds = time.perf_counter() - start
    kd = dict(kd="cached", cache=str(cache.path))  # the library's default recipe (TrainConfig)

    # Part A: the budget curve at run 1's settings
    scratch, cached, online = Arm("scratch"), Arm("cached KD"), Arm("online KD")
    throughout = Arm("cached KD, throughout")  # the default is KD for the first half (kd_until): both are measured
    for seed in seeds:
        for f in args.scratch_budgets:
            trained(scratch, f, seed, args.lr)
        for f in args.kd_budgets:
            trained(cached, f, seed, args.lr, **kd)
        for f in args.throughout_budgets:
            trained(throughout, f, seed, args.lr, **kd, kd_until=1.0)
        trained(online, args.online_budget, seed, args.lr, kd="online", teacher=run1.run_dir)
    full_mean = scratch.mean(args.epochs) if args.epochs in scratch.finals else target

    table = Table(title=f"A. budget curve: final test accuracy, mean +- sd over seeds {seeds}")
    for col in ("arm", "budget", "epochs", "final acc", "vs run 1 (pp)", "vs scratch full (pp)", "teacher fwd/run"):
        table.add_column(col, justify="right")
    for arm in (scratch, cached, throughout, online):
        for e in sorted(arm.finals):
            table.add_row(
                arm.name,
                f"{e / args.epochs:.2f}",
                str(e),
                f"{arm.mean(e):.4f} +- {arm.sd(e):.4f}",
                f"{(arm.mean(e) - target) * 100:+.2f}",
                f"{(arm.mean(e) - full_mean) * 100:+.2f}",
                f"{statistics.mean(arm.forwards[e]):,.0f}",
            )
    lines = [
        f"Fashion-MNIST, {args.samples} images, {args.model}, lr {args.lr:g}, full budget {args.epochs} epochs; run 1 "
        f"(seed 0) = {target:.4f} = target 1; scratch at the full budget = {full_mean:.4f} = target 2; cached KD with "
        f"the default recipe (T={TrainConfig.temperature:g}, weight {TrainConfig.kd_weight:g}, KD for the first "
        f"{TrainConfig.kd_until:g} of steps) from a full-encoding cache of {views} views; build {build_seconds:.1f} s, "
        f"{cache.num_views * cache.num_samples:,} teacher forward passes",
        show(table),
    ]
    for name, goal in (("run 1's accuracy", target), ("scratch's full-budget accuracy", full_mean)):
        for arm in (scratch, cached, throughout):
            e = arm.epochs_to(goal)
            lines.append(
                f"{arm.name} reaches {name} ({goal:.4f}) at "
                + (
                    f"{e / args.epochs:.2f}x the budget ({e} epochs): {args.epochs / e:.2f}x sooner"
                    if e
                    else "no budget tried"
                )
            )
    plot = Path(__file__).parent / "sequence_accuracy_vs_budget.png"
    if not args.quick and plot_budgets(
        [a for a in (scratch, cached, throughout, online) if a.finals],
        plot,
        "Fashion-MNIST: final accuracy vs budget",
        target,
        args.epochs,
    ):
        lines.append(f"plot: benchmarks/{plot.name}")

    # Part B: the sweep. Each member's target is its own from-scratch accuracy at the full budget.
    kd_epochs = cached.epochs_to(min(target, full_mean)) or budget_epochs(args.epochs, max(args.kd_budgets))
    sweep = Table(
        title=f"B. sweep of {1 + len(args.sweep_lrs)} learning rates: scratch at {args.epochs} epochs vs "
        f"cached KD from run 1's cache at {kd_epochs} epochs ({kd_epochs / args.epochs:.2f}x)"
    )
    for col in ("lr", "scratch full budget", "cached KD", "KD - scratch (pp)", "reaches", "scratch s", "KD s"):
        sweep.add_column(col, justify="right")
    cost_scratch = cost_kd = 0.0
    for i, lr in enumerate([args.lr, *args.sweep_lrs]):
        s_arm, k_arm = Arm("scratch"), Arm("cached KD")
        for seed in seeds[: args.sweep_seeds] if i else seeds:  # run 1's member reuses part A's runs
            trained(s_arm, 1.0, seed, lr)
            trained(k_arm, kd_epochs / args.epochs, seed, lr, **kd)
        s, k = s_arm.mean(args.epochs), k_arm.mean(kd_epochs)
        s_sec, k_sec = statistics.mean(s_arm.seconds[args.epochs]), statistics.mean(k_arm.seconds[kd_epochs])
        cost_scratch += s_sec
        cost_kd += s_sec if i == 0 else k_sec  # member 1 is run 1 itself: trained once, in full, as the teacher
        sweep.add_row(
            f"{lr:g}" + (" (run 1's)" if i == 0 else ""),
            f"{s:.4f} +- {s_arm.sd(args.epochs):.4f}",
            f"{k:.4f} +- {k_arm.sd(kd_epochs):.4f}",
            f"{(k - s) * 100:+.2f}",
            "yes" if k >= s else "no",
            f"{s_sec:.0f}",
            f"{k_sec:.0f}",
        )
    cost_kd += build_seconds
    lines += [
        show(sweep),
        f"sweep cost (mean wall s per member, summed): scratch {cost_scratch:.0f} s; with KD {cost_kd:.0f} s "
        f"(run 1 in full + one build {build_seconds:.0f} s + {len(args.sweep_lrs)} members at "
        f"{kd_epochs / args.epochs:.2f}x) = {cost_kd / cost_scratch:.2f}x (target <= 0.70x)",
    ]
    if args.best_teacher:
        lines += best_teacher_sweep(args, seeds, run1, cache, kd_epochs, trained)
    record("Sequence of runs, budget methodology (bench_sequence.py)", "\n".join(lines), args.quick)


def best_teacher_sweep(args, seeds, run1, run1_cache, kd_epochs, trained) -> list[str]:
    """Part C: per seed, the sweep's members in order, each distilled from the best finished run so far: a
    ``logitcache.sequence.runs.Sequence`` (policy ``best``) names the teacher and builds each new teacher's cache
    once."""
    table = Table(title=f"C. the sweep in order, each member distilled from the best run so far, {kd_epochs} epochs")
    cols = (
        "lr",
        "seed",
        "teacher (its acc)",
        "best-so-far KD",
        "run 1 as teacher",
        "scratch full",
        "best - run 1 (pp)",
    )
    for col in cols:
        table.add_column(col, justify="right")
    build = BuildConfig(dataset="fashion-mnist", augment="pad-crop-flip", limit=args.samples,
                        views=run1_cache.num_views, encoding="full", workers=args.workers, progress=False)  # fmt: skip
    diffs, extra_builds = [], 0
    for seed in seeds[: args.sweep_seeds]:
        # one sequence per seed, kept between invocations like the benchmark's runs (members already recorded reused)
        seq = Sequence(OUT / f"sequence-best-{args.samples}-{args.model}-seed{seed}", build=build)
        if seq.member("run1") is None:
            seq.record(run1.run_dir, name="run1")
        for lr in args.sweep_lrs:
            a, b, c = Arm("best"), Arm("run 1"), Arm("scratch")
            (teacher,) = seq.teacher()
            kd = {k: v for k, v in seq.next_run().items() if k in ("kd", "cache")}  # data: the benchmark's own
            member = trained(a, kd_epochs / args.epochs, seed, lr, **kd)
            trained(b, kd_epochs / args.epochs, seed, lr, kd="cached", cache=str(run1_cache.path))
            trained(c, 1.0, seed, lr)
            name = f"lr={lr:g}"
            if seq.member(name) is None:
                seq.record(member.run_dir, name=name, settings={"lr": lr})
            acc = a.mean(kd_epochs)
            diffs.append((acc - b.mean(kd_epochs)) * 100)
            table.add_row(
                f"{lr:g}", str(seed), f"{teacher.name} ({teacher.metric:.4f})", f"{acc:.4f}",
                f"{b.mean(kd_epochs):.4f}", f"{c.mean(args.epochs):.4f}", f"{diffs[-1]:+.2f}",
            )  # fmt: skip
        extra_builds += len(seq.builds) - 1  # run 1's own cache is rebuilt inside the sequence: not an extra teacher
    return [
        show(table),
        f"best-so-far teacher - run 1 as teacher: mean {statistics.mean(diffs):+.2f} pp over {len(diffs)} members "
        f"(builds for new teachers: {extra_builds})",
    ]


if __name__ == "__main__":
    main()
