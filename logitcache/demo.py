"""The sequence-of-runs demo on real Fashion-MNIST (the README's main command).

Run 1 trains from scratch at the full budget and becomes the teacher; one ``build`` caches its soft targets. The next
run of the sweep is then trained as the literature measures time to accuracy (``logitcache.budgets``): from scratch
at the full budget, and with cached KD as complete schedules at reduced budgets, each for several seeds; online KD at
one budget shows that the cache gives the same result without a teacher forward pass per step. KD uses the library's
defaults (``TrainConfig``), the recipe ``benchmarks/bench_recipe.py`` chose.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import specs
from .budgets import Arm, budget_epochs, plot_budgets
from .build import build_cache
from .train import RunResult, TrainConfig, train


@dataclass(frozen=True)
class DemoPlan:
    limit: int  # training images (the first N of Fashion-MNIST's training set)
    model: str
    full_epochs: int  # run 1's budget, and scratch's
    kd_budgets: tuple[float, ...]  # fractions of the full budget trained with cached KD
    online_budget: float
    seeds: tuple[int, ...]  # seeds of run 2 (run 1 is seed 0)
    eval_every: int


# The regime of benchmarks/bench_sequence.py and bench_recipe.py (10,000 images, 8 epochs), so that the demo shows
# a small, honest slice of what RESULTS.md measures. About 12 minutes on 2 CPU cores.
FULL = DemoPlan(10000, "small-resnet8-w8", 8, (0.5, 0.75, 1.0), 0.5, (1, 2), 2)
QUICK = DemoPlan(500, "small-resnet8-w8", 4, (0.5,), 0.5, (1,), 2)


def run_demo(
    out: str | Path = "demo-out", *, quick: bool = False, workers: int = 2, console: Console | None = None
) -> dict:
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = QUICK if quick else FULL
    common = dict(
        dataset="fashion-mnist",
        lr=0.05,  # the benchmarks' learning rate (at 0.1 these short runs are noisier)
        model=plan.model,
        limit=plan.limit,
        workers=workers,
        overwrite=True,
        eval_every=plan.eval_every,
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

    console.rule(f"[bold]3/4 run 2 from scratch at the full budget (seeds {list(plan.seeds)}): what a sweep pays")
    for seed in plan.seeds:
        run2(scratch, 1.0, seed)
    console.rule("[bold]4/4 run 2 with KD from run 1 at reduced budgets (complete schedules)")
    for seed in plan.seeds:
        for fraction in plan.kd_budgets:
            run2(cached, fraction, seed, kd="cached", cache=str(out / "cache"))
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
    table = Table(
        title=f"Fashion-MNIST, {plan.limit} training images, {plan.model}; target = run 1's accuracy {target:.4f} "
        f"after {plan.full_epochs} epochs"
    )
    for col in (
        "run",
        "budget",
        "epochs",
        "final acc per seed",
        "mean",
        "reaches target",
        "train s (mean)",
        "teacher fwd",
    ):
        table.add_column(col, justify="right" if col != "run" else "left", no_wrap=True)
    table.add_row(
        "run 1 (teacher)",
        "1.0",
        str(plan.full_epochs),
        f"{target:.4f}",
        f"{target:.4f}",
        "-",
        f"{run1.metrics[-1]['wall_seconds']:.0f}",
        "0",
    )
    summary = {
        "target": target,
        "full_epochs": plan.full_epochs,
        "build_seconds": round(build_seconds, 2),
        "build_teacher_forwards": cache.num_views * cache.num_samples,
        "arms": {},
    }
    for arm in (scratch, cached, online):
        for epochs in sorted(arm.finals):
            forwards = sum(arm.forwards[epochs])
            mean = arm.mean(epochs)
            table.add_row(
                arm.name,
                f"{epochs / plan.full_epochs:.2g}",
                str(epochs),
                " ".join(f"{a:.4f}" for a in arm.finals[epochs]),
                f"{mean:.4f}",
                "yes" if mean >= target else f"no ({(mean - target) * 100:+.1f} pp)",
                f"{statistics.mean(arm.seconds[epochs]):.0f}",
                f"{forwards:,}" if arm is online else "0 *",
            )
            summary["arms"].setdefault(arm.name, {})[str(epochs)] = {
                "finals": arm.finals[epochs],
                "mean": mean,
                "seconds": arm.seconds[epochs],
                "teacher_forwards": forwards,
            }
    # A log file gets 80 columns, which would truncate the figures: print the table at least 120 wide.
    Console(file=console.file, width=max(console.width, 120)).print(table)
    epochs = cached.epochs_to(target)
    sweep_target = scratch.mean(plan.full_epochs)
    epochs_sweep = cached.epochs_to(sweep_target)
    summary["cached_epochs_to_target"] = epochs
    summary["scratch_full_budget_mean"] = sweep_target
    if epochs:
        headline = (
            f"cached KD reaches run 1's accuracy at {epochs / plan.full_epochs:.2g}x the budget "
            f"({epochs} of {plan.full_epochs} epochs, mean of {len(plan.seeds)} seeds: "
            f"{plan.full_epochs / epochs:.1f}x sooner)"
        )
    else:
        best = max(cached.finals, key=cached.mean)
        headline = (
            f"cached KD did not reach run 1's accuracy at the budgets tried (best: {cached.mean(best):.4f} at "
            f"{best} epochs)"
        )
    sweep = (
        f"; from-scratch run 2 averages {sweep_target:.4f} at the full budget, which cached KD reaches at "
        f"{epochs_sweep / plan.full_epochs:.2g}x"
        if epochs_sweep
        else f"; from-scratch run 2 averages {sweep_target:.4f} at the full budget"
    )
    saved = bool(epochs and epochs < plan.full_epochs)
    colour = "bold green" if saved else "bold yellow"  # green only for a real saving
    console.print(f"[{colour}]{headline}[/]{sweep}.", highlight=False)
    if plan.full_epochs in cached.finals:
        gain = (cached.mean(plan.full_epochs) - sweep_target) * 100
        console.print(
            f"at the same full budget, cached KD averages {cached.mean(plan.full_epochs):.4f} against "
            f"{sweep_target:.4f} from scratch ({gain:+.2f} pp), for no teacher forward pass during training"
        )
    console.print(
        f"* the teacher ran once, in build: {summary['build_teacher_forwards']:,} forward passes in "
        f"{build_seconds:.1f} s, shared by every later run of the sweep (cache at {cache.path}); online KD runs it "
        "on every training step"
    )
    return summary
