"""The training loop: plain, online-KD or cached-KD training, writing a run directory that can teach the next run.

A run directory holds ``config.json``, ``metrics.jsonl`` (one line per epoch, flushed as it goes), ``model.json``,
``model.safetensors`` (rewritten atomically after every epoch, so an interrupted run still leaves a usable teacher)
and ``checkpoint.safetensors`` (weights, optimizer and every device's RNG state: ``resume=True`` continues after the
last finished epoch, to the same weights an uninterrupted run reaches on a CPU, and on a GPU with ``deterministic``:
cuDNN's autotuned kernels and float atomics are not bitwise repeatable otherwise).
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler, Subset

from logitcache import distributed
from logitcache import specs
from logitcache.student.checkpoint import RunState, load_checkpoint, save_checkpoint
from logitcache.compute import Compute, compiled, resolve_precision
from logitcache.config import KD_MODES, TrainConfig, resolve_workers
from logitcache.read.dataset import CachedKDDataset, ReplayDataset
from logitcache.datasets import labels_of
from logitcache.encoding import TAIL_MODES
from logitcache.errors import LogitcacheError, user_message
from logitcache.store.identity import versions
from logitcache.student.losses import kd_loss, kd_loss_dense
from logitcache.augment.mix import Mix
from logitcache.progress import note, progress_bar
from logitcache.read.sampler import ChunkShuffleSampler
from logitcache.store import open_cache

# Options that do not change what a run computes: a resumed run may differ in these.
_RESUMABLE_CHANGES = (
    "out", "overwrite", "resume", "progress", "workers", "start_method", "device", "target_accuracy", "eval_every",
    "channels_last", "compile", "deterministic",
)  # fmt: skip


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
    if not cfg.out:
        raise LogitcacheError("--out is needed: the run directory to write")
    if cfg.epochs < 1:
        raise LogitcacheError(f"--epochs must be >= 1, got {cfg.epochs}")
    if not 0.0 <= cfg.kd_weight <= 1.0:
        raise LogitcacheError(f"--kd-weight must be in [0, 1], got {cfg.kd_weight}")
    if not 0.0 <= cfg.kd_until <= 1.0:
        raise LogitcacheError(f"--kd-until must be in [0, 1], got {cfg.kd_until}")
    if cfg.kd_tail not in TAIL_MODES:
        raise LogitcacheError(f"--kd-tail must be one of {', '.join(TAIL_MODES)}, got {cfg.kd_tail!r}")
    if cfg.temperature <= 0:
        raise LogitcacheError(f"--temperature must be > 0, got {cfg.temperature}")
    if cfg.eval_every < 1:
        raise LogitcacheError(f"--eval-every must be >= 1, got {cfg.eval_every}")
    if cfg.batch_size < 1 or cfg.lr <= 0:
        raise LogitcacheError("--batch-size must be >= 1 and --lr > 0")
    if cfg.resume and cfg.overwrite:
        raise LogitcacheError("--resume continues a run and --overwrite replaces it: pass one of them")


def _with_recorded_data(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its dataset named: given, or for --kd cached the one the cache records (its first N samples, N
    the cache's length, unless --limit is given), else Fashion-MNIST. What was taken from the cache is said in one
    line; the run's config.json records the result."""
    if cfg.dataset is not None:
        return cfg
    if cfg.kd != "cached":
        return replace(cfg, dataset="fashion-mnist")
    assert cfg.cache is not None  # _validate: --kd cached needs --cache
    cache = open_cache(cfg.cache)
    meta = cache.meta
    spec = meta.dataset.spec
    if spec is None:
        raise LogitcacheError("the cache was built from Python on a dataset object, not a spec: pass --dataset")
    limit = cfg.limit or meta.dataset.length
    taken = [f"dataset {spec} (first {limit:,} samples)"]
    if cfg.augment is None:
        taken.append(f"augmentation {meta.augment.spec}")
    if cfg.mix is None:
        taken.append(f"mixing {cache.mix.mode}")
    note("from the cache: " + ", ".join(taken), cfg.progress and distributed.rank() == 0)
    return replace(cfg, dataset=spec, limit=limit)


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
            {"path": cache.path, "teacher_sha256": cache.meta.teacher.sha256, "created": cache.meta.created}
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
def evaluate(
    model: torch.nn.Module, loader: DataLoader, device: torch.device, compute: Compute | None = None
) -> tuple[int, int]:
    """``(correct, total)`` over ``loader``: counts, so that ranks' shards add up exactly. ``compute``: the run's
    precision and memory format (default: fp32 on ``device``)."""
    compute = compute or Compute(device)
    model.eval()
    correct = total = 0
    for x, y in loader:
        with compute.autocast():
            pred = model(compute.inputs(x)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct, total


@dataclass
class _Run:
    """Everything one run trains with, set up once by ``_setup``."""

    cfg: TrainConfig
    device: torch.device
    compute: Compute  # the device, the precision and the memory format of the passes
    scaler: torch.amp.GradScaler | None  # fp16 only
    run_dir: Path
    model: torch.nn.Module  # what trains (DistributedDataParallel under torchrun)
    trained: torch.nn.Module  # the bare model: evaluated and saved
    teacher: torch.nn.Module | None  # online KD
    train_ds: ReplayDataset
    sampler: DistributedSampler | ChunkShuffleSampler
    loader: DataLoader
    test_loader: DataLoader
    opt: torch.optim.Optimizer
    total_steps: int
    kd_steps: int
    lead: bool  # rank 0: writes the run directory
    world: int
    stepped: bool = False  # a training step has run (a compiled model's training graph has compiled)


def train(cfg: TrainConfig) -> RunResult:
    """Train one run as configured and write its run directory; returns the metrics and the target-accuracy time.
    ``deterministic`` holds for this call: the process's own setting is restored when it returns."""
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        return _train(cfg)
    finally:
        torch.use_deterministic_algorithms(deterministic[0])
        torch.backends.cudnn.benchmark = deterministic[1]


def _train(cfg: TrainConfig) -> RunResult:
    _validate(cfg)
    cfg = _with_recorded_data(cfg)
    run = _setup(cfg)
    state = load_checkpoint(run.run_dir, run.trained, run.opt) if cfg.resume else RunState()
    if run.scaler is not None and state.scaler:
        run.scaler.load_state_dict(state.scaler)
    result = RunResult(str(run.run_dir), 0.0)
    for row in state.metrics:
        _add_row(result, row, cfg)
    forwards = state.teacher_forwards if run.lead else 0  # summed over ranks each epoch
    metrics_file = _open_metrics(run, state)
    try:
        for epoch in range(state.epoch, cfg.epochs):
            start = time.perf_counter()
            loss_sum, seen, forwards = _train_epoch(run, epoch, state, forwards, _last_accuracy(result))
            train_seconds = time.perf_counter() - start
            loss_sum, seen, all_forwards = distributed.all_sum(loss_sum, seen, forwards)
            if not math.isfinite(loss_sum):
                raise LogitcacheError(f"the training loss became {loss_sum} in epoch {epoch + 1}; lower --lr")
            accuracy = _evaluate_epoch(run, epoch)
            state.wall += time.perf_counter() - start
            row = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "test_accuracy": accuracy,
                "wall_seconds": round(state.wall, 3),
                "samples_per_second": round(seen / train_seconds, 1),
                "teacher_forwards": int(all_forwards),
            }
            _add_row(result, row, cfg)
            if run.lead:
                scaler = run.scaler.state_dict() if run.scaler is not None else {}
                state = RunState(epoch + 1, state.step, state.wall, int(all_forwards), result.metrics, scaler)
                _save_epoch(run.run_dir, run.trained, run.opt, state)
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
    except LogitcacheError as e:  # from a DataLoader worker it arrives wrapped in the worker's traceback text
        raise type(e)(user_message(e)) from None
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if isinstance(run.train_ds, CachedKDDataset):
            run.train_ds.close()  # its background reads stop here, however the run ends
    result.final_accuracy = result.metrics[-1]["test_accuracy"]
    result.teacher_forwards = result.metrics[-1]["teacher_forwards"]
    return result


