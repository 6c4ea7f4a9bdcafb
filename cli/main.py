"""The ``logitcache`` command: parse options, resolve specs, call the library, render with rich. Nothing more."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cache a teacher's soft targets once (build), then distill from them at almost no cost (train).")
err = Console(stderr=True)
out = Console()


class Encoding(str, Enum):
    full = "full"
    topk = "topk"


def _run(fn: Callable[[], None]) -> None:
    """User mistakes (LogitcacheError) become one red line and exit code 2; Ctrl-C says how to resume."""
    from logitcache.errors import LogitcacheError

    try:
        fn()
    except LogitcacheError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: finished chunks are kept; rerun the same command with --resume to continue")
        raise typer.Exit(130)


@app.callback()
def _setup() -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)


@app.command()
def build(
    teacher: str = typer.Option(..., help="Run directory from `logitcache train`, pkg.module:fn, path/file.py:fn "
                                          "(fn() returns an nn.Module), or a torchvision model name."),
    dataset: str = typer.Option(..., help="fashion-mnist, mnist, cifar10, cifar100, imagefolder:PATH, or "
                                          "pkg.module:fn / file.py:fn (fn(train=True) returns (image, label) pairs)."),
    out_path: Path = typer.Option(..., "--out", help="Folder of the Zarr store to write."),
    augment: str = typer.Option("pad-crop-flip", help="pad-crop-flip, rrc-flip, none, or pkg.module:fn / file.py:fn "
                                                      "(fn() returns a transform from image to tensor)."),
    views: int = typer.Option(4, min=1, help="Augmented views stored per image; epoch e trains on view e % views."),
    seed: int = typer.Option(0, help="Base seed: view v of sample i is replayed from hash(seed, v, i)."),
    encoding: Encoding = typer.Option(Encoding.topk, help="full: all logits (float16). topk: k largest log-probs, "
                                                          "their ids and the leftover mass."),
    k: int = typer.Option(10, min=1, help="Entries kept per sample for --encoding topk."),
    codec: str = typer.Option("blosc-lz4", help="Compression: blosc-lz4, zstd or none (all add a crc32c checksum)."),
    teacher_weights: Optional[Path] = typer.Option(None, help="State dict (.safetensors or weights-only torch file)."),
    batch_size: int = typer.Option(256, min=1, help="Teacher batch size (part of the cache identity: resume needs "
                                                    "the same)."),
    chunk_rows: int = typer.Option(1024, min=1, help="Samples per stored chunk (the unit of work and of resume)."),
    workers: int = typer.Option(2, min=0, help="DataLoader worker processes for decoding and augmentation."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted build; complete chunks are kept."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing cache at --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run the teacher once over every image x view and store its soft targets in a Zarr v3 store."""

    def go() -> None:
        from logitcache import build_cache, specs

        ds = specs.resolve_dataset(dataset, train=True)
        train_tf, _ = specs.resolve_augment(augment, ds)
        model = specs.resolve_teacher(teacher, teacher_weights)
        cache = build_cache(model, ds, out_path, augment=train_tf, views=views, seed=seed, encoding=encoding.value,
                            k=k, codec=codec, batch_size=batch_size, chunk_rows=chunk_rows, workers=workers,
                            device=device, resume=resume, overwrite=overwrite, progress=not quiet,
                            specs={"teacher": teacher, "dataset": dataset, "augment": augment})
        out.print(f"[green]done[/]: {cache.num_views} views x {cache.num_samples} samples, {cache.num_classes} classes, "
                  f"encoding {cache.encoding} {cache.encoding_params or ''} -> {cache.path}")

    _run(go)


def main() -> None:
    app(prog_name="logitcache")


if __name__ == "__main__":
    main()
