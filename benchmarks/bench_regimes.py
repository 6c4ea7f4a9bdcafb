"""Does KD from the previous run pay in other regimes? (The 10,000-image, 8-epoch regime of
bench_sequence.py does not reach its target at a reduced budget.)

Each regime is "[pairs:]IMAGESxEPOCHS:BUDGETS" on real Fashion-MNIST (10 classes, pad-crop-flip) or, with
"pairs:", the 100-class Fashion-MNIST pairs of bench_fidelity.py (two garments side by side, pad-and-crop), with
small-resnet8-w8, lr 0.05, as in bench_sequence.py: run 1 (seed 0) trains the full budget and is the teacher; one
full-encoding cache of its targets; then, per seed, run 2 from scratch at the full budget and at the budgets, and with
cached KD (each of --recipes, T/weight/until) at the budgets: complete schedules, the methodology of
`logitcache.student.budgets`. The speedup to a target is the full budget over the smallest budget whose mean final
accuracy reaches it.

  - a 3x longer schedule (10,000 images, 24 epochs): nearer convergence, where the literature measures its speedups;
  - half the images (5,000, 8 epochs): where the recipe study saw the largest gain at half the budget;
  - 100 classes (pairs:10000x8): soft targets carry far more than the label when classes are many and related
    (here: which garment is on each side), the case the literature's speedups come from.
Finished runs are reused (`run_once`).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from rich.table import Table

from _common import OUT, cache_for, console, record, run_once, show
from logitcache import TrainConfig
from logitcache.student.budgets import Arm, budget_epochs


HERE = Path(__file__).resolve().parent
# dataset, augmentation, run 1's tag and the cache's name (runs and caches of earlier records keep their names)
DATASETS = {
    "fmnist": ("fashion-mnist", "pad-crop-flip", "run1", "regime-cache-{images}-{epochs}-{views}", "Fashion-MNIST"),
    "pairs": (f"{HERE}/bench_data.py:fmnist_pairs", f"{HERE}/bench_data.py:pairs_augment", "pairs-run1",
              "pairs-cache-{images}-{epochs}", "Fashion-MNIST pairs (100 classes)"),
}  # fmt: skip


def recipe(text: str) -> dict:
    """ "T/weight/until" -> the KD settings (T 2, weight 0.5, KD throughout: the library's recipe when the first
    regimes were measured; kd_until's default is 0.5 since, bench_sequence.py measured the two equal at reduced
    budgets)."""
    t, w, until = (float(x) for x in text.split("/"))
    return dict(kd="cached", temperature=t, kd_weight=w, kd_until=until)


def regime(text: str) -> tuple[str, int, int, list[float]]:
    *data, size, budgets = text.split(":")
    images, epochs = size.split("x")
    return (data[0] if data else "fmnist"), int(images), int(epochs), [float(b) for b in budgets.split(",")]


def study(
    data: str, images: int, epochs: int, budgets: list[float], recipes: list[str], seeds: list[int], quick: bool
) -> str:
    dataset, augment, run1_tag, cache_name, title = DATASETS[data]
    common = dict(
        dataset=dataset, augment=augment, model="small-resnet8-w8", limit=images, workers=0 if quick else 2,
        progress=False, eval_every=10**6, test_limit=256 if quick else None,
    )  # fmt: skip
    console.print(f"[bold]{title}, {images} images, {epochs} epochs: run 1 (the teacher)")
    run1 = run_once(TrainConfig(out="", seed=0, epochs=epochs, lr=0.05, **common), tag=run1_tag)
    views = budget_epochs(epochs, max(budgets))
    cache = OUT / cache_name.format(images=images, epochs=epochs, views=views)
    cache_for(run1.run_dir, dataset, augment, images, views, cache)
    scratch = Arm("scratch")
    kds = [(Arm("cached KD" if len(recipes) == 1 else f"cached KD T/w/until={r}"), recipe(r)) for r in recipes]
    for seed in seeds:
        for arm, fractions, kd in (
            (scratch, sorted({*budgets, 1.0}), {}),
            *((arm, budgets, dict(kw, cache=str(cache))) for arm, kw in kds),
        ):
            for f in fractions:
                e = budget_epochs(epochs, f)
                console.print(f"[dim]{arm.name}: {e} epochs, seed {seed}")
                r = run_once(TrainConfig(out="", seed=seed, epochs=e, lr=0.05, **common, **kd))
                arm.add(e, r.final_accuracy, r.metrics[-1]["wall_seconds"])
    target, full = run1.final_accuracy, scratch.mean(epochs)
    table = Table(title=f"{title}, {images} images, {epochs} epochs = the full budget; seeds {seeds}")
    for col in ("arm", "budget", "epochs", "final acc (mean +- sd)", "per seed", "KD - scratch (pp)", "vs run 1 (pp)"):
        table.add_column(col, justify="right")
    arms = [scratch, *(arm for arm, _ in kds)]
    for arm in arms:
        for e in sorted(arm.finals):
            diff = (arm.mean(e) - scratch.mean(e)) * 100
            table.add_row(
                arm.name, f"{e / epochs:.3g}", str(e), f"{arm.mean(e):.4f} +- {arm.sd(e):.4f}",
                " ".join(f"{a:.4f}" for a in arm.finals[e]), f"{diff:+.2f}" if arm is not scratch else "-",
                f"{(arm.mean(e) - target) * 100:+.2f}",
            )  # fmt: skip
    lines = [show(table)]
    for name, goal in (("run 1's accuracy", target), ("scratch's full-budget accuracy", full)):
        for arm in arms:
            e = arm.epochs_to(goal)
            lines.append(
                f"{arm.name} reaches {name} ({goal:.4f}) at "
                + (f"{e / epochs:.3g}x the budget: {epochs / e:.2f}x sooner" if e else "no budget tried")
            )
    spread = statistics.mean(scratch.sd(e) for e in scratch.finals) * 100
    for arm in arms[1:]:
        gains = ", ".join(f"{(arm.mean(e) - scratch.mean(e)) * 100:+.2f}" for e in arm.finals)
        lines.append(f"{arm.name} - scratch at the reduced budgets: {gains} pp (scratch's sd {spread:.2f} pp)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--regimes", default="10000x24:0.5,0.75 5000x8:0.5,0.625,0.75", help="[pairs:]IMAGESxEPOCHS:BUDGETS ..."
    )
    ap.add_argument("--recipes", default="2/0.5/1", help="cached KD arms, each T/weight/until, comma-separated")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a few seconds' smoke run (one small regime), not recorded")
    args = ap.parse_args()
    if args.quick:
        args.regimes, args.seeds = "pairs:256x2:0.5", 1
    seeds = list(range(1, args.seeds + 1))
    for text in args.regimes.split():
        data, images, epochs, budgets = regime(text)
        body = study(data, images, epochs, budgets, args.recipes.split(","), seeds, args.quick)
        record(f"Regimes: {DATASETS[data][4]}, {images} images, {epochs} epochs (bench_regimes.py)", body, args.quick)


if __name__ == "__main__":
    main()
