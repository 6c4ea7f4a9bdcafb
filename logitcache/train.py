"""The training loop: plain, online-KD or cached-KD training, writing a run directory that can teach the next run.

A run directory holds ``config.json``, ``metrics.jsonl`` (one line per epoch, flushed as it goes), ``model.json``,
``model.safetensors`` (rewritten atomically after every epoch, so an interrupted run still leaves a usable teacher)
and ``checkpoint.safetensors`` (weights, optimizer and RNG state: ``resume=True`` continues after the last finished
epoch, to the same weights an uninterrupted run reaches).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler, Subset

from . import distributed, specs
from .checkpoint import Progress, load_checkpoint, save_checkpoint
from .data import CachedKDDataset, ReplayDataset
from .encoding import topk_kept_mass
from .errors import LogitcacheError, user_message
from .fingerprint import versions
from .losses import kd_loss, kd_loss_dense
from .progress import progress_bar
from .store import open_cache

KD_MODES = ("none", "cached", "online")


@dataclass
class TrainConfig:
    out: str
    dataset: str = "fashion-mnist"
    model: str = "small-resnet8"
    epochs: int = 5
    kd: str = "none"
    cache: str | None = None
    teacher: str | None = None
    # KD defaults from benchmarks/bench_recipe.py (RESULTS.md, recipe study): at half the budget, T = 2 with equal
    # weight on labels and teacher finished best (+1.35 pp over scratch); every T in {1, 2, 4} at weight 0.5 beat
    # scratch; the former default (T = 4, weight 0.9) was the only recipe that finished below scratch.
    kd_weight: float = 0.5
    temperature: float = 2.0
    kd_until: float = 1.0
    kd_tail: str = "uniform"  # top-k caches: "uniform" or "bucket"
    augment: str | None = None  # default: the cache's augmentation for --kd cached, else pad-crop-flip
    seed: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup: float = 0.05  # fraction of steps with linear warm-up, then cosine decay
    batch_size: int = 128
    workers: int = 2
    device: str = "auto"
    limit: int | None = None  # train on the first `limit` samples only (must match the cache)
    test_limit: int | None = None  # evaluate on the first `test_limit` test samples only
    eval_every: int = 1  # evaluate after every N-th epoch (and always after the last)
    target_accuracy: float | None = None
    overwrite: bool = False
    resume: bool = False  # continue an interrupted run after its last finished epoch
    progress: bool = True


# Options that do not change what a run computes: a resumed run may differ in these.
_RESUMABLE_CHANGES = ("out", "overwrite", "resume", "progress", "workers", "device", "target_accuracy", "eval_every")


@dataclass
class RunResult:
    run_dir: str
    final_accuracy: float
    metrics: list[dict] = field(default_factory=list)
    target_epoch: int | None = None
    target_seconds: float | None = None
    teacher_forwards: int = 0


def _validate(cfg: TrainConfig) -> None:
    if cfg.kd not in KD_MODES:
        raise LogitcacheError(f"--kd must be one of {', '.join(KD_MODES)}, got {cfg.kd!r}")
    if cfg.kd == "cached" and not cfg.cache:
        raise LogitcacheError("--kd cached needs --cache PATH (a store written by `logitcache build`)")
    if cfg.kd == "online" and not cfg.teacher:
        raise LogitcacheError("--kd online needs --teacher (a run directory or a model spec)")
    if cfg.epochs < 1:
        raise LogitcacheError(f"--epochs must be >= 1, got {cfg.epochs}")
    if not 0.0 <= cfg.kd_weight <= 1.0:
        raise LogitcacheError(f"--kd-weight must be in [0, 1], got {cfg.kd_weight}")
    if not 0.0 <= cfg.kd_until <= 1.0:
        raise LogitcacheError(f"--kd-until must be in [0, 1], got {cfg.kd_until}")
    if cfg.kd_tail not in ("uniform", "bucket"):
        raise LogitcacheError(f"--kd-tail must be uniform or bucket, got {cfg.kd_tail!r}")
    if cfg.temperature <= 0:
        raise LogitcacheError(f"--temperature must be > 0, got {cfg.temperature}")
    if cfg.eval_every < 1:
        raise LogitcacheError(f"--eval-every must be >= 1, got {cfg.eval_every}")
    if cfg.batch_size < 1 or cfg.lr <= 0:
        raise LogitcacheError("--batch-size must be >= 1 and --lr > 0")
    if cfg.resume and cfg.overwrite:
        raise LogitcacheError("--resume continues a run and --overwrite replaces it: pass one of them")


def _prepare_run_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise LogitcacheError(f"run directory {path} is not empty; pass --overwrite to replace it")
        if not (path / "config.json").is_file():
            raise LogitcacheError(f"{path} is not a logitcache run directory; refusing to overwrite it")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LogitcacheError(f"cannot create run directory {path}: {e.strerror or e}") from None


def _save_weights(model: torch.nn.Module, run_dir: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = run_dir / "model.safetensors.partial"
    save_file(state, str(tmp))
    os.replace(tmp, run_dir / specs.MODEL_FILE)


def _write_run_header(
    run_dir: Path, cfg: TrainConfig, num_classes: int, in_channels: int, augment_spec: str, device: torch.device, cache
) -> None:
    config = _run_config(cfg, augment_spec, device, cache)
    if cfg.resume and (run_dir / "config.json").is_file():
        _check_resumable(run_dir, config)
        return
    _prepare_run_dir(run_dir, cfg.overwrite)
    (run_dir / specs.MODEL_SPEC_FILE).write_text(
        json.dumps({"model": cfg.model, "num_classes": num_classes, "in_channels": in_channels}, indent=2)
    )
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))


def _check_resumable(run_dir: Path, config: dict[str, Any]) -> None:
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise LogitcacheError(f"cannot read {run_dir / 'config.json'} to resume: {e}") from None
    ignored = {*_RESUMABLE_CHANGES, "versions", "world_size"}
    changed = sorted(k for k in config if k not in ignored and saved.get(k) != config[k])
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {config[k]!r}" for k in changed)
        raise LogitcacheError(
            f"cannot resume {run_dir}: these settings differ from the interrupted run ({detail}); "
            "rerun with the same settings, or pass --overwrite to start again"
        )


def _run_config(cfg: TrainConfig, augment_spec: str, device: torch.device, cache) -> dict[str, Any]:
    return {
        **asdict(cfg),
        "augment": augment_spec,
        "versions": versions(),
        "device": str(device),
        "world_size": distributed.world_size(),
        "cache_fingerprint": (
            {"path": cache.path, "teacher_sha256": cache.meta["teacher"]["sha256"], "created": cache.meta["created"]}
            if cache
            else None
        ),
    }


def _lr_at(step: int, total: int, base: float, warmup: float) -> float:
    warm = max(1, int(warmup * total))
    if step < warm:
        return base * (step + 1) / warm
    return 0.5 * base * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> tuple[int, int]:
    """``(correct, total)`` over ``loader``: counts, so that ranks' shards add up exactly."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct, total


