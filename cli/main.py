"""The ``logitcache`` command: parse options, resolve specs, call the library, render with rich. Nothing more."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Cache a teacher's soft targets once (build), then distill from them at almost no cost (train).",
)
err = Console(stderr=True, soft_wrap=True)  # one error = one line, whatever the width
out = Console()


class Encoding(str, Enum):
    full = "full"
    topk = "topk"
    sampled = "sampled"
    quantized = "quantized"


def _run(fn: Callable[[], None]) -> None:
    """User mistakes (LogitcacheError) become one red line and exit code 2; Ctrl-C says how to resume."""
    from logitcache.errors import LogitcacheError, user_message

    from logitcache import distributed

    try:
        fn()
    except LogitcacheError as e:
        err.print(f"[bold red]error:[/] {user_message(e)}", highlight=False)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        err.print(
            "[yellow]interrupted[/]: finished chunks (build) and epochs (train) are kept; "
            "rerun the same command with --resume to continue"
        )
        raise typer.Exit(130)
    finally:
        distributed.shutdown()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err.print(f"[yellow]warning:[/] {message}", highlight=False)


@app.callback()
def _setup() -> None:
    import warnings

    import torch

    warnings.showwarning = _show_warning  # one readable line, not a source location

    # All cores, shared fairly between the processes torchrun starts on this machine (OMP_NUM_THREADS wins).
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, (os.cpu_count() or 1) // local))


@app.command()
def build(
    teacher: str = typer.Option(
        ...,
        help="Run directory from `logitcache train`, several run directories separated by commas (an ensemble of "
        "earlier runs: the mean of their probabilities), pkg.module:fn, path/file.py:fn "
        "(fn() returns an nn.Module), or a torchvision model name.",
    ),
    dataset: str = typer.Option(
        ...,
        help="fashion-mnist, mnist, cifar10, cifar100, imagefolder:PATH, or "
        "pkg.module:fn / file.py:fn (fn(train=True) returns (image, label) pairs).",
    ),
    out_path: str = typer.Option(
        ..., "--out", help="Folder of the Zarr store to write, or an fsspec URL (s3://bucket/path, ...)."
    ),
    augment: str = typer.Option(
        "pad-crop-flip",
        help="pad-crop-flip, rrc-flip, none, or pkg.module:fn / file.py:fn "
        "(fn() returns a transform from image to tensor).",
    ),
    views: int = typer.Option(4, min=1, help="Augmented views stored per image; epoch e trains on view e % views."),
    seed: int = typer.Option(0, help="Base seed: view v of sample i is replayed from hash(seed, v, i)."),
    encoding: Encoding = typer.Option(
        Encoding.topk,
        help="full: all logits (float16). topk: k largest log-probs, "
        "their ids and the leftover mass. sampled: S draws from the "
        "teacher at temperature tau, as ids + counts (unbiased). "
        "quantized: all log-probs in 8 bits.",
    ),
    k: int = typer.Option(10, min=1, help="Entries kept per sample for --encoding topk."),
    soft_tail: bool = typer.Option(
        True,
        "--soft-tail/--flat-tail",
        help="topk: also store the tail's mass at T = 2, 4, 8 (6 B/sample), so training at any temperature weights "
        "the unstored classes right; --flat-tail saves the bytes, exact only at T = 1.",
    ),
    samples: int = typer.Option(50, min=1, help="Draws S per sample for --encoding sampled."),
    tau: float = typer.Option(1.0, help="Sampling temperature for --encoding sampled; training must use the same."),
    floor: float = typer.Option(20.0, help="Lowest log-probability kept by --encoding quantized."),
    codec: str = typer.Option("blosc-lz4", help="Compression: blosc-lz4, zstd or none (all add a crc32c checksum)."),
    teacher_weights: Optional[Path] = typer.Option(None, help="State dict (.safetensors or weights-only torch file)."),
    batch_size: int = typer.Option(
        256, min=1, help="Teacher batch size (part of the cache identity: resume needs the same)."
    ),
    chunk_rows: int = typer.Option(1024, min=1, help="Samples per stored chunk (the unit of work and of resume)."),
    workers: int = typer.Option(2, min=0, help="DataLoader worker processes for decoding and augmentation."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    limit: Optional[int] = typer.Option(None, min=1, help="Use the first N samples of the dataset only."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted build; complete chunks are kept."),
    repair: bool = typer.Option(
        False,
        "--repair",
        help="With --resume: first check every stored chunk (checksums, missing files, digests) and recompute the "
        "damaged ones too; the result equals an undamaged build, byte for byte.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing cache at --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run the teacher once over every image x view and store its soft targets in a Zarr v3 store."""

    def go() -> None:
        from logitcache import build_cache, distributed, specs

        distributed.init_from_env()  # under torchrun: join the process group
        ds = specs.resolve_dataset(dataset, train=True, limit=limit)
        train_tf, _ = specs.resolve_augment(augment, ds)
        model = specs.resolve_teacher(teacher, teacher_weights)
        cache = build_cache(
            model,
            ds,
            out_path,
            augment=train_tf,
            views=views,
            seed=seed,
            encoding=encoding.value,
            k=k,
            soft_tail=soft_tail,
            samples=samples,
            tau=tau,
            floor=floor,
            codec=codec,
            batch_size=batch_size,
            chunk_rows=chunk_rows,
            workers=workers,
            device=device,
            resume=resume,
            overwrite=overwrite,
            repair=repair,
            progress=not quiet,
            specs={"teacher": teacher, "dataset": dataset, "augment": augment},
        )
        if distributed.rank() != 0:
            return
        out.print(
            f"[green]done[/]: {cache.num_views} views x {cache.num_samples} samples, {cache.num_classes} classes, "
            f"encoding {cache.encoding} {cache.encoding_params or ''} -> {cache.path}"
        )

    _run(go)


