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
from typing import Any

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
    full_epochs: int  # run 1's budget
    scratch_budgets: tuple[float, ...]  # fractions of the full budget trained from scratch (1.0 among them)
    kd_budgets: tuple[float, ...]  # fractions of the full budget trained with cached KD
    online_budget: float
    seeds: tuple[int, ...]  # seeds of run 2 (run 1 is seed 0)
    eval_every: int


# The regime of benchmarks/bench_sequence.py and bench_recipe.py (10,000 images, 8 epochs), so that the demo shows
# a small, honest slice of what RESULTS.md measures. About 12 minutes on 2 CPU cores.
FULL = DemoPlan(10000, "small-resnet8-w8", 8, (0.5, 0.75, 1.0), (0.5, 0.75), 0.5, (1, 2), 2)
QUICK = DemoPlan(500, "small-resnet8-w8", 4, (0.5, 1.0), (0.5,), 0.5, (1,), 2)


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
        f"[bold]4/4 run 2 with KD from run 1 at {_fractions(plan.kd_budgets)} of the budget (complete schedules)"
    )
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
    table = Table(
        title=f"Fashion-MNIST, {plan.limit} training images, {plan.model}; target = run 1's accuracy {target:.4f} "
        f"after {plan.full_epochs} epochs"
    )
    columns = ("run", "budget", "epochs", "final acc per seed", "mean", "vs scratch", "reaches target",
               "train s", "teacher fwd")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="right" if col != "run" else "left", no_wrap=True)
    table.add_row("run 1 (teacher)", "1", str(plan.full_epochs), f"{target:.4f}", f"{target:.4f}", "-", "-",
                  f"{run1.metrics[-1]['wall_seconds']:.0f}", "0")  # fmt: skip
    summary = {
        "target": target,
        "full_epochs": plan.full_epochs,
        "build_seconds": round(build_seconds, 2),
        "build_teacher_forwards": cache.num_views * cache.num_samples,
        "arms": {},
    }
    for epochs in sorted({e for arm in (scratch, cached, online) for e in arm.finals}):
        for arm in (scratch, cached, online):
            if epochs not in arm.finals:
                continue
            forwards, mean = sum(arm.forwards[epochs]), arm.mean(epochs)
            versus = (mean - scratch.mean(epochs)) * 100 if arm is not scratch and epochs in scratch.finals else None
            table.add_row(
                arm.name,
                f"{epochs / plan.full_epochs:.2g}",
                str(epochs),
                " ".join(f"{a:.4f}" for a in arm.finals[epochs]),
                f"{mean:.4f}",
                f"{versus:+.2f} pp" if versus is not None else "-",
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
    # A log file gets 80 columns, which would truncate the figures: print the table at least 140 wide.
    Console(file=console.file, width=max(console.width, 140)).print(table)
    gains = {e: (cached.mean(e) - scratch.mean(e)) * 100 for e in sorted(cached.finals) if e in scratch.finals}
    summary["cached_minus_scratch_pp"] = {str(e): round(g, 2) for e, g in gains.items()}
    if gains:
        colour = "bold green" if all(g > 0 for g in gains.values()) else "bold yellow"
        console.print(
            f"[{colour}]at the same budget, cached KD finishes "
            + ", ".join(f"{g:+.2f} pp at {e / plan.full_epochs:.2g}x" for e, g in gains.items())
            + f" against training from scratch (mean of {len(plan.seeds)} seeds), with no teacher forward pass "
            "during training[/]",
            highlight=False,
        )
    to_target = cached.epochs_to(target)
    sweep_target = scratch.mean(plan.full_epochs)
    summary["cached_epochs_to_target"] = to_target
    summary["scratch_full_budget_mean"] = sweep_target
    if to_target:
        console.print(
            f"[bold green]cached KD reaches run 1's accuracy at {to_target / plan.full_epochs:.2g}x the budget "
            f"({to_target} of {plan.full_epochs} epochs: {plan.full_epochs / to_target:.1f}x sooner)[/]",
            highlight=False,
        )
    else:
        best = max(cached.finals, key=cached.mean)
        console.print(
            f"cached KD does not reach run 1's accuracy ({target:.4f}) at a reduced budget here (best: "
            f"{cached.mean(best):.4f} at {best / plan.full_epochs:.2g}x; scratch at the full budget "
            f"{sweep_target:.4f}): in this short regime KD buys accuracy at a given budget, not the full-budget "
            "accuracy sooner (docs/evidence.md, 'What KD buys')",
            highlight=False,
        )
    console.print(
        f"* the teacher ran once, in build: {summary['build_teacher_forwards']:,} forward passes in "
        f"{build_seconds:.1f} s, shared by every later run of the sweep (cache at {cache.path}); online KD runs it "
        "on every training step"
    )
    return summary