def train(cfg: TrainConfig) -> RunResult:
    """Train one run as configured and write its run directory; returns the metrics and the target-accuracy time."""
    _validate(cfg)
    device = specs.resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    base = specs.resolve_dataset(cfg.dataset, train=True, limit=cfg.limit)
    test_base = specs.resolve_dataset(cfg.dataset, train=False, limit=cfg.test_limit)

    cache = open_cache(cfg.cache) if cfg.kd == "cached" else None
    if cache is not None and cache.encoding == "sampled" and abs(cache.encoding_params["tau"] - cfg.temperature) > 1e-6:
        raise LogitcacheError(
            f"the cache holds samples drawn at temperature {cache.encoding_params['tau']:g}; "
            f"train with --temperature {cache.encoding_params['tau']:g} (sampled targets are only "
            "unbiased at their build temperature)"
        )
    if cache is not None and cache.encoding == "topk":
        _warn_if_tail_dominates(cache, cfg.temperature)
    augment_spec = cfg.augment or (cache.meta["augment"]["spec"] if cache else None) or "pad-crop-flip"
    train_tf, eval_tf = specs.resolve_augment(augment_spec, base)
    if cache is not None:
        train_ds: ReplayDataset = CachedKDDataset(base, cache, augment=train_tf)
    else:
        train_ds = ReplayDataset(base, train_tf, seed=cfg.seed)
    test_ds = ReplayDataset(test_base, eval_tf)

    sample = train_ds.image(0, 0)[0]
    labels = getattr(base, "targets", None)
    num_classes = (
        cache.num_classes
        if cache
        else int(max(labels) + 1 if labels is not None else max(base[i][1] for i in range(len(base))) + 1)
    )
    model = specs.build_model(cfg.model, num_classes, in_channels=sample.shape[0]).to(device)
    teacher = specs.resolve_teacher(cfg.teacher).to(device) if cfg.kd == "online" else None

    # Under torchrun: DDP, one shard of every epoch per rank, and rank 0 alone writes the run directory.
    rank, world = distributed.rank(), distributed.world_size()
    lead = rank == 0
    run_dir = Path(cfg.out)
    if lead:
        try:
            _write_run_header(run_dir, cfg, num_classes, int(sample.shape[0]), augment_spec, device, cache)
        except BaseException:
            distributed.agree(False)
            raise
    if not distributed.agree(True):
        raise LogitcacheError("rank 0 could not prepare the run directory (see its error)")
    trained = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    per_rank_batch = max(1, cfg.batch_size // world)  # the global batch stays --batch-size
    persistent = cfg.workers > 0
    # Each epoch's order is a function of (seed, epoch) alone, so a resumed run shuffles as the uninterrupted one did.
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(
        train_ds,
        batch_size=per_rank_batch,
        sampler=sampler,
        num_workers=cfg.workers,
        persistent_workers=persistent,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    # Each rank evaluates every world-th test sample (no padding, no duplicates); the counts are summed.
    test_shard = Subset(test_ds, range(rank, len(test_ds), world)) if world > 1 else test_ds
    test_loader = DataLoader(test_shard, batch_size=512, num_workers=cfg.workers, persistent_workers=persistent)
    if len(loader) == 0:
        raise LogitcacheError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(train_ds)})")

    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
    )
    total_steps = cfg.epochs * len(loader)
    kd_steps = int(round(cfg.kd_until * total_steps)) if cfg.kd != "none" else 0
    done = load_checkpoint(run_dir, trained, opt) if cfg.resume else Progress()
    result = RunResult(str(run_dir), 0.0)
    step, wall = done.step, done.wall
    teacher_forwards = done.teacher_forwards if lead else 0  # summed over ranks each epoch
    for row in done.metrics:
        _add_row(result, row, cfg)
    metrics_file = None
    if lead:  # rewritten from the checkpoint: rows of an epoch that did not finish saving are dropped
        metrics_file = open(run_dir / "metrics.jsonl", "w")
        metrics_file.writelines(json.dumps(row) + "\n" for row in done.metrics)
        metrics_file.flush()
    try:
        for epoch in range(done.epoch, cfg.epochs):
            train_ds.set_epoch(epoch)
            sampler.set_epoch(epoch)
            model.train()
            start, loss_sum, seen = time.perf_counter(), torch.zeros((), device=device), 0
            scored = [m["test_accuracy"] for m in result.metrics if m["test_accuracy"] is not None]
            last = f" | test acc {scored[-1]:.4f}" if scored else ""
            with progress_bar(
                f"epoch {epoch + 1}/{cfg.epochs}{last}", len(loader) * per_rank_batch * world, cfg.progress and lead
            ) as advance:
                for batch in loader:
                    x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
                    for group in opt.param_groups:
                        group["lr"] = _lr_at(step, total_steps, cfg.lr, cfg.warmup)
                    logits = model(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                    if step < kd_steps:
                        if teacher is not None:
                            with torch.inference_mode():
                                teacher_logits = teacher(x)
                            teacher_forwards += len(x)
                            kd = kd_loss_dense(logits, teacher_logits.clone(), cfg.temperature)
                        else:
                            targets = {k: v.to(device, non_blocking=True) for k, v in batch[2].items()}
                            kd = kd_loss(logits, targets, cfg.temperature, tail=cfg.kd_tail)
                        loss = (1 - cfg.kd_weight) * loss + cfg.kd_weight * kd
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    loss_sum += loss.detach() * len(x)  # no .item(): a host sync per step stalls a GPU
                    seen += len(x)
                    advance(len(x) * world)
            train_seconds = time.perf_counter() - start
            wall += train_seconds
            loss_sum, seen, forwards = distributed.all_sum(loss_sum.item(), seen, teacher_forwards)
            if not math.isfinite(loss_sum):
                raise LogitcacheError(f"the training loss became {loss_sum} in epoch {epoch + 1}; lower --lr")
            accuracy = None
            distributed.broadcast_buffers(trained)  # every rank scores (and rank 0 saves) the same model
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                correct, total = distributed.all_sum(*evaluate(trained, test_loader, device))
                accuracy = correct / total
            wall += time.perf_counter() - start - train_seconds
            row = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "test_accuracy": accuracy,
                "wall_seconds": round(wall, 3),
                "samples_per_second": round(seen / train_seconds, 1),
                "teacher_forwards": int(forwards),
            }
            _add_row(result, row, cfg)
            if lead:
                _save_epoch(run_dir, trained, opt, Progress(epoch + 1, step, wall, int(forwards), result.metrics))
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
    except LogitcacheError as e:  # from a DataLoader worker it arrives wrapped in the worker's traceback text
        raise type(e)(user_message(e)) from None
    finally:
        if metrics_file is not None:
            metrics_file.close()
    result.final_accuracy = result.metrics[-1]["test_accuracy"]
    result.teacher_forwards = result.metrics[-1]["teacher_forwards"]
    return result