def _train_defaults():
    # The train command's defaults are TrainConfig's: one place decides them (and says why, in its docstring).
    from logitcache.train import TrainConfig

    return TrainConfig(out="")


TRAIN = _train_defaults()


class KD(str, Enum):
    none = "none"
    cached = "cached"
    online = "online"


@app.command()
def train(
    out_path: Path = typer.Option(..., "--out", help="Run directory to write (config, metrics, weights)."),
    dataset: str = typer.Option(TRAIN.dataset, help="Same dataset specs as `build`."),
    model: str = typer.Option(
        TRAIN.model,
        help="small-resnet8/14/20[-wW], a torchvision model name, or "
        "pkg.module:fn (fn(num_classes=, in_channels=) returns a module).",
    ),
    epochs: int = typer.Option(TRAIN.epochs, min=1, help="Training epochs (a complete warm-up + cosine schedule)."),
    kd: KD = typer.Option(
        KD.none,
        help="none: plain training. cached: targets from --cache. online: run --teacher "
        "on every batch (the baseline the cache beats).",
    ),
    cache: Optional[str] = typer.Option(None, help="Cache written by `logitcache build` (for --kd cached)."),
    teacher: Optional[str] = typer.Option(None, help="Run directory or teacher spec (for --kd online)."),
    kd_weight: float = typer.Option(
        TRAIN.kd_weight,
        help="a in loss = (1 - a) * CE + a * T^2 * KL. The defaults (T 2, a 0.5) finished best in the recipe study "
        "(benchmarks/RESULTS.md); high T with a high a fell below training without KD.",
    ),
    temperature: float = typer.Option(TRAIN.temperature, help="Distillation temperature T."),
    kd_until: float = typer.Option(
        TRAIN.kd_until, help="Apply KD for the first fraction F of training steps only (0.5 did as well as 1)."
    ),
    kd_tail: str = typer.Option(
        TRAIN.kd_tail,
        help="Top-k caches: uniform (spread the leftover mass over the other classes) or bucket (one 'rest' class).",
    ),
    augment: Optional[str] = typer.Option(
        None, help="Training augmentation; default: the cache's for --kd cached, else pad-crop-flip."
    ),
    seed: int = typer.Option(TRAIN.seed, help="Seeds initialisation, shuffling and (without a cache) augmentation."),
    lr: float = typer.Option(TRAIN.lr, help="Peak learning rate (SGD, nesterov momentum 0.9, warm-up then cosine)."),
    weight_decay: float = typer.Option(TRAIN.weight_decay),
    label_smoothing: float = typer.Option(TRAIN.label_smoothing),
    batch_size: int = typer.Option(TRAIN.batch_size, min=1),
    workers: int = typer.Option(TRAIN.workers, min=0, help="DataLoader worker processes."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    limit: Optional[int] = typer.Option(None, min=1, help="Train on the first N samples (must match the cache)."),
    test_limit: Optional[int] = typer.Option(None, min=1, help="Evaluate on the first N test samples only."),
    eval_every: int = typer.Option(
        TRAIN.eval_every,
        min=1,
        help="Evaluate after every N-th epoch and the last (evaluation can cost more than a short epoch).",
    ),
    target_accuracy: Optional[float] = typer.Option(
        None, help="Report the epoch and time the test accuracy first reaches X (0-1)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run after its last finished epoch (same settings)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train a model, optionally distilling from a cache or an online teacher; the run directory can teach the next."""

    def go() -> None:
        from logitcache import TrainConfig, distributed
        from logitcache import train as train_run

        distributed.init_from_env()
        cfg = TrainConfig(
            out=str(out_path),
            dataset=dataset,
            model=model,
            epochs=epochs,
            kd=kd.value,
            cache=cache,
            teacher=teacher,
            kd_weight=kd_weight,
            temperature=temperature,
            kd_until=kd_until,
            kd_tail=kd_tail,
            augment=augment,
            seed=seed,
            lr=lr,
            weight_decay=weight_decay,
            label_smoothing=label_smoothing,
            batch_size=batch_size,
            workers=workers,
            device=device,
            limit=limit,
            test_limit=test_limit,
            eval_every=eval_every,
            target_accuracy=target_accuracy,
            overwrite=overwrite,
            resume=resume,
            progress=not quiet,
        )
        result = train_run(cfg)
        if distributed.rank() != 0:
            return
        from rich.table import Table

        table = Table(title=f"run {result.run_dir} (--kd {kd.value})")
        for col in ("epoch", "train loss", "test acc", "wall s", "samples/s", "teacher fwd"):
            table.add_column(col, justify="right")
        for m in result.metrics:
            table.add_row(
                str(m["epoch"]),
                f"{m['train_loss']:.4f}",
                f"{m['test_accuracy']:.4f}" if m["test_accuracy"] is not None else "-",
                f"{m['wall_seconds']:.1f}",
                f"{m['samples_per_second']:.0f}",
                str(m["teacher_forwards"]),
            )
        out.print(table)
        if target_accuracy is not None:
            out.print(
                f"target accuracy {target_accuracy}: "
                + (
                    f"reached at epoch {result.target_epoch} after {result.target_seconds:.1f} s"
                    if result.target_epoch
                    else "not reached"
                )
            )

    _run(go)


@app.command()
def inspect(
    path: str = typer.Argument(..., help="A cache written by `logitcache build`."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    stats_rows: int = typer.Option(20000, min=1, help="Samples per view used for the teacher statistics."),
) -> None:
    """Encoding, completion, bytes on disk, compression, fingerprints, versions, teacher statistics per view."""

    def go() -> None:
        import json

        from logitcache.summary import inspect_cache

        info = inspect_cache(path, stats_rows=stats_rows)
        if as_json:
            print(json.dumps(info, indent=2))
            return
        _render_inspect(info)

    _run(go)


def _render_inspect(info: dict) -> None:
    from rich.table import Table

    head = Table(show_header=False, title=f"cache {info['path']}")
    rows = [
        ("encoding", f"{info['encoding']} {info['encoding_params']}  ({info['values']} at T={info['temperature']})"),
        (
            "views x samples",
            f"{info['num_views']} x {info['num_samples']:,}  ({info['num_classes']} classes, "
            f"chunks of {info['chunk_rows']})",
        ),
        ("complete", f"{info['complete']}  per view: {info['completion_per_view']}"),
        ("bytes on disk", f"{info['bytes_on_disk']:,}"),
        (
            "per view / per sample / per kept entry",
            f"{info['bytes_per_view']:,.0f} / {info['bytes_per_sample_view']} / {info['bytes_per_kept_entry']}",
        ),
        ("compression", f"{info['codec']}, ratio {info['compression_ratio']}"),
        ("teacher", f"{info['teacher']['spec']} ({info['teacher']['class']}) sha256 {info['teacher']['sha256'][:16]}"),
        (
            "dataset",
            f"{info['dataset']['spec']}: {info['dataset']['length']:,} samples, labels sha256 "
            f"{info['dataset']['labels_sha256'][:16]}",
        ),
        ("augment", f"{info['augment']['spec']}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items())),
    ]
    for k, v in rows:
        head.add_row(k, v)
    out.print(head)
    arrays = Table(title="arrays")
    for col in ("array", "shape", "dtype", "chunks", "raw bytes", "stored bytes", "ratio"):
        arrays.add_column(col, justify="right")
    for name, a in info["arrays"].items():
        arrays.add_row(
            name,
            str(a["shape"]),
            a["dtype"],
            str(a["chunks"]),
            f"{a['bytes']:,}",
            f"{a['stored_bytes']:,}",
            str(a["compression_ratio"]),
        )
    out.print(arrays)
    views = Table(title="teacher per view")
    for col in ("view", "rows", "top-1 = label", "mean entropy (nats)", "mean tail mass", "at T=4"):
        views.add_column(col, justify="right")
    for v in info["views"]:
        views.add_row(
            str(v["view"]),
            f"{v['rows']:,}",
            str(v["top1_agreement_with_labels"]),
            str(v["mean_entropy_nats"]),
            str(v["mean_tail_mass"] if v["mean_tail_mass"] is not None else "-"),
            str(v["mean_tail_mass_t4"] if v["mean_tail_mass_t4"] is not None else "-"),
        )
    out.print(views)


@app.command()
def verify(
    path: str = typer.Argument(..., help="A cache written by `logitcache build`."),
    teacher: Optional[str] = typer.Option(
        None, help="The teacher the cache should hold (same specs as `build`); not needed with --storage-only."
    ),
    dataset: Optional[str] = typer.Option(
        None, help="The dataset the cache was built on; not needed with --storage-only."
    ),
    storage_only: bool = typer.Option(
        False,
        "--storage-only",
        help="Only read and check every chunk (checksums, missing files, recorded digests) and report incomplete and "
        "damaged chunks; no teacher, fast. Repair what it finds with `build ... --resume --repair`.",
    ),
    augment: Optional[str] = typer.Option(None, help="Default: the augmentation recorded in the cache."),
    teacher_weights: Optional[Path] = typer.Option(None),
    limit: Optional[int] = typer.Option(None, min=1, help="The first N samples, as given to `build --limit`."),
    samples: int = typer.Option(
        256, min=1, help="(view, index) pairs to re-run; at least one per chunk when N >= number of chunks."
    ),
    atol: float = typer.Option(0.05, help="Largest allowed difference of a stored number."),
    kl_tolerance: float = typer.Option(
        1e-3, help="Largest allowed KL(fresh || stored) beyond the encoding's own loss."
    ),
    seed: int = typer.Option(0, help="Seed for choosing the pairs."),
    device: str = typer.Option("auto"),
) -> None:
    """Check a cache: every chunk's storage, then the teacher re-run on replayed views; exit 1 on any problem."""

    def go() -> None:
        from rich.table import Table

        from logitcache import specs
        from logitcache.errors import LogitcacheError
        from logitcache.verify import verify_cache, verify_storage

        if storage_only:
            report = verify_storage(path)
            if report.ok:
                out.print(f"[green]ok[/]: all {report.checked} chunks are complete and intact")
                return
            _fail(report)
        if not teacher or not dataset:
            raise LogitcacheError("verify needs --teacher and --dataset (or --storage-only to check the chunks alone)")
        ds = specs.resolve_dataset(dataset, train=True, limit=limit)
        tf = specs.resolve_augment(augment, ds)[0] if augment else None
        model = specs.resolve_teacher(teacher, teacher_weights)
        report = verify_cache(
            path, model, ds, augment=tf, samples=samples, seed=seed, atol=atol, kl_tolerance=kl_tolerance, device=device
        )
        table = Table(title=f"verify {path}")
        for col in ("pairs", "top-1 agreement", "max abs diff", "mean excess KL", "max excess KL"):
            table.add_column(col, justify="right")
        table.add_row(
            str(report.checked),
            f"{report.top1_agreement:.4f}",
            f"{report.max_abs_diff:.3g}",
            f"{report.mean_excess_kl:.2e}",
            f"{report.max_excess_kl:.2e}",
        )
        out.print(table)
        if report.ok:
            out.print("[green]ok[/]: the stored targets match the teacher on their replayed views")
            return
        _fail(report)

    _run(go)


def _fail(report) -> None:
    first = f"first bad: view {report.first_bad[0]}, sample {report.first_bad[1]}" if report.first_bad else ""
    for line in report.problems[:10]:
        err.print(f"  {line}", highlight=False)
    if len(report.problems) > 10:
        err.print(f"  ... and {len(report.problems) - 10} more")
    err.print(f"[bold red]FAILED[/]: {len(report.problems)} problem(s); {first}", highlight=False)
    raise typer.Exit(1)


@app.command()
def demo(
    out_path: Path = typer.Option(Path("demo-out"), "--out", help="Folder for runs, cache, plot and summary."),
    quick: bool = typer.Option(False, "--quick", help="A ~1 minute smoke version (tiny data, 1-2 epochs)."),
    workers: int = typer.Option(2, min=0),
) -> None:
    """The whole idea on real Fashion-MNIST: teacher run, one build, then the next run with and without KD."""

    def go() -> None:
        from logitcache.demo import run_demo

        run_demo(out_path, quick=quick, workers=workers, console=out)

    _run(go)


def main() -> None:
    app(prog_name="logitcache")


if __name__ == "__main__":
    main()
