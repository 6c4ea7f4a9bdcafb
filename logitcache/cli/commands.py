"""The ``logitcache`` command: parse options, resolve specs, call the library, render with rich. Nothing more."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from logitcache.cli.options import config_parameters, encoding_parameters, plain, with_parameters
from logitcache.encoding import ENCODINGS
from logitcache.config import BuildConfig, TrainConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # click's plain help: each option's description wraps under its name at any width (rich's panels squeeze it
    # into a narrow third column at 80)
    rich_markup_mode=None,
    help="Cache a teacher's soft targets once (build), then distill from them at almost no cost (train).",
)
err = Console(stderr=True, soft_wrap=True)  # one error = one line, whatever the width
out = Console()


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


def _print_version(value: bool) -> None:
    if value:
        from logitcache.version import __version__

        out.print(f"logitcache {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _setup(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    import warnings

    import torch

    warnings.showwarning = _show_warning  # one readable line, not a source location

    # All cores, shared fairly between the processes torchrun starts on this machine (OMP_NUM_THREADS wins).
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, (os.cpu_count() or 1) // local))


def _build(**opts) -> None:
    opts = plain(opts)
    opts["progress"] = not opts.pop("quiet")
    given = {key: opts.pop(key) for key in ENCODING_OPTIONS}
    opts["options"] = {key: value for key, value in given.items() if value is not None}

    def go() -> None:
        from logitcache import BuildConfig, distributed
        from logitcache.teacher.build import build, check_encoding_options

        cfg = BuildConfig(**opts)
        check_encoding_options(cfg.encoding, cfg.options)
        distributed.init_from_env(cfg.device)  # under torchrun: join the process group (a CPU run never touches CUDA)
        if cfg.dry_run:
            _dry_run(cfg)
            return
        cache = build(cfg)
        if distributed.rank() != 0:
            return
        out.print(
            f"[green]done[/]: {cache.num_views} views x {cache.num_samples} samples, {cache.num_classes} classes, "
            f"encoding {cache.encoding.name} {cache.encoding.params() or ''} -> {cache.path}"
        )

    _run(go)


def _dry_run(cfg) -> None:
    from logitcache import specs
    from logitcache.teacher.build import build_arguments, size_text
    from logitcache.datasets import dataset_len
    from logitcache.teacher.estimate import estimate_build

    ds = specs.resolve_dataset(cfg.dataset, train=True, limit=cfg.limit)
    augment, _ = specs.resolve_augment(cfg.augment, ds)
    teacher = specs.resolve_teacher(cfg.teacher, cfg.teacher_weights, key=cfg.teacher_key, num_classes=cfg.num_classes)
    est = estimate_build(teacher, ds, augment=augment, **build_arguments(cfg))
    minutes = est.total_seconds / 60
    out.print(
        f"dry run, nothing written: {cfg.views} views x {dataset_len(ds):,} samples, encoding {cfg.encoding}\n"
        f"  store: about {size_text(est.total_bytes)} ({est.bytes_per_sample:.1f} B per sample and view, compressed)\n"
        f"  build time on this machine: about {minutes:.1f} min ({est.seconds_per_sample * 1e6:.0f} us per sample "
        f"and view + {est.startup_seconds:.1f} s start-up"
        + (f" + the tail table's probe of {est.table_probe:,} images" if est.table_probe else "")
        + ")"
    )


_ENCODING_PARAMS = encoding_parameters(ENCODINGS)
ENCODING_OPTIONS = [p.name for p in _ENCODING_PARAMS]
app.command(
    name="build",
    help="Run the teacher once over every image x view and store its soft targets in a Zarr v3 store. Every option "
    "but an encoding's own is a field of logitcache.BuildConfig, whose defaults these are.",
)(with_parameters(_build, [*config_parameters(BuildConfig, required=("teacher", "dataset", "out")), *_ENCODING_PARAMS]))


def _train(**opts) -> None:
    opts = plain(opts)
    opts["progress"] = not opts.pop("quiet")

    def go() -> None:
        from logitcache import TrainConfig, distributed
        from logitcache import train as train_run

        cfg = TrainConfig(**opts)
        distributed.init_from_env(cfg.device)
        result = train_run(cfg)
        if distributed.rank() != 0:
            return
        _render_run(result, cfg)

    _run(go)


app.command(
    name="train",
    help="Train a model, optionally distilling from a cache or an online teacher; the run directory can teach the "
    "next. Every option is a field of logitcache.TrainConfig, whose defaults these are.",
)(with_parameters(_train, config_parameters(TrainConfig, required=("out",))))


def _render_run(result, cfg) -> None:
    from rich.table import Table

    table = Table(title=f"run {result.run_dir} (--kd {cfg.kd})")
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
    if cfg.target_accuracy is not None:
        out.print(
            f"target accuracy {cfg.target_accuracy}: "
            + (
                f"reached at epoch {result.target_epoch} after {result.target_seconds:.1f} s"
                if result.target_epoch
                else "not reached"
            )
        )


@app.command()
def inspect(
    path: str = typer.Argument(..., help="A cache written by `logitcache build`."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    stats_rows: int = typer.Option(20000, min=1, help="Samples per view used for the teacher statistics."),
) -> None:
    """Encoding, completion, bytes on disk, compression, fingerprints, versions, teacher statistics per view."""

    def go() -> None:
        import json

        from logitcache.store.inspection import inspect_cache

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
            f"units of {info['chunk_rows']} rows"
            + (f", each a shard of {info['inner_chunk_rows']}-row chunks" if info.get("inner_chunk_rows") else "")
            + ")",
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
    precision: Optional[str] = typer.Option(
        None, help="fp32, bf16 or fp16: the fresh pass's precision; default: the one the cache records."
    ),
) -> None:
    """Check a cache: every chunk's storage, then the teacher re-run on replayed views; exit 1 on any problem."""

    def go() -> None:
        from rich.table import Table

        from logitcache import specs
        from logitcache.errors import LogitcacheError
        from logitcache.teacher.verify import verify_cache, verify_storage

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
            path, model, ds, augment=tf, samples=samples, seed=seed, atol=atol, kl_tolerance=kl_tolerance,
            device=device, precision=precision,
        )  # fmt: skip
        for note in report.notes:
            out.print(f"[yellow]note[/]: {note}", highlight=False)
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
    quick: bool = typer.Option(
        False, "--quick", help="A smoke version of about 20 s (500 images, 500 test images, 1-2 epochs)."
    ),
    workers: int = typer.Option(2, min=0),
) -> None:
    """The whole idea on real Fashion-MNIST: teacher run, one build, then the next run with and without KD."""

    def go() -> None:
        from logitcache.cli.demo import run_demo

        run_demo(out_path, quick=quick, workers=workers, console=out)

    _run(go)


def main() -> None:
    app(prog_name="logitcache")


if __name__ == "__main__":
    main()
