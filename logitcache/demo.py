"""The sequence-of-runs demo on real Fashion-MNIST (the README's main command).

Run 1 trains from scratch and becomes the teacher; one ``build`` caches its soft targets; the next run of the
"sweep" (another seed) is then trained four ways with the same budget: no KD, cached KD, cached KD for the first half
of training only, and online KD.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import specs
from .build import build_cache
from .train import RunResult, TrainConfig, train


def plot_runs(runs: dict[str, list[dict]], path: Path, title: str, reference: float | None = None) -> bool:
    """Test accuracy against wall time, one line per run; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, metrics in runs.items():
        ax.plot(
            [0] + [m["wall_seconds"] for m in metrics],
            [0.1] + [m["test_accuracy"] for m in metrics],
            marker="o",
            label=name,
        )
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle=":", label="run 1 accuracy")
    lows = [m["test_accuracy"] for ms in runs.values() for m in ms]
    top = max(lows + ([reference] if reference is not None else []))
    ax.set_ylim(max(0.0, min(lows) - 0.05), min(1.0, top + 0.02))
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_demo(
    out: str | Path = "demo-out", *, quick: bool = False, workers: int = 2, console: Console | None = None
) -> dict:
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    limit, epochs, model = (2000, 2, "small-resnet8-w8") if quick else (20000, 5, "small-resnet8")
    # lr 0.05: at 0.1 single runs are noisy enough mid-training to hide the arms' differences
    common = dict(
        dataset="fashion-mnist", model=model, epochs=epochs, limit=limit, workers=workers, overwrite=True, lr=0.05
    )

    console.rule(f"[bold]1/3 run 1 from scratch: the teacher ({model}, {epochs} epochs, {limit} images)")
    teacher_run = train(TrainConfig(out=str(out / "run1-teacher"), seed=0, **common))
    reference = teacher_run.final_accuracy

    # 10 classes: all logits (20 B/sample) cost what top-4 would; see benchmarks/ for top-k on many classes
    console.rule(f"[bold]2/3 build: run 1 labels {epochs} augmented views of every image, once")
    dataset = specs.resolve_dataset("fashion-mnist", limit=limit)
    augment, _ = specs.resolve_augment("pad-crop-flip", dataset)
    import time

    start = time.perf_counter()
    cache = build_cache(
        specs.resolve_teacher(teacher_run.run_dir),
        dataset,
        out / "cache",
        augment=augment,
        views=epochs,
        encoding="full",
        workers=workers,
        overwrite=True,
        specs={"teacher": teacher_run.run_dir, "dataset": "fashion-mnist", "augment": "pad-crop-flip"},
    )
    build_seconds = time.perf_counter() - start

    console.rule("[bold]3/3 run 2 of the sweep (seed 1), four ways, same budget")
    # "cached, first 50%": KD only early in training, the cheap schedule the literature recommends.
    variants = {
        "none": {"kd": "none"},
        "cached": {"kd": "cached"},
        "cached, first 50%": {"kd": "cached", "kd_until": 0.5},
        "online": {"kd": "online"},
    }
    arms: dict[str, RunResult] = {}
    for name, kw in variants.items():
        console.print(f"[bold]run 2, kd {name}")
        arms[name] = train(
            TrainConfig(
                out=str(out / f"run2-kd-{name.replace(', ', '-').replace(' ', '').replace('%', '')}"),
                seed=1,
                cache=str(out / "cache"),
                teacher=teacher_run.run_dir,
                target_accuracy=reference,
                **kw,
                **common,
            )
        )

    table = Table(
        title=f"Fashion-MNIST, {limit} training images, {epochs} epochs, target = run 1's accuracy {reference:.4f}"
    )
    table.add_column("run", no_wrap=True)
    table.add_column("test acc by epoch", no_wrap=True)  # the early-epoch lead is the point: keep it whole
    for col in ("epochs to target", "s to target", "train wall s", "teacher fwd"):
        table.add_column(col, justify="right")
    rows = [("run 1 (teacher)", teacher_run)] + [(f"run 2, kd {k}", r) for k, r in arms.items()]
    summary = {
        "reference_accuracy": reference,
        "build_seconds": round(build_seconds, 2),
        "build_teacher_forwards": cache.num_views * cache.num_samples,
        "runs": {},
    }
    for name, r in rows:
        total = r.metrics[-1]["wall_seconds"]
        fwd = r.teacher_forwards
        fwd_text = f"{fwd:,}" if "cached" not in name else "0 *"
        table.add_row(
            name,
            " ".join(f"{m['test_accuracy']:.3f}" for m in r.metrics),
            str(r.target_epoch or "-"),
            f"{r.target_seconds:.1f}" if r.target_seconds else "-",
            f"{total:.1f}",
            fwd_text,
        )
        summary["runs"][name] = {
            "final_accuracy": r.final_accuracy,
            "target_epoch": r.target_epoch,
            "target_seconds": r.target_seconds,
            "wall_seconds": total,
            "teacher_forwards": fwd,
            "run_dir": r.run_dir,
        }
    # A log file gets 80 columns, which would truncate the figures: print the table at least 110 wide.
    Console(file=console.file, width=max(console.width, 110)).print(table)
    console.print(
        f"* cached KD: the teacher ran once, in build: {summary['build_teacher_forwards']:,} forward passes in "
        f"{build_seconds:.1f} s, shared by every later run (cache at {cache.path})"
    )
    plotted = plot_runs(
        {name: r.metrics for name, r in rows},
        out / "accuracy_vs_time.png",
        "Fashion-MNIST: test accuracy vs training time",
        reference,
    )
    console.print(f"plot: {out / 'accuracy_vs_time.png'}" if plotted else "plot skipped: matplotlib not installed")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