def _setup(cfg: TrainConfig) -> _Run:
    """Datasets (with the cache's checks), model, teacher, run directory, DDP, loaders and optimizer."""
    device = specs.resolve_device(cfg.device)
    # recorded concrete: a resume keeps them
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device), workers=resolve_workers(cfg.workers))
    compute = Compute(device, cfg.precision, cfg.channels_last)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for repeatable results
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(cfg.seed)
    assert cfg.dataset is not None  # named by _with_recorded_data
    base = specs.resolve_dataset(cfg.dataset, train=True, limit=cfg.limit)
    test_base = specs.resolve_dataset(cfg.dataset, train=False, limit=cfg.test_limit)

    cache = None
    if cfg.kd == "cached":
        assert cfg.cache is not None  # _validate: --kd cached needs --cache
        cache = open_cache(cfg.cache)
    if cache is not None:
        cache.encoding.check_temperature(cfg.temperature)
        _warn_if_tail_dominates(cache, cfg.temperature)
    augment_spec = cfg.augment or (cache.meta.augment.spec if cache else None) or "pad-crop-flip"
    train_tf, eval_tf = specs.resolve_augment(augment_spec, base)
    if cfg.mix is None:  # the cache's mixing (the images its teacher labelled), else none
        mix = cache.mix if cache is not None else Mix()
    else:
        mix = Mix(cfg.mix, cfg.mix_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.switch_prob)
    if cache is not None:
        train_ds: ReplayDataset = CachedKDDataset(
            base, cache, augment=train_tf, mix=mix, memory_mb=cfg.target_memory_mb
        )
    else:
        train_ds = ReplayDataset(base, train_tf, seed=cfg.seed, mix=mix)
    test_ds = ReplayDataset(test_base, eval_tf)

    in_channels = int(train_ds.image(0, 0)[0].shape[0])
    num_classes = cache.num_classes if cache else int(labels_of(base).max()) + 1
    model = compute.model(specs.build_model(cfg.model, num_classes, in_channels=in_channels))
    teacher = None
    if cfg.kd == "online":
        assert cfg.teacher is not None  # _validate: --kd online needs --teacher
        teacher = compute.model(specs.resolve_teacher(cfg.teacher))

    # Under torchrun: DDP, one shard of every epoch per rank, and rank 0 alone writes the run directory.
    rank, world = distributed.rank(), distributed.world_size()
    run_dir = Path(cfg.out)
    if rank == 0:
        try:
            _write_run_header(run_dir, cfg, num_classes, in_channels, augment_spec, device, cache)
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

    sampler, loader, test_loader = _loaders(cfg, train_ds, test_ds, device, rank, world)

    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
    )
    total_steps = cfg.epochs * len(loader)
    kd_steps = int(round(cfg.kd_until * total_steps)) if cfg.kd != "none" else 0
    if cfg.compile:  # checked by one pass over a full batch in evaluation mode, which changes no statistic
        rows = min(loader.batch_size or 1, len(train_ds))
        sample = compute.inputs(torch.stack([train_ds.image(i, 0)[0] for i in range(rows)]))
        model = compiled(model, lambda m: _eval_pass(m, sample, compute))
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    return _Run(
        cfg, device, compute, scaler, run_dir, model, trained, teacher, train_ds, sampler, loader, test_loader, opt,
        total_steps, kd_steps, rank == 0, world,
    )  # fmt: skip


