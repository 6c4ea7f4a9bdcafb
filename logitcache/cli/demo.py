"""The sequence-of-runs demo on real Fashion-MNIST (the README's main command).

Run 1 trains from scratch and becomes the teacher; one ``build`` caches its soft targets. The next run of the sweep
is then trained at half the budget (a complete schedule, ``logitcache.student.budgets``) from scratch and with
cached KD, for several seeds, each seed paired across the two arms (the same initial weights and data order), so the
lift is measured on paired differences and stated with its spread: a 95% interval from the seeds. Online KD for two of
the seeds shows the same result with a teacher forward pass per step. KD uses the library's defaults (``TrainConfig``).
The accuracies move with the machine (another CPU's float rounding is another training run); the teacher passes, the
build's cost and the comparison's method do not.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from logitcache import specs
from logitcache.student.budgets import Arm, budget_epochs, paired_lift, plot_budgets
from logitcache.teacher.build import build_cache
from logitcache.student.loop import RunResult, TrainConfig, train


@dataclass(frozen=True)
class DemoPlan:
    limit: int  # training images (the first N of Fashion-MNIST's training set)
    model: str
    full_epochs: int  # run 1's budget
    scratch_budgets: tuple[float, ...]  # fractions of the full budget trained from scratch (1.0 among them)
    kd_budgets: tuple[float, ...]  # fractions of the full budget trained with cached KD
    online_budget: float
    seeds: tuple[int, ...]  # seeds of run 2 (run 1 is seed 0), each trained from scratch and with cached KD
    online_seeds: tuple[int, ...]  # the seeds also trained with online KD
    eval_every: int
    test_limit: int | None = None  # test images scored (the first N; None: all 10,000)


# The regime of benchmarks/bench_sequence.py and bench_recipe.py (10,000 images, 8 epochs), so that the demo shows
# a small, honest slice of what RESULTS.md measures: its time goes to seeds at one budget, since a lift is only a
# result when it stands outside the seeds' spread. About 10 minutes on 2 idle CPU cores. The quick plan checks that
# every stage runs and reports (its accuracies are a few hundred images' worth of training: noise).
FULL = DemoPlan(10000, "small-resnet8-w8", 8, (0.5,), (0.5,), 0.5, (1, 2, 3, 4, 5, 6), (1, 2), 4)
QUICK = DemoPlan(500, "small-resnet8-w8", 2, (0.5, 1.0), (0.5,), 0.5, (1, 2), (1,), 1, test_limit=500)


def run_demo(
    out: str | Path = "demo-out", *, quick: bool = False, workers: int = 2, console: Console | None = None
) -> dict:
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = QUICK if quick else FULL
    common: dict[str, Any] = dict(
        dataset="fashion-mnist",
        lr=0.05,  # the benchmarks' learning rate (at 0.1 these short runs are noisier)
        model=plan.model,
        limit=plan.limit,
        workers=workers,
        overwrite=True,
        eval_every=plan.eval_every,
        test_limit=plan.test_limit,
    )

    console.rule(
        f"[bold]1/4 run 1 from scratch, the full budget: {plan.full_epochs} epochs ({plan.model}, {plan.limit} images)"
    )
    run1 = train(TrainConfig(out=str(out / "run1"), seed=0, epochs=plan.full_epochs, **common))
    target = run1.final_accuracy

    views = budget_epochs(plan.full_epochs, max(plan.kd_budgets + (plan.online_budget,)))
    console.rule(f"[bold]2/4 build: run 1 labels {views} augmented views of every image, once")
    dataset = specs.resolve_dataset("fashion-mnist", limit=plan.limit)
    augment, _ = specs.resolve_augment("pad-crop-flip", dataset)
    start = time.perf_counter()
    # 10 classes: all logits (20 B/sample) cost what top-4 would; top-k pays off with many classes
    cache = build_cache(
        specs.resolve_teacher(run1.run_dir),
        dataset,
        out / "cache",
        augment=augment,
        views=views,
        encoding="full",
        workers=workers,
        overwrite=True,
        specs={"teacher": run1.run_dir, "dataset": "fashion-mnist", "augment": "pad-crop-flip"},
    )
    build_seconds = time.perf_counter() - start

    scratch, cached, online = Arm("run 2 from scratch"), Arm("run 2, cached KD"), Arm("run 2, online KD")

    def run2(arm: Arm, fraction: float, seed: int, **kw) -> None:
        epochs = budget_epochs(plan.full_epochs, fraction)
        console.print(f"[bold]{arm.name}[/], budget {fraction:g} ({epochs} epochs), seed {seed}")
        tag = arm.name.split(", ")[-1].replace(" ", "-")
        r = train(
            TrainConfig(out=str(out / f"run2-{tag}-b{fraction:g}-s{seed}"), seed=seed, epochs=epochs, **kw, **common)
        )
        arm.add(epochs, r.final_accuracy, r.metrics[-1]["wall_seconds"], r.teacher_forwards)

    console.rule(
        f"[bold]3/4 run 2 from scratch at {_fractions(plan.scratch_budgets)} of the budget (seeds {list(plan.seeds)})"
    )
    for seed in plan.seeds:
        for fraction in plan.scratch_budgets:
            run2(scratch, fraction, seed)
    console.rule(
        f"[bold]4/4 run 2 with KD from run 1 at {_fractions(plan.kd_budgets)} of the budget (the same seeds)"
    )
    for seed in plan.seeds:
        for fraction in plan.kd_budgets:
            run2(cached, fraction, seed, kd="cached", cache=str(out / "cache"))
    for seed in plan.online_seeds:
        run2(online, plan.online_budget, seed, kd="online", teacher=run1.run_dir)

    summary = _report(console, plan, run1, target, scratch, cached, online, build_seconds, cache)
    plotted = plot_budgets(
        [scratch, cached, online],
        out / "accuracy_vs_budget.png",
        f"Fashion-MNIST ({plan.limit} images): final accuracy vs budget",
        target,
        plan.full_epochs,
    )
    console.print(f"plot: {out / 'accuracy_vs_budget.png'}" if plotted else "plot skipped: matplotlib not installed")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _fractions(budgets: tuple[float, ...]) -> str:
    return ", ".join(f"{b:g}" for b in budgets)


def _report(
    console: Console,
    plan: DemoPlan,
    run1: RunResult,
    target: float,
    scratch: Arm,
    cached: Arm,
    online: Arm,
    build_seconds: float,
    cache,
) -> dict:
    table = Table(title=f"Fashion-MNIST, {plan.limit:,} images, {plan.model}, run 1 = {plan.full_epochs} epochs")
    columns = ("run", "budget", "seeds", "final accuracy", "vs scratch", "teacher fwd", "s/run")
    for col in columns:
        table.add_column(col, justify="right" if col != "run" else "left")
    table.add_row("run 1 (teacher)", "1", "1", f"{target:.4f}", "-", "0", f"{run1.metrics[-1]['wall_seconds']:.0f}")
    summary: dict[str, Any] = {
        "target": target,
        "full_epochs": plan.full_epochs,
        "build_seconds": round(build_seconds, 2),
        "build_teacher_forwards": cache.num_views * cache.num_samples,
        "arms": {},
        "lift": {},
    }
    for epochs in sorted({e for arm in (scratch, cached, online) for e in arm.finals}):
        for arm in (scratch, cached, online):
            if epochs not in arm.finals:
                continue
            n, forwards = len(arm.finals[epochs]), sum(arm.forwards[epochs])
            lift = paired_lift(scratch.finals.get(epochs, []), arm.finals[epochs]) if arm is not scratch else None
            table.add_row(
                arm.name.removeprefix("run 2").lstrip(", ").replace("from ", "") or arm.name,
                f"{epochs / plan.full_epochs:.2g}",
                str(n),
                f"{arm.mean(epochs):.4f} ± {arm.sd(epochs):.4f}" if n > 1 else f"{arm.mean(epochs):.4f}",
                lift.text() if lift is not None else "-",
                f"{forwards:,}" if arm is online else "0 *" if arm is cached else "0",
                f"{statistics.mean(arm.seconds[epochs]):.0f}",
            )
            summary["arms"].setdefault(arm.name, {})[str(epochs)] = {
                "finals": arm.finals[epochs],
                "mean": arm.mean(epochs),
                "sd": arm.sd(epochs),
                "seconds": arm.seconds[epochs],
                "teacher_forwards": forwards,
            }
            if lift is not None:
                summary["lift"].setdefault(arm.name, {})[str(epochs)] = lift.as_dict()
    # a log file gets 80 columns, which would wrap the figures: the table is printed at least 110 wide
    Console(file=console.file, width=max(console.width, 110)).print(table)
    console.print("mean ± sd over seeds; vs scratch: mean paired difference [95% interval] (same seeds)")
    for epochs, lift in ((e, paired_lift(scratch.finals[e], cached.finals[e])) for e in sorted(cached.finals)):
        if epochs not in scratch.finals:
            continue
        where = f"at {epochs / plan.full_epochs:.2g}x the budget"
        if lift.n < 2:
            verdict = f"cached KD {lift.mean:+.2f} pp {where} (one seed: no spread to judge it by)"
        elif lift.low > 0:
            verdict = f"cached KD is ahead of scratch {where}: {lift.text()}, outside the seeds' spread"
        elif lift.high < 0:
            verdict = f"cached KD is behind scratch {where}: {lift.text()}, outside the seeds' spread"
        else:
            verdict = f"cached KD vs scratch {where}: {lift.text()}: not established (the interval holds 0)"
        console.print(f"[bold]{verdict}[/]", highlight=False)
    console.print(
        f"* the teacher ran once, in build: {summary['build_teacher_forwards']:,} forward passes in "
        f"{build_seconds:.1f} s, shared by every later run (cache at {cache.path}); online KD runs it every step"
    )
    return summary