def _save_epoch(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, progress: Progress) -> None:
    try:
        _save_weights(model, run_dir)
        save_checkpoint(run_dir, model, opt, progress)
    except OSError as e:
        for partial in run_dir.glob("*.partial"):
            partial.unlink(missing_ok=True)
        kept = f"epochs 1-{progress.epoch - 1} are saved" if progress.epoch > 1 else "no epoch was saved yet"
        raise LogitcacheError(
            f"cannot save epoch {progress.epoch} to {run_dir}: {e.strerror or e} ({kept}; a checkpoint needs about "
            f"{_checkpoint_bytes(model, opt) / 1e6:.1f} MB). Free space, then rerun the same command with --resume"
        ) from None


def _checkpoint_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state = sum(
        v.numel() * v.element_size()
        for s in opt.state_dict()["state"].values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    return 2 * weights + state  # model.safetensors plus the checkpoint's copy and the optimizer state


def _warn_if_tail_dominates(cache, temperature: float) -> None:
    # Top-k keeps the tail's mass but not its shape: when the tail holds most of the softened target, the student
    # learns little of what the teacher knows. Measured on the first chunk, which is cheap and representative.
    kept = topk_kept_mass(cache.read_chunk(0, 0), temperature)
    if kept < 0.5:
        warnings.warn(
            f"at --temperature {temperature:g} the cache's top-{cache.encoding_params['k']} entries hold only "
            f"{kept:.0%} of the teacher's softened probability; the rest is spread flat over the other classes. "
            "Consider a lower temperature, a larger --k, or --encoding quantized / sampled",
            stacklevel=3,
        )


def _add_row(result: RunResult, row: dict[str, Any], cfg: TrainConfig) -> None:
    result.metrics.append(row)
    accuracy = row["test_accuracy"]
    reached = cfg.target_accuracy is not None and accuracy is not None and accuracy >= cfg.target_accuracy
    if reached and result.target_epoch is None:
        result.target_epoch, result.target_seconds = row["epoch"], row["wall_seconds"]


def load_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