def _loaders(
    cfg: TrainConfig, train_ds: ReplayDataset, test_ds: ReplayDataset, device: torch.device, rank: int, world: int
) -> tuple[DistributedSampler | ChunkShuffleSampler, DataLoader, DataLoader]:
    """The training sampler and loader (this rank's share of every epoch) and the evaluation loader, whose workers
    start here."""
    workers = resolve_workers(cfg.workers)
    persistent = workers > 0
    context = cfg.start_method if workers > 0 else None
    default = mp.get_start_method(allow_none=True) or mp.get_all_start_methods()[0]
    if workers and (context or default) == "forkserver":
        # workers forked from a server that imported torch and logitcache once start in a fraction of a second
        mp.get_context("forkserver").set_forkserver_preload(["logitcache"])
    # Each epoch's order is a function of (seed, epoch) alone, so a resumed run shuffles as the uninterrupted one did.
    if isinstance(train_ds, CachedKDDataset):  # its read path's sampler, the same kind on every rank
        sampler = train_ds.sampler(num_replicas=world, rank=rank, seed=cfg.seed, window=cfg.shuffle_window)
    else:
        sampler = DistributedSampler(
            train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
    loader = DataLoader(
        train_ds,
        batch_size=max(1, cfg.batch_size // world),  # the global batch stays --batch-size
        sampler=sampler,
        num_workers=workers,
        persistent_workers=persistent,
        drop_last=True,
        pin_memory=device.type == "cuda",
        multiprocessing_context=context,
    )
    if len(loader) == 0:
        raise LogitcacheError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(train_ds)})")
    # Each rank evaluates every world-th test sample (no padding, no duplicates); the counts are summed.
    test_shard = Subset(test_ds, range(rank, len(test_ds), world)) if world > 1 else test_ds
    test_loader = DataLoader(
        test_shard, batch_size=512, num_workers=workers, persistent_workers=persistent,
        multiprocessing_context=context,
    )  # fmt: skip
    if persistent:
        # Its workers start now, before the dataset's background threads exist: forked later, after an epoch, a
        # worker of this loader hung under torchrun (benchmarks/RESULTS.md, process layouts). The few batches they
        # load now are dropped when the first evaluation resets the iterator.
        iter(test_loader)
    return sampler, loader, test_loader


