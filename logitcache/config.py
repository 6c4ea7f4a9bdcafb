"""One config per command: ``BuildConfig`` (``logitcache build``) and ``TrainConfig`` (``logitcache train``).

Each field is an option of its command (``batch_size`` -> ``--batch-size``): the CLI is derived from these
declarations (logitcache/cli/options.py), so a field's default, help and bounds are written once, here, and the
Python API takes the same defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from logitcache.compute import PRECISIONS
from logitcache.errors import LogitcacheError
from logitcache.encoding import AUTO, ENCODINGS, TAIL_MODES
from logitcache.encoding.registry import FEW_CLASSES
from logitcache.augment.mix import MIX_MODES
from logitcache.store import CODECS


ENCODE_ON = ("auto", "device", "host")  # where a build encodes the teacher's outputs (logitcache.teacher.writer)
MAX_AUTO_WORKERS = 8
WORKERS_AUTO = (
    f"auto: the CPUs this process may use shared among the ranks on this machine (LOCAL_WORLD_SIZE), at most "
    f"{MAX_AUTO_WORKERS}, at least 1."
)


def resolve_workers(workers: int | str) -> int:
    """A worker count from ``workers``: a number as it is, ``auto`` as ``WORKERS_AUTO`` says (2 on a 2-core machine,
    8 for one rank on 16 cores, 2 for each of 8 ranks there)."""
    if workers == "auto":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return max(1, min(MAX_AUTO_WORKERS, cpus // ranks))
    try:
        n = int(workers)
    except ValueError:
        raise LogitcacheError(f"workers must be a number >= 0 or auto, got {workers!r}") from None
    if n < 0:
        raise LogitcacheError(f"workers must be >= 0, got {n}")
    return n


def option(default: Any, help: str, **cli: Any) -> Any:
    """A config field and its help. ``cli`` keys: ``choices`` (allowed values), ``low`` (smallest value), ``flag``
    (a boolean's one flag, e.g. ``--overwrite``; ``--quiet`` for ``progress`` inverts it), ``short`` (its one-letter
    alias), ``cli=False`` (not an option of the command)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class BuildConfig:
    """One build from specs. Every field but ``options`` is an option of ``logitcache build``; ``options`` holds the
    chosen encoding's own (``k``, ``tail_rank``, ...: the encodings declare them, the CLI offers them)."""

    teacher: str = option(
        "",
        "Run directory from `logitcache train`, several run directories separated by commas (an ensemble of earlier "
        "runs: the mean of their probabilities), timm:NAME (with --teacher-weights), pkg.module:fn, path/file.py:fn "
        "(fn() returns an nn.Module), or a torchvision model name.",
    )
    dataset: str = option(
        "",
        "fashion-mnist, mnist, cifar10, cifar100, imagefolder:PATH, or pkg.module:fn / file.py:fn (fn(train=True) "
        "returns (image, label) pairs).",
    )
    out: str = option("", "Folder of the Zarr store to write, or an fsspec URL (s3://bucket/path, ...).")
    augment: str = option(
        "pad-crop-flip",
        "pad-crop-flip, rrc-flip, none, timm:POLICY (timm's training transform with that auto-augment policy, e.g. "
        "timm:rand-m9-mstd0.5), or pkg.module:fn / file.py:fn (fn() returns a transform from image to tensor).",
    )
    views: int = option(4, "Augmented views stored per image; epoch e trains on view e % views.", low=1)
    seed: int = option(0, "Base seed: view v of sample i is replayed from hash(seed, v, i).")
    encoding: str = option(
        AUTO,
        f"auto: full up to {FEW_CLASSES} classes (every probability), topk8 with its tail table and basis above "
        "(closest to full for its bytes in the fidelity study), headtail beyond 4096; with an encoding's options, "
        "name the encoding. "
        + " ".join(f"{name}: {cls.summary}." for name, cls in ENCODINGS.items())
        + " k is never above what the classes allow unless given.",
        choices=(AUTO, *ENCODINGS),
    )
    codec: str = option("blosc-lz4", "Compression (every codec adds a crc32c checksum).", choices=CODECS)
    mix: str = option(
        "none",
        "Mixup/CutMix per sample (timm's meaning of the options): the teacher labels the mixed images, and `train` "
        "replays the same ones; recorded in the store.",
        choices=MIX_MODES,
    )
    mix_alpha: float = option(0.8, "Mixup's Beta(alpha, alpha).")
    cutmix_alpha: float = option(1.0, "CutMix's Beta(alpha, alpha).")
    mix_prob: float = option(1.0, "Probability that a sample is mixed at all.")
    switch_prob: float = option(0.5, "With --mix both: probability of CutMix rather than Mixup.")
    teacher_weights: str | None = option(
        None,
        "Weights: a .safetensors file, or a training script's checkpoint (a state dict under model / state_dict / "
        "model_ema ..., DDP's module. and Lightning's model. prefixes taken off; loaded without running pickle code).",
    )
    teacher_key: str | None = option(
        None, "Key of the weights in a checkpoint holding several (model, model_ema, ...)."
    )
    num_classes: int | None = option(None, "Classes of a torchvision or timm teacher named by its model name.", low=1)
    batch_size: int = option(256, "Teacher batch size (part of the cache identity: resume needs the same).", low=1)
    chunk_rows: int = option(1024, "Samples per unit: one object per field, the unit of work, resume and reads.", low=1)
    inner_chunk_rows: int | None = option(
        None,
        "Store each unit as a Zarr v3 shard of inner chunks of N rows (N divides --chunk-rows): with a large "
        "--chunk-rows, fewer objects for an object store while other Zarr readers can still fetch a few rows.",
        low=1,
    )
    table_probe: int | None = option(
        None, "Samples of view 0 an encoding's table is fitted on (topk8's tail table; default: 64 per class).", low=1
    )
    workers: int | str = option("auto", "DataLoader worker processes for decoding and augmentation; " + WORKERS_AUTO)
    device: str = option("auto", "auto (CUDA when present), cpu or cuda.")
    limit: int | None = option(None, "Use the first N samples of the dataset only.", low=1)
    resume: bool = option(False, "Finish an interrupted build; complete chunks are kept.", flag="--resume")
    repair: bool = option(
        False,
        "With --resume: first check every stored chunk (checksums, missing files, digests) and recompute the damaged "
        "ones too; the result equals an undamaged build, byte for byte.",
        flag="--repair",
    )
    overwrite: bool = option(False, "Replace an existing cache at --out.", flag="--overwrite")
    dry_run: bool = option(
        False,
        "Write nothing: estimate the store's size and the build's time here from two short probe builds (the first 1 "
        "and 3 chunks of view 0).",
        flag="--dry-run",
    )
    precision: str = option(
        "auto",
        "The teacher's precision: fp32, bf16 or fp16 (autocast); auto: bf16 on a CUDA device that supports it, else "
        "fp32. Recorded in the store; a resume needs the same.",
        choices=PRECISIONS,
    )
    channels_last: bool = option(False, "Channels-last images and teacher weights (faster convolutions on GPUs).",
                                 flag="--channels-last")  # fmt: skip
    compile: bool = option(
        False, "torch.compile the teacher (where the platform cannot compile: uncompiled, with a warning).",
        flag="--compile",
    )  # fmt: skip
    encode_on: str = option(
        "auto",
        "Where the teacher's outputs are encoded: device (on the teacher's device, the few bytes kept copied to the "
        "host while the next batch runs), host (a CPU thread beside the teacher), auto (device on a GPU, host on a "
        "CPU). The stored targets are the same either way, up to float rounding.",
        choices=ENCODE_ON,
    )
    progress: bool = option(True, "No progress bar.", flag="--quiet", short="-q")
    options: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})


