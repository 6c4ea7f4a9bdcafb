"""Recipe study: which KD settings make the next run of a sequence cheaper, on real Fashion-MNIST.

Method (Blakeney et al., Composer): every arm trains a *complete* schedule (warm-up + cosine) at a reduced budget, and
its final test accuracy (mean over seeds) is compared with training from scratch at the same budget and with the
target, run 1's accuracy at the full budget. Run 1 (seed 0, the full budget) is the teacher, as in a sweep.

Stages, each recorded as it finishes:
  1. screen:   temperature x KD weight x KD window at one budget, cache of run 1 (full encoding, one view per epoch);
  2. teachers: the best screened recipe with other teachers (run 1 trained twice as long; an ensemble of run 1 and
               another full-budget run of the sweep) and other numbers of stored views (1 vs one per epoch);
  3. checks:   the best recipe and the old default against scratch on configurations it was not chosen on
               (half the images, a deeper network, no augmentation), each recorded as it finishes;
  4. mixing:   Mixup/CutMix (--mix both, timm's DeiT alphas 0.8 / 1.0): scratch and cached KD with and without it;
               the mixed arm's cache holds run 1's targets for the mixed images.
Finished runs are reused (`run_once`: same settings, same run), so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

from rich.table import Table

from _common import OUT, cache_for, console, record, run_once, show
from logitcache import TrainConfig
from logitcache.student.budgets import Arm
from logitcache.augment.mix import Mix
from logitcache.student.loop import RunResult


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--model", default="small-resnet8-w8")
    ap.add_argument("--epochs", type=int, default=8, help="the full budget (run 1's and scratch's)")
    ap.add_argument("--budget", type=float, default=0.5, help="fraction of the full budget the arms train for")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--stages", default="screen,teachers,checks,mixing")
    ap.add_argument(
        "--mix-budgets", default="0.5,0.75,1.0", help="stage 4's budgets: accuracy at each, and time to target"
    )
    ap.add_argument("--checks", default="subset,deeper,noaug", help="stage 3's configurations (subset,deeper,noaug)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a few seconds' smoke run of every stage, not recorded")
    args = ap.parse_args()
    if args.quick:  # every stage once, on 256 images, with the fewest runs that take its code: not a study
        args.samples, args.epochs, args.seeds, args.model = 256, 2, 1, "small-resnet8-w8"
        args.mix_budgets = "0.5"  # stage 4 at the arms' budget alone (its time-to-target table still printed)
        args.workers = 0  # a few batches an epoch: starting worker processes would cost more than the runs
    budget_epochs = max(1, round(args.budget * args.epochs))
    out = OUT / "recipe"
    seeds = list(range(1, args.seeds + 1))
    # Only final accuracies matter here: evaluate at the end of each run (evaluation costs more than a short epoch).
    base = dict(dataset="fashion-mnist", lr=args.lr, workers=args.workers, progress=False, eval_every=10**6)
    if args.quick:  # batches of 32: 8 steps an epoch, so that the runs move off chance
        base.update(test_limit=256, batch_size=32)

    def config_of(model: str, limit: int, augment: str) -> dict:
        return dict(base, model=model, limit=limit, augment=augment)

    def time_to_target(arms: dict[str, dict], by_budget: dict[int, dict[str, list[float]]], target: float) -> str:
        """Per arm: mean final accuracy at every budget and the smallest budget whose mean reaches each target."""
        budgets = sorted(by_budget)
        curves = {name: Arm(name) for name in arms}
        for e in budgets:
            for name, accs in by_budget[e].items():
                for acc in accs:
                    curves[name].add(e, acc, 0.0)
        targets = {f"run 1 ({target:.4f})": target}
        if args.epochs in by_budget:
            full = curves["scratch"].mean(args.epochs)
            targets[f"scratch at 1.0x ({full:.4f})"] = full
        table = Table(title=f"time to target: final accuracy (mean of {len(seeds)} seeds) per budget, and speedup")
        table.add_column("arm", justify="right")
        for e in budgets:
            table.add_column(f"{e / args.epochs:.3g}x", justify="right")
        for name in targets:
            table.add_column(f"speedup to {name}", justify="right")
        for name, arm in curves.items():
            speedups = [arm.speedup(t, args.epochs) for t in targets.values()]
            table.add_row(
                name, *(f"{arm.mean(e):.4f}" for e in budgets), *(f"{x:.2f}x" if x else "not reached" for x in speedups)
            )
        return show(table)

    def teacher_run(name: str, conf: dict, epochs: int, seed: int = 0) -> RunResult:
        return run_once(TrainConfig(out="", seed=seed, epochs=epochs, **conf), tag=name.replace("/", "-"))

    def arms_table(
        title: str, conf: dict, tag: str, arms: dict[str, dict], target: float, epochs: int | None = None
    ) -> tuple[str, dict]:
        """Train every arm for every seed (interleaved) at the reduced budget; a table against scratch."""
        finals: dict[str, list[float]] = {name: [] for name in arms}
        for seed in seeds:
            for name, kw in arms.items():
                cfg = TrainConfig(out="", seed=seed, epochs=epochs or budget_epochs, **conf, **kw)
                console.print(f"[dim]{tag}: {name}, seed {seed}")
                finals[name].append(run_once(cfg).final_accuracy)
        table = Table(title=title)
        for col in ("arm", "final acc (mean +- sd)", "vs scratch (paired, pp)", "vs target (pp)", "seeds"):
            table.add_column(col, justify="right")
        scratch = finals.get("scratch")
        for name, accs in finals.items():
            mean = statistics.mean(accs)
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            diff = statistics.mean(a - s for a, s in zip(accs, scratch)) * 100 if scratch else float("nan")
            table.add_row(
                name, f"{mean:.4f} +- {sd:.4f}", f"{diff:+.2f}", f"{(mean - target) * 100:+.2f}", str(len(accs))
            )
        return show(table), finals

    stages = set(args.stages.split(","))
    main_conf = config_of(args.model, args.samples, "pad-crop-flip")
    console.print(f"[bold]run 1 (the teacher): {args.model}, {args.samples} images, {args.epochs} epochs")
    run1 = teacher_run("run1", main_conf, args.epochs)
    target = run1.final_accuracy
    cache1 = cache_for(run1.run_dir, "fashion-mnist", "pad-crop-flip", args.samples, budget_epochs, out / "cache-run1")
    head = (
        f"Fashion-MNIST, {args.samples} images, {args.model}, lr {args.lr:g}; full budget {args.epochs} epochs; arms "
        f"train complete schedules of {budget_epochs} epochs ({budget_epochs / args.epochs:.2f}x); {len(seeds)} seeds "
        f"{seeds}; target = run 1's final accuracy {target:.4f}; cached KD from a full-encoding cache"
    )

    recipes = {"scratch": {"kd": "none"}}
    for t, w, until in itertools.product((1.0, 2.0, 4.0), (0.5, 0.9), (0.5, 1.0)):
        recipes[f"T={t:g} w={w:g} until={until:g}"] = dict(
            kd="cached", cache=cache1, temperature=t, kd_weight=w, kd_until=until
        )
    if args.quick:  # a smoke run: two recipes are enough to exercise every stage (stage 4 reuses the first one's run)
        recipes = {k: recipes[k] for k in ("scratch", "T=2 w=0.5 until=1", "T=4 w=0.9 until=0.5")}
    best_name, best = None, {}
    if stages & {"screen", "teachers", "checks"}:
        text, finals = arms_table(f"screen: {head}", main_conf, "screen", recipes, target)
        ranked = sorted((n for n in finals if n != "scratch"), key=lambda n: -statistics.mean(finals[n]))
        best_name = ranked[0]
        text += f"\nbest screened recipe: {best_name}; runner-up: {ranked[1] if len(ranked) > 1 else '-'}"
        if "screen" in stages:
            record("Recipe study, stage 1: screen (bench_recipe.py)", text, args.quick)
        best = {k: v for k, v in recipes[best_name].items() if k != "cache"}

    if "teachers" in stages:
        longer = teacher_run("run1-longer", main_conf, 2 * args.epochs)
        other = teacher_run("run1-seed100", main_conf, args.epochs, seed=100)
        ensemble = f"{run1.run_dir},{other.run_dir}"
        views1 = cache_for(run1.run_dir, "fashion-mnist", "pad-crop-flip", args.samples, 1, out / "cache-run1-v1")
        c_long = cache_for(
            longer.run_dir, "fashion-mnist", "pad-crop-flip", args.samples, budget_epochs, out / "cache-longer"
        )
        c_ens = cache_for(ensemble, "fashion-mnist", "pad-crop-flip", args.samples, budget_epochs, out / "cache-ens")
        arms = {
            "scratch": {"kd": "none"},
            f"run 1, {budget_epochs} views": dict(best, cache=cache1),
            "run 1, 1 view": dict(best, cache=views1),
            f"run 1 trained {2 * args.epochs} epochs ({longer.final_accuracy:.4f})": dict(best, cache=c_long),
            f"ensemble run 1 + seed 100 run ({other.final_accuracy:.4f})": dict(best, cache=c_ens),
        }
        text, _ = arms_table(f"teachers and views, recipe {best_name}: {head}", main_conf, "teachers", arms, target)
        record("Recipe study, stage 2: teachers and views (bench_recipe.py)", text, args.quick)

    if "mixing" in stages:
        mix = Mix("both", alpha=0.8, cutmix_alpha=1.0)
        budgets = sorted({max(1, round(float(b) * args.epochs)) for b in args.mix_budgets.split(",")} | {budget_epochs})
        # one store per cache, with a view for every epoch of the longest schedule (shorter ones replay its first views)
        c_plain = cache_for(
            run1.run_dir, "fashion-mnist", "pad-crop-flip", args.samples, budgets[-1], out / "cache-run1"
        )
        mixed = cache_for(
            run1.run_dir, "fashion-mnist", "pad-crop-flip", args.samples, budgets[-1], out / "cache-run1-mix", mix
        )
        # KD throughout (kd_until 1.0), as in this stage's first record; the default stops KD at half the budget
        kd = dict(kd="cached", temperature=2.0, kd_weight=0.5, kd_until=1.0)
        arms = {
            "scratch": {"kd": "none"},
            "scratch, mixing": {"kd": "none", "mix": "both"},
            "cached KD (T=2 w=0.5 until=1)": dict(kd, cache=c_plain),
            "cached KD, mixing": dict(kd, cache=mixed),  # the cache's mixing is replayed
        }
        by_budget: dict[int, dict[str, list[float]]] = {}
        texts = []
        for epochs in budgets:
            title = f"Mixup/CutMix ({mix.describe()}), {epochs}/{args.epochs} epochs: {head}".replace(
                f"{budget_epochs} epochs ({budget_epochs / args.epochs:.2f}x)",
                f"{epochs} epochs ({epochs / args.epochs:.2f}x)",
            )
            text, by_budget[epochs] = arms_table(title, main_conf, "mixing", arms, target, epochs)
            texts.append(text)
        if len(budgets) > 1 or args.quick:
            texts.append(time_to_target(arms, by_budget, target))
        record("Recipe study, stage 4: Mixup/CutMix, accuracy and time to target (bench_recipe.py)", "\n".join(texts),
               args.quick)  # fmt: skip

    if "checks" in stages:
        old_default = dict(kd="cached", temperature=4.0, kd_weight=0.9, kd_until=1.0)
        deeper = args.model.replace("resnet8", "resnet14")
        checks = {
            "subset": (f"{args.samples // 2} images", config_of(args.model, args.samples // 2, "pad-crop-flip")),
            "deeper": (f"a deeper network ({deeper})", config_of(deeper, args.samples, "pad-crop-flip")),
            "noaug": ("no augmentation", config_of(args.model, args.samples, "none")),
        }
        chosen = ["subset"] if args.quick else args.checks.split(",")
        checks = dict(checks[name] for name in chosen)
        for label, conf in checks.items():
            tag = "check-" + "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in label)  # a path: no commas
            t_run = teacher_run(f"{tag}/run1", conf, args.epochs)
            c = cache_for(
                t_run.run_dir, "fashion-mnist", conf["augment"], conf["limit"], budget_epochs, out / tag / "cache"
            )
            arms = {
                "scratch": {"kd": "none"},
                f"best: {best_name}": dict(best, cache=c),
                "best, KD for the first half only": dict(best, cache=c, kd_until=0.5),
                "old default: T=4 w=0.9 until=1": dict(old_default, cache=c),
            }
            if args.quick:  # scratch and the best recipe: the other two arms only change settings
                arms = dict(list(arms.items())[:2])
            title = (
                f"check on {label}: {conf['model']}, {conf['limit']} images, augment {conf['augment']}; "
                f"{budget_epochs}/{args.epochs} epochs; target = its run 1 {t_run.final_accuracy:.4f}"
            )
            text = arms_table(title, conf, tag, arms, t_run.final_accuracy)[0]
            record(f"Recipe study, stage 3: check on {label} (bench_recipe.py)", text, args.quick)  # each as it ends


if __name__ == "__main__":
    main()