def _eval_pass(model: torch.nn.Module, x: torch.Tensor, compute: Compute) -> None:
    model.eval()
    try:
        with torch.no_grad(), compute.autocast():
            model(x)
    finally:
        model.train()


def _open_metrics(run: _Run, state: RunState):
    """metrics.jsonl, rewritten from the checkpoint: rows of an epoch that did not finish saving are dropped."""
    if not run.lead:
        return None
    f = open(run.run_dir / "metrics.jsonl", "w")
    f.writelines(json.dumps(row) + "\n" for row in state.metrics)
    f.flush()
    return f


def _last_accuracy(result: RunResult) -> float | None:
    scored = [m["test_accuracy"] for m in result.metrics if m["test_accuracy"] is not None]
    return scored[-1] if scored else None


def _train_epoch(run: _Run, epoch: int, state: RunState, forwards: int, last_accuracy: float | None):
    """One epoch; returns this rank's summed loss, samples seen, and teacher forward passes so far."""
    cfg, device = run.cfg, run.device
    run.train_ds.set_epoch(epoch)
    run.sampler.set_epoch(epoch)
    run.model.train()
    loss_sum, seen = torch.zeros((), device=device), 0
    label = f"epoch {epoch + 1}/{cfg.epochs}" + (
        f" acc {last_accuracy:.4f}" if last_accuracy is not None else ""
    )
    assert run.loader.batch_size is not None  # _setup builds the loader with a batch size
    samples = len(run.loader) * run.loader.batch_size * run.world
    batches = iter(run.loader)  # workers start (first epoch) before the progress bar's thread does
    watch = sync_watch(device)
    with progress_bar(label, samples, cfg.progress and run.lead) as advance:
        for i, batch in enumerate(batches):
            for group in run.opt.param_groups:
                group["lr"] = _lr_at(state.step, run.total_steps, cfg.lr, cfg.warmup)
            # steady state: the first step of an epoch allocates, warms up and (with --compile) compiles
            with watch(i > 0):
                loss, scaled, teacher_forwards = _forward_backward(run, batch, state.step)
                if run.scaler is None:
                    run.opt.step()
            if run.scaler is not None:  # fp16: reads the found-inf flag on the host, by design of the scaler
                run.scaler.step(run.opt)
                run.scaler.update()
            forwards += teacher_forwards
            state.step += 1
            loss_sum += loss.detach() * len(batch[0])  # no .item(): a host sync per step stalls a GPU
            seen += len(batch[0])
            advance(len(batch[0]) * run.world)
    return loss_sum.item(), seen, forwards


