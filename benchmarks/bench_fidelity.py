"""Fidelity study: what each encoding costs on disk and how faithful it is.

Part 1, targets: for each encoding/parameter/codec, bytes per stored view and per kept entry (the targets' chunk
files, `_common.target_bytes`), KL(teacher || decoded) at T = 1 and T = 4, the cosine between the KD gradient from the
decoded target and from the exact one (for a uniform student, at T = 4), and top-1 agreement with the teacher, on one
replayed view of
  - Fashion-MNIST (10 classes), teacher: small-resnet8 trained here;
  - Fashion-MNIST pairs (100 classes: two garments side by side), teacher: small-resnet8 trained here.
Part 2, students: cached-KD training with the same budget per encoding, test accuracy versus `full` (and scratch
at 100 classes): `--parts students` for 10 classes, `students100` for 100.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from pathlib import Path

import torch
from rich.table import Table
from torch.utils.data import DataLoader

from _common import OUT, console, record, run_once, show, target_bytes, trained_teacher
from logitcache import TrainConfig, build_cache, specs, to_probs, train
from logitcache.teacher.build import ReplayedViews
from logitcache.errors import LogitcacheError
from logitcache.student.loop import load_metrics

HERE = Path(__file__).resolve().parent
PAIRS, PAIRS_AUG = f"{HERE}/bench_data.py:fmnist_pairs", f"{HERE}/bench_data.py:pairs_augment"

CONFIGS_10 = [
    ("full", {}, "blosc-lz4"),
    ("full", {}, "zstd"),
    ("topk", {"k": 1}, "blosc-lz4"),
    ("topk", {"k": 2}, "blosc-lz4"),
    ("topk", {"k": 4}, "blosc-lz4"),
    ("topk", {"k": 4}, "zstd"),
    ("topk8", {"k": 4}, "blosc-lz4"),
    ("topk8", {"k": 4}, "zstd"),
    ("topk8", {"k": 4, "layout": 1}, "blosc-lz4"),
    ("headtail", {"k": 4, "tail_samples": 4}, "blosc-lz4"),
    ("sampled", {"samples": 10, "tau": 1.0}, "blosc-lz4"),
    ("sampled", {"samples": 10, "tau": 4.0}, "blosc-lz4"),
    ("quantized", {}, "blosc-lz4"),
]
CONFIGS_100 = [
    ("full", {}, "blosc-lz4"),
    ("topk", {"k": 1}, "blosc-lz4"),
    ("topk", {"k": 5}, "blosc-lz4"),
    ("topk", {"k": 10}, "blosc-lz4"),
    ("topk", {"k": 10, "soft_tail": False}, "blosc-lz4"),
    ("topk", {"k": 20}, "blosc-lz4"),
    ("topk", {"k": 10}, "zstd"),
    ("topk8", {"k": 10, "tail_shape": "flat"}, "blosc-lz4"),
    ("topk8", {"k": 10, "tail_rank": 0}, "blosc-lz4"),  # the tail table alone
    ("topk8", {"k": 10}, "blosc-lz4"),  # the table and 8 basis coefficients per sample (the default)
    ("topk8", {"k": 10, "tail_rank": 4}, "blosc-lz4"),
    ("topk8", {"k": 5, "tail_rank": 0}, "blosc-lz4"),
    ("topk8", {"k": 5}, "blosc-lz4"),
    ("topk8", {"k": 10, "tail_shape": "flat"}, "zstd"),
    ("topk8", {"k": 20, "tail_shape": "flat"}, "blosc-lz4"),
    ("topk8", {"k": 20, "tail_rank": 0}, "blosc-lz4"),
    ("topk8", {"k": 20}, "blosc-lz4"),
    ("topk8", {"k": 20, "tail_shape": "flat"}, "zstd"),
    # layout 1 (the older layout): the values, not their steps
    ("topk8", {"k": 10, "layout": 1, "tail_shape": "flat"}, "blosc-lz4"),
    ("topk8", {"k": 10, "layout": 1, "tail_shape": "flat"}, "zstd"),
    ("topk8", {"k": 20, "layout": 1, "tail_shape": "flat"}, "blosc-lz4"),
    ("topk8", {"k": 20, "layout": 1, "tail_shape": "flat"}, "zstd"),
    ("headtail", {"k": 10, "tail_samples": 8, "draws": "multinomial"}, "blosc-lz4"),
    ("headtail", {"k": 10, "tail_samples": 16, "draws": "multinomial"}, "blosc-lz4"),
    ("headtail", {"k": 10, "tail_samples": 16, "draws": "multinomial"}, "zstd"),
    ("headtail", {"k": 10, "tail_samples": 16, "tau": 4.0, "draws": "multinomial"}, "blosc-lz4"),
    ("headtail", {"k": 10, "tail_samples": 16, "tau": 4.0}, "blosc-lz4"),
    ("headtail", {"k": 10, "tail_samples": 16, "tau": 4.0}, "zstd"),
    ("headtail", {"k": 10, "tail_samples": 24, "tau": 4.0}, "blosc-lz4"),
    ("headtail", {"k": 10, "tail_samples": 32, "tau": 4.0, "draws": "multinomial"}, "blosc-lz4"),
    ("headtail", {"k": 10, "tail_samples": 32, "tau": 4.0}, "blosc-lz4"),
    ("sampled", {"samples": 10, "tau": 1.0}, "blosc-lz4"),
    ("sampled", {"samples": 50, "tau": 1.0}, "blosc-lz4"),
    ("sampled", {"samples": 50, "tau": 4.0}, "blosc-lz4"),
    ("quantized", {}, "blosc-lz4"),
]


def label(enc: str, params: dict, codec: str) -> str:
    # soft_tail=False is the flat tail of format version 1 (no stored softened tail masses)
    p = ", ".join(
        "flat tail" if k == "soft_tail" else f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in params.items()
    )
    return f"{enc}({p}) {codec}" if p else f"{enc} {codec}"


def fidelity(name: str, ds, tf, teacher, configs, out: Path) -> str:
    loader = DataLoader(ReplayedViews(ds, tf, 0), batch_size=512)
    with torch.inference_mode():
        logits = torch.cat([teacher(x) for x in loader]).float()
    table = Table(title=f"{name}: {len(ds)} samples, {logits.shape[1]} classes, one view")
    for col in ("encoding", "B/view", "B/sample", "B/kept entry", "KL T=1", "KL T=4", "grad cos T=4", "top-1 agree"):
        table.add_column(col, justify="right")
    for enc, params, codec in configs:
        cache = build_cache(
            teacher,
            ds,
            out / label(enc, params, codec).replace(" ", "_"),
            augment=tf,
            views=1,
            encoding=enc,
            codec=codec,
            overwrite=True,
            progress=False,
            **params,
        )
        stored = target_bytes(cache)
        targets = cache.read(0)
        row = [
            label(enc, params, codec),
            f"{stored:,}",
            f"{stored / len(ds):.2f}",
            f"{stored / (len(ds) * cache.encoding.entries()):.3f}",
        ]
        for t in (1.0, 4.0):
            if enc in ("sampled", "headtail"):  # undrawn classes get 0: KL(teacher || it) is infinite by design
                row.append("n/a")
                continue
            p = torch.softmax(logits / t, 1)
            q = to_probs(targets, t, cache=cache)
            kl = (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(1).mean()
            row.append(f"{kl:.2e}")
        # KD gradient w.r.t. a fresh (uniform) student's logits is q - p: cosine to the exact one (RS-KD's measure)
        if enc == "sampled" and params["tau"] != 4.0:
            row.append("-")
        else:
            u = torch.full_like(logits, 1 / logits.shape[1])
            exact, approx = u - torch.softmax(logits / 4.0, 1), u - to_probs(targets, 4.0, cache=cache)
            row.append(f"{torch.nn.functional.cosine_similarity(exact, approx, dim=1).mean():.4f}")
        agree = (to_probs(targets, params.get("tau", 1.0), cache=cache).argmax(1) == logits.argmax(1)).float().mean()
        row.append(f"{agree:.4f}")
        table.add_row(*row)
    return show(table)


def students(
    name: str,
    dataset: str,
    augment: str,
    model: str,
    teacher_dir: str,
    configs,
    epochs: int,
    limit: int,
    seeds: list[int],
    out: Path,
    test_limit: int | None,
    scratch: bool = False,
    workers: int | str = "auto",
) -> str:
    """Students trained with cached KD from each encoding (T = 4, weight 0.9), and without KD when ``scratch``."""
    ds = specs.resolve_dataset(dataset, limit=limit)
    tf, _ = specs.resolve_augment(augment, ds)
    teacher = specs.resolve_teacher(teacher_dir)
    table = Table(
        title=f"{name}: cached-KD students, {model}, {epochs} epochs on {limit} images, T=4, "
        f"seeds {seeds} (mean accuracy)"
    )
    # A seed fixes the student's initialisation and sample order in every arm: per-seed differences are paired.
    columns = ("encoding", "B/sample", "% of full's bytes", "test accuracy", "vs full (pp)", "s.e.", "median")
    for col in (*columns, "per seed"):
        table.add_column(col, justify="right")
    results, sizes = {}, {}

    def student(key: str, seed: int, tag: str = "scratch", **kd) -> float:
        cfg = TrainConfig(
            out=str(out / f"student-{key.replace(' ', '_')}-{seed}"),
            dataset=dataset,
            augment=augment,
            model=model,
            epochs=epochs,
            limit=limit,
            temperature=4.0,
            kd_weight=0.9,  # the settings of the recorded results (the defaults changed since)
            seed=seed,
            lr=0.05,
            overwrite=True,
            progress=False,
            test_limit=test_limit,
            eval_every=10**6,
            workers=workers,
            **kd,
        )
        # reused when this exact run finished before (the tag tells caches of other contents at the same path apart)
        return run_once(cfg, tag=f"fidelity-{tag}").final_accuracy

    if scratch:
        results["no KD (scratch)"] = [student("scratch", seed) for seed in seeds]
    for enc, params, codec in configs:
        key = label(enc, params, codec)

        def build(**how):
            return build_cache(
                teacher,
                ds,
                out / ("kd-" + key.replace(" ", "_")),
                augment=tf,
                views=epochs,
                encoding=enc,
                codec=codec,
                progress=False,
                specs={"augment": augment, "dataset": dataset},
                **params,
                **how,
            )

        try:  # a complete cache of the same teacher, data and settings is reused (build refuses any other)
            cache = build(resume=True)
        except LogitcacheError:
            cache = build(overwrite=True)
        sizes[key] = target_bytes(cache) / (cache.num_views * cache.num_samples)
        # what the cache holds: its encoding with every option (defaults included; the layout changes no number)
        # (tail_rank 0, the value of stores from before the option, is left out: those runs keep their tags)
        held = {k: v for k, v in cache.encoding.params().items() if k != "layout" and (k, v) != ("tail_rank", 0)}
        # the views' seed too when it is not the default (tags of earlier runs, all at seed 0, stay as they were)
        held_by = [enc, held, cache.num_views] + ([cache.meta.seed] if cache.meta.seed else [])
        tag = hashlib.sha256(json.dumps(held_by, sort_keys=True).encode()).hexdigest()[:8]
        accs = [student(key, seed, tag=tag, kd="cached", cache=str(cache.path)) for seed in seeds]
        results[key] = accs
        console.print(f"{name} {key}: {accs}")
    full_key = next(k for k in results if k.startswith("full"))
    full = sum(results[full_key]) / len(seeds)
    for key, accs in results.items():
        mean = sum(accs) / len(accs)
        size = sizes.get(key)
        table.add_row(
            key,
            f"{size:.1f}" if size else "-",
            f"{100 * size / sizes[full_key]:.0f}%" if size else "-",
            f"{mean:.4f}",
            f"{100 * (mean - full):+.2f}",
            *paired(accs, results[full_key]),
            ", ".join(f"{a:.4f}" for a in accs),
        )
    return show(table)


def paired(accs: list[float], full: list[float]) -> tuple[str, str]:
    """The standard error of the mean per-seed difference to ``full`` and its median, in pp."""
    diffs = [a - f for a, f in zip(accs, full)]
    se = f"{100 * statistics.stdev(diffs) / len(diffs) ** 0.5:.2f}" if len(diffs) > 1 else "-"
    return se, f"{100 * statistics.median(diffs):+.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=10000, help="samples for the fidelity part")
    ap.add_argument("--epochs", type=int, default=3, help="student epochs")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument(
        "--parts",
        default="targets,students",
        help="targets (bytes, KL: fast), students (10 classes, --epochs), students100 (100 classes, --epochs-100: "
        "students trained far enough to tell encodings apart; the 3-epoch study it replaces could not)",
    )
    ap.add_argument("--epochs-100", type=int, default=8, help="student epochs of the students100 part")
    ap.add_argument("--samples-100", type=int, default=10000, help="training pairs of the students100 part")
    ap.add_argument(
        "--students100-set",
        choices=("encodings", "tails", "draws", "null", "prior", "close", "table-vs-control", "basis"),
        default="encodings",
        help="the students100 part's configs",
    )
    ap.add_argument("--only", default=None, help="targets part: only the configurations of this encoding")
    ap.add_argument("--quick", action="store_true", help="a few seconds' smoke run of every part on 256 images, not "
                    "recorded")  # fmt: skip
    args = ap.parse_args()
    out = OUT / "fidelity"
    parts = set(args.parts.split(","))
    if args.quick:  # every part and encoding path once, on the quick teacher: a check that the script runs
        args.samples, args.epochs, args.seeds = 256, 1, 1
        parts.add("students100")
    sections = []

    # 10 classes
    fm_teacher = trained_teacher(quick=args.quick)
    ds = specs.resolve_dataset("fashion-mnist", limit=args.samples)
    tf, _ = specs.resolve_augment("pad-crop-flip", ds)
    # --quick: a smoke test of every code path, not of every configuration
    configs_10 = [c for c in CONFIGS_10 if c[2] == "blosc-lz4"][::3] if args.quick else CONFIGS_10
    firsts = list({c[0]: c for c in reversed(CONFIGS_100)}.values())  # the first configuration of each encoding
    configs_100 = [c for c in firsts if c[0] in ("full", "topk8", "headtail")] if args.quick else CONFIGS_100
    if args.only:
        configs_10 = [c for c in configs_10 if c[0] == args.only]
        configs_100 = [c for c in configs_100 if c[0] in (args.only, "full")]
    if "targets" in parts:
        sections.append(fidelity("Fashion-MNIST", ds, tf, specs.resolve_teacher(fm_teacher), configs_10, out / "fm"))

    # 100 classes: train a real teacher on the pairs task first
    pairs_model = "small-resnet8-w8" if args.quick else "small-resnet8"
    pairs_teacher = OUT / f"teacher-pairs-{'quick-w8' if args.quick else 'full'}"
    if not (pairs_teacher / "model.safetensors").is_file():
        console.print("[dim]training the 100-class pairs teacher ...")
        r = train(
            TrainConfig(
                out=str(pairs_teacher),
                dataset=PAIRS,
                augment=PAIRS_AUG,
                model=pairs_model,
                epochs=1 if args.quick else 4,
                limit=512 if args.quick else None,
                test_limit=256 if args.quick else None,
                workers=0 if args.quick else "auto",
                lr=0.05,
                overwrite=True,
                progress=False,
            )
        )
        console.print(f"pairs teacher test accuracy: {r.final_accuracy:.4f}")
    teacher_acc = load_metrics(pairs_teacher)[-1]["test_accuracy"]
    sections.append(f"100-class pairs teacher: {pairs_model}, test accuracy {teacher_acc:.4f}")
    pds = specs.resolve_dataset(PAIRS, limit=args.samples)
    ptf, _ = specs.resolve_augment(PAIRS_AUG, pds)
    if "targets" in parts:
        sections.append(
            fidelity(
                "Fashion-MNIST pairs", pds, ptf, specs.resolve_teacher(str(pairs_teacher)), configs_100, out / "pairs"
            )
        )

    if "students" in parts:
        seeds = list(range(1, args.seeds + 1))
        student_configs_10 = [
            ("full", {}, "blosc-lz4"),
            ("topk", {"k": 1}, "blosc-lz4"),
            ("topk", {"k": 4}, "blosc-lz4"),
            ("topk8", {"k": 4}, "blosc-lz4"),
            ("sampled", {"samples": 10, "tau": 4.0}, "blosc-lz4"),
            ("quantized", {}, "blosc-lz4"),
        ]
        sections.append(
            students(
                "Fashion-MNIST",
                "fashion-mnist",
                "pad-crop-flip",
                "small-resnet8-w8",
                fm_teacher,
                student_configs_10[:2] if args.quick else student_configs_10,
                args.epochs,
                args.samples,
                seeds,
                out,
                256 if args.quick else 2000,
                workers=0 if args.quick else "auto",  # quick: two batches, fewer than worker processes cost
            )
        )
    if "students100" in parts:
        configs = {
            "encodings": [
                ("full", {}, "blosc-lz4"),
                ("topk", {"k": 10}, "blosc-lz4"),
                ("topk8", {"k": 10, "tail_shape": "flat"}, "blosc-lz4"),
                ("topk8", {"k": 10, "tail_shape": "table", "tail_rank": 0}, "blosc-lz4"),
                ("headtail", {"k": 10, "tail_samples": 16, "tau": 4.0}, "blosc-lz4"),  # drawn at the students' T
                ("sampled", {"samples": 50, "tau": 4.0}, "blosc-lz4"),
                ("quantized", {}, "blosc-lz4"),
            ],
            # headtail's tail drawn at T = 1 (the former default) or at the students' T = 4, and more draws
            "tails": [
                ("full", {}, "blosc-lz4"),
                ("headtail", {"k": 10, "tail_samples": 16, "draws": "multinomial"}, "blosc-lz4"),
                ("headtail", {"k": 10, "tail_samples": 16, "tau": 4.0, "draws": "multinomial"}, "blosc-lz4"),
                ("headtail", {"k": 10, "tail_samples": 32, "tau": 4.0, "draws": "multinomial"}, "blosc-lz4"),
            ],
            # how far apart two (nearly) exact targets' students land: the same teacher on the same images with other
            # augmentation draws (views seed 1), and `quantized` with its floor lowered to e^-40 (KL at T = 4: 2e-5)
            "null": [
                ("full", {}, "blosc-lz4"),
                ("full", {"seed": 1}, "blosc-lz4"),
                ("quantized", {"floor": 40.0}, "blosc-lz4"),
            ],
            # the encodings within a few pp of full, with the two near-exact controls of "null" (run with more seeds)
            "close": [
                ("full", {}, "blosc-lz4"),
                ("full", {"seed": 1}, "blosc-lz4"),
                ("quantized", {"floor": 40.0}, "blosc-lz4"),
                ("quantized", {}, "blosc-lz4"),
                ("topk8", {"k": 10, "tail_shape": "table", "tail_rank": 0}, "blosc-lz4"),
                ("sampled", {"samples": 50, "tau": 4.0}, "blosc-lz4"),
                ("headtail", {"k": 10, "tail_samples": 16, "tau": 4.0}, "blosc-lz4"),
            ],
            # the tail table against full and its exact control, for many seeds
            "table-vs-control": [
                ("full", {}, "blosc-lz4"),
                ("full", {"seed": 1}, "blosc-lz4"),
                ("topk8", {"k": 10, "tail_shape": "table", "tail_rank": 0}, "blosc-lz4"),
            ],
            # each sample's own tail: the row and 8 basis coefficients; the row alone: table-vs-control
            "basis": [
                ("full", {}, "blosc-lz4"),
                ("full", {"seed": 1}, "blosc-lz4"),
                ("topk8", {"k": 10, "tail_rank": 8}, "blosc-lz4"),
            ],
            # topk8's tail spread as the teacher usually spreads it (the tail table) against flat
            "prior": [
                ("full", {}, "blosc-lz4"),
                ("topk8", {"k": 10, "tail_shape": "table", "tail_rank": 0}, "blosc-lz4"),
                ("topk8", {"k": 5, "tail_shape": "table", "tail_rank": 0}, "blosc-lz4"),
                ("topk8", {"k": 20, "tail_shape": "table", "tail_rank": 0}, "blosc-lz4"),
            ],
            # independent against systematic tail draws, at the students' temperature
            "draws": [
                ("full", {}, "blosc-lz4"),
                ("headtail", {"k": 10, "tail_samples": 16, "tau": 4.0, "draws": "multinomial"}, "blosc-lz4"),
                ("headtail", {"k": 10, "tail_samples": 16, "tau": 4.0}, "blosc-lz4"),
                ("headtail", {"k": 10, "tail_samples": 24, "tau": 4.0}, "blosc-lz4"),
            ],
        }[args.students100_set]
        sections.append(
            students(
                "Fashion-MNIST pairs (100 classes)",
                PAIRS,
                PAIRS_AUG,
                "small-resnet8-w8",
                str(pairs_teacher),
                configs[:2] if args.quick else configs,
                1 if args.quick else args.epochs_100,
                args.samples if args.quick else args.samples_100,
                list(range(1, args.seeds + 1)),
                out / "students100",
                256 if args.quick else None,
                scratch=True,
                workers=0 if args.quick else "auto",
            )
        )
    title = "Fidelity of encodings" + ("" if parts & {"students", "students100"} else ", targets only")
    record(f"{title} (bench_fidelity.py)", "\n".join(sections), args.quick)


if __name__ == "__main__":
    main()