KD_MODES = ("none", "cached", "online")
START_METHODS = ("fork", "spawn", "forkserver")


@dataclass
class TrainConfig:
    """One training run. Every field is also an option of ``logitcache train`` (``kd_weight`` -> ``--kd-weight``)."""

    out: str = option("", "Run directory to write (config, metrics, weights); it can teach the next run.")
    dataset: str | None = option(
        None,
        "As `build --dataset`. Default: the cache's (its first N samples) with --kd cached, else fashion-mnist.",
    )
    model: str = option(
        "small-resnet8",
        "small-resnet8/14/20[-wW], timm:NAME (pip install 'logitcache[timm]'), a torchvision model name, or "
        "pkg.module:fn (fn(num_classes=, in_channels=) returns a module).",
    )
    epochs: int = option(5, "Training epochs (a complete warm-up + cosine schedule).", low=1)
    kd: str = option(
        "none",
        "none: plain training. cached: targets from --cache. online: run --teacher on every batch (the baseline the "
        "cache beats).",
        choices=KD_MODES,
    )
    cache: str | None = option(None, "Cache written by `logitcache build` (for --kd cached).")
    teacher: str | None = option(None, "Run directory or teacher spec (for --kd online).")
    # KD defaults from the recipe study (benchmarks/bench_recipe.py, RESULTS.md): T = 2 with equal weight on labels
    # and teacher finishes best at a reduced budget; a high T with a high weight finishes below training without KD.
    kd_weight: float = option(
        0.5,
        "a in loss = (1 - a) * CE + a * T^2 * KL. The defaults (T 2, a 0.5) finished best in the recipe study "
        "(benchmarks/RESULTS.md); high T with a high a fell below training without KD.",
    )
    temperature: float = option(2.0, "Distillation temperature T.")
    # KD for the first half only (Blakeney et al.: KD early in training works best): as good as KD throughout at
    # reduced budgets and better at the full budget, where KD throughout holds a run at its teacher's level
    # (bench_sequence.py, RESULTS.md); it also halves online KD's teacher passes.
    kd_until: float = option(
        0.5,
        "Apply KD for the first fraction F of training steps only, then labels alone: KD helps most early, and late "
        "KD holds a run near its teacher (benchmarks/RESULTS.md); 1 = throughout.",
    )
    kd_tail: str = option(
        "uniform",
        "Top-k caches: uniform (spread the leftover mass over the other classes) or bucket (one 'rest' class).",
        choices=TAIL_MODES,
    )
    augment: str | None = option(
        None,
        "Training augmentation (as `build --augment`); default: the cache's for --kd cached, else pad-crop-flip.",
    )
    mix: str | None = option(
        None,
        "Mixup/CutMix, mixed per sample (timm's meaning of the options): none, mixup, cutmix or both. Default: the "
        "cache's for --kd cached (the teacher labelled the mixed images), else none.",
        choices=MIX_MODES,
    )
    mix_alpha: float = option(0.8, "Mixup's Beta(alpha, alpha).")
    cutmix_alpha: float = option(1.0, "CutMix's Beta(alpha, alpha).")
    mix_prob: float = option(1.0, "Probability that a sample is mixed at all.")
    switch_prob: float = option(0.5, "With --mix both: probability of CutMix rather than Mixup.")
    seed: int = option(0, "Seeds initialisation, shuffling and (without a cache) augmentation.")
    lr: float = option(0.1, "Peak learning rate (SGD, nesterov momentum, warm-up then cosine).")
    momentum: float = option(0.9, "SGD momentum (nesterov when > 0).")
    weight_decay: float = option(5e-4, "L2 weight decay.")
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy term.")
    warmup: float = option(0.05, "Fraction of steps with linear warm-up, then cosine decay.")
    batch_size: int = option(128, "Global batch size (split over torchrun ranks).", low=1)
    workers: int | str = option("auto", "DataLoader worker processes; " + WORKERS_AUTO)
    start_method: str | None = option(
        None,
        "How DataLoader workers start: fork, spawn or forkserver; default: the platform's (fork on Linux before "
        "Python 3.14, forkserver from 3.14, spawn on macOS). Every one serves exactly the cached views.",
        choices=START_METHODS,
    )
    device: str = option("auto", "auto (CUDA when present), cpu or cuda.")
    limit: int | None = option(None, "Train on the first N samples only (must match the cache).", low=1)
    test_limit: int | None = option(None, "Evaluate on the first N test samples only.", low=1)
    eval_every: int = option(
        1, "Evaluate after every N-th epoch and the last (evaluation can cost more than a short epoch).", low=1
    )
    target_memory_mb: float = option(
        4096,
        "Memory per rank for one view of cached targets: a view that fits is read once per epoch into memory shared "
        "by the DataLoader workers; a larger one is shuffled chunk-aware (logitcache.read.sampler.ChunkShuffleSampler) "
        "and read window by window, once per rank, into a ring of 3 windows the workers share.",
    )
    shuffle_window: int = option(
        8, "Chunks whose samples are shuffled together when the view does not fit --target-memory-mb.", low=1
    )
    target_accuracy: float | None = option(None, "Report the epoch and time the test accuracy first reaches X (0-1).")
    precision: str = option(
        "auto",
        "Autocast precision of the student's and the online teacher's passes: fp32, bf16 or fp16 (with a gradient "
        "scaler); auto: bf16 on a CUDA device that supports it, else fp32. A resumed run keeps its precision.",
        choices=PRECISIONS,
    )
    channels_last: bool = option(False, "Channels-last images and weights (faster convolutions on GPUs).",
                                 flag="--channels-last")  # fmt: skip
    compile: bool = option(
        False, "torch.compile the student (where the platform cannot compile: uncompiled, with a warning).",
        flag="--compile",
    )  # fmt: skip
    deterministic: bool = option(
        False,
        "Deterministic algorithms only (torch.use_deterministic_algorithms; cuDNN autotuning off): on a GPU, the "
        "run's weights then repeat bitwise and a resumed run reaches an uninterrupted one's. On a CPU they do anyway.",
        flag="--deterministic",
    )
    overwrite: bool = option(False, "Replace an existing run directory.", flag="--overwrite")
    resume: bool = option(
        False, "Continue an interrupted run after its last finished epoch (same settings).", flag="--resume"
    )
    progress: bool = option(True, "No progress bars.", flag="--quiet", short="-q")