def step_loss(run: _Run, batch: tuple, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Everything a training step computes before ``backward()``: the batch on the device, the student's forward
    pass (autocast, channels-last), cross-entropy, and the KD loss (online: the teacher's pass; cached: the stored
    targets decoded on the device). Returns the loss, what ``backward()`` takes (scaled for fp16), and the teacher
    forward passes made. No host read of a device value: a GPU step never waits here."""
    cfg, device = run.cfg, run.device
    x, y = run.compute.inputs(batch[0]), batch[1].to(device, non_blocking=True)
    with run.compute.autocast():
        logits = run.model(x)
    logits = logits.float()  # the losses in fp32, whatever the precision of the pass
    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    forwards = 0
    if step < run.kd_steps:
        if run.teacher is not None:
            with torch.inference_mode(), run.compute.autocast():
                teacher_logits = run.teacher(x).float()
            forwards = len(x)
            kd = kd_loss_dense(logits, teacher_logits.clone(), cfg.temperature)
        else:
            targets = {k: v.to(device, non_blocking=True) for k, v in batch[2].items()}
            kd = kd_loss(logits, targets, cfg.temperature, tail=cfg.kd_tail, cache=run.train_ds)
        loss = (1 - cfg.kd_weight) * loss + cfg.kd_weight * kd
    scaled = run.scaler.scale(loss) if run.scaler is not None else loss  # fp16: small gradients do not underflow
    return loss, scaled, forwards


def _forward_backward(run: _Run, batch: tuple, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``step_loss`` and ``backward()``. At the run's first step, a compiled model that fails to compile its training
    graph (forward or backward, first met here) falls back to the uncompiled model with one warning, as a failure
    at setup does."""
    run.opt.zero_grad(set_to_none=True)
    first, run.stepped = not run.stepped, True
    try:
        loss, scaled, forwards = step_loss(run, batch, step)
        scaled.backward()
    except Exception as e:
        original = getattr(run.model, "_orig_mod", None)
        if original is None or not first:
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        warnings.warn(f"--compile: the training step cannot compile ({reason}); running uncompiled", stacklevel=2)
        run.model = original
        run.opt.zero_grad(set_to_none=True)
        loss, scaled, forwards = step_loss(run, batch, step)
        scaled.backward()
    return loss, scaled, forwards


def sync_watch(device: torch.device):
    """``watch(on)``: a context in which CUDA raises (``LOGITCACHE_SYNC_DEBUG=error``) or warns (``=warn``) at any
    host synchronisation, when ``on`` and the device is a GPU; a no-op otherwise. The GPU session runs training
    under it to prove the steady-state step never waits for the device."""
    mode = os.environ.get("LOGITCACHE_SYNC_DEBUG", "")

    @contextlib.contextmanager
    def watch(on: bool):
        if not (on and mode and device.type == "cuda"):
            yield
            return
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    return watch


def _evaluate_epoch(run: _Run, epoch: int) -> float | None:
    """Test accuracy after this epoch, or None when --eval-every skips it (the last epoch is always scored)."""
    distributed.broadcast_buffers(run.trained)  # every rank scores (and rank 0 saves) the same model
    if (epoch + 1) % run.cfg.eval_every and epoch + 1 != run.cfg.epochs:
        return None
    correct, total = distributed.all_sum(*evaluate(run.trained, run.test_loader, run.device, run.compute))
    return correct / total


def _save_epoch(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: RunState) -> None:
    try:
        _save_weights(model, run_dir)
        save_checkpoint(run_dir, model, opt, state)
    except OSError as e:
        for partial in run_dir.glob("*.partial"):
            partial.unlink(missing_ok=True)
        kept = f"epochs 1-{state.epoch - 1} are saved" if state.epoch > 1 else "no epoch was saved yet"
        raise LogitcacheError(
            f"cannot save epoch {state.epoch} to {run_dir}: {e.strerror or e} ({kept}; a checkpoint needs about "
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
    flat = cache.encoding.flat_tail_share(cache.read_chunk(0, 0), temperature)
    if flat is not None and flat > 0.5:
        warnings.warn(
            f"at --temperature {temperature:g} the cache's top-{cache.encoding.k} entries hold only "
            f"{1 - flat:.0%} of the teacher's softened probability; the rest is spread flat over the other classes. "
            "Consider a lower temperature, a larger --k, or --encoding topk8 (its tail table keeps the tail's shape) "
            "/ headtail / quantized",
            stacklevel=4,
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
