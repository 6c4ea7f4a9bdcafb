"""The precompute stage: teacher over dataset x views -> a cache.

Read top to bottom: ``build_cache`` checks its arguments, probes the teacher on one image, opens (or validates) the
store, plans the units still to do and runs the teacher over them. DataLoader workers decode and augment (replayed
from seeds); the main process runs the teacher; each finished unit (one chunk of one view) is encoded on the teacher's
device or on a host thread and compressed and written by that thread while the next batches are computed
(``logitcache.teacher.writer``). Batches never straddle a unit, so a unit's bytes do not
depend on which run, resume or rank computed it.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import shutil
import warnings
from collections import deque
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import zarr
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from logitcache import distributed
from logitcache import store
from logitcache.augment.presets import dataset_and_augment
from logitcache.store.compat import differences, inputs_of
from logitcache.datasets import dataset_len, labels_of
from logitcache.compute import Compute, compiled
from logitcache.config import BuildConfig, resolve_workers
from logitcache.encoding import AUTO, ENCODINGS, Encoding, make_encoding
from logitcache.errors import LogitcacheError
from logitcache.store.meta import AugmentRecord, CacheMeta, EncodingRecord, TeacherRecord
from logitcache.store.identity import teacher_sha256, versions
from logitcache.augment.mix import Mix, mixed_view
from logitcache.progress import progress_bar
from logitcache.augment.seeds import replay_view
from logitcache.specs import resolve_augment, resolve_dataset, resolve_device, resolve_teacher
from logitcache.teacher.writer import UnitWriter, encodes_on_device


class ReplayedViews(Dataset):
    """Flat index ``view * N + i`` -> the replayed augmented view of sample ``i`` (mixed with its partner's when
    ``mix`` is active): the image the teacher labels."""

    def __init__(self, dataset: Dataset, transform: Callable[[Any], torch.Tensor], seed: int, mix: Mix | None = None):
        self.dataset, self.transform, self.seed, self.n = dataset, transform, seed, dataset_len(dataset)
        self.mix = mix or Mix()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, flat: int) -> torch.Tensor:
        view, index = divmod(flat, self.n)
        if self.mix.active:
            return mixed_view(self.transform, self.dataset, self.seed, view, index, self.mix)[0]
        return replay_view(self.transform, self.dataset[index][0], self.seed, view, index)


class PlannedBatch(NamedTuple):
    unit: tuple[int, int]  # (view, chunk)
    indices: list[int]  # flat indices view * N + i
    last: bool  # the unit's last batch: its logits are complete and go to the writer


def plan_batches(layout: store.Layout, units: list[tuple[int, int]], batch_size: int) -> list[PlannedBatch]:
    """The batches of ``units``; batch boundaries restart at every unit so results are unit-local."""
    plan = []
    for view, chunk in units:
        start, stop = layout.rows(chunk)
        for b in range(start, stop, batch_size):
            end = min(b + batch_size, stop)
            plan.append(
                PlannedBatch((view, chunk), [view * layout.num_samples + i for i in range(b, end)], end == stop)
            )
    return plan


def teacher_pass(
    teacher: nn.Module,
    images: Dataset | Sequence[torch.Tensor],
    compute: Compute,
    *,
    batch_size: int = 1,
    batches: Iterable[list[int]] | None = None,
    workers: int = 0,
    host: bool = True,
) -> Iterator[torch.Tensor]:
    """The teacher's logits (float32, on the CPU; with ``host=False`` left on the teacher's device) for ``images``,
    batch by batch in order: the one way the build, its table's probe, the build's first check and ``verify`` run a
    teacher. ``batches``: the indices of each batch (else consecutive batches of ``batch_size``). Workers decode and
    augment; the teacher runs here, on ``compute``'s device, in its precision and memory format. The workers start at
    the call, before the caller's progress bar starts its thread."""
    order = {"batch_sampler": batches} if batches is not None else {"batch_size": batch_size}
    # DataLoader reads any indexable sequence, though its annotation names Dataset alone
    pin = compute.device.type == "cuda"
    loader = iter(DataLoader(images, num_workers=workers, pin_memory=pin, **order))  # type: ignore[arg-type]
    return _logits(teacher, loader, compute, host)


def _logits(teacher: nn.Module, loader: Iterator[torch.Tensor], compute: Compute, host: bool) -> Iterator[torch.Tensor]:
    for x in loader:
        with torch.inference_mode(), compute.autocast():
            out = teacher(compute.inputs(x))
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise LogitcacheError(
                f"the teacher must return logits of shape [batch, classes]; it returned "
                f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}"
            )
        yield out.float().cpu() if host else out.float()


def _check_compatible(path: str, existing: CacheMeta, meta: CacheMeta) -> None:
    """``--resume`` into an existing store: the same settings, teacher, dataset and augmentation, or a refusal."""
    was, now = existing.identity(), meta.identity()
    for key in CacheMeta.IDENTITY:
        if was[key] != now[key]:
            raise LogitcacheError(
                f"{path} was built with {key}={was[key]!r}, this build has {now[key]!r}; pass --overwrite to replace it"
            )
    if existing.teacher.sha256 != meta.teacher.sha256:
        raise LogitcacheError(f"{path} was built with a different teacher; pass --overwrite to replace it")
    for diff in differences(existing.inputs(), meta.inputs()):
        what = "a different augmentation" if diff.what == "augmentation" else "a different dataset"
        raise LogitcacheError(f"{path} was built with {what} ({diff}); pass --overwrite to replace it")


def _open_output(job: "_Build", meta: CacheMeta, *, resume: bool, overwrite: bool, repair: bool) -> zarr.Group:
    out, labels = job.out, job.labels
    if repair and not resume:
        raise LogitcacheError("--repair works on an existing cache: pass it together with --resume")
    if store.is_store(out):
        if overwrite:
            store.remove_store(out)
        elif resume:
            recorded = CacheMeta.from_json(store.store_attributes(store.open_group(out, mode="r")), out)
            _check_compatible(out, recorded, meta)
            if repair:
                _mark_damaged_units(out, labels)
            return store.open_group(out, mode="r+")
        else:
            done = store.open_cache(out).completion()
            raise LogitcacheError(
                f"{out} already holds a cache ({int(done.sum())}/{done.size} chunks complete); "
                "pass --resume to finish it or --overwrite to replace it"
            )
    elif not store.is_url(out):
        path = Path(out)
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            raise LogitcacheError(f"{out} exists and is not a logitcache store; choose another --out")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LogitcacheError(f"cannot create {out}: {e.strerror or e}") from None
        if not os.access(path, os.W_OK):
            raise LogitcacheError(f"{out} is not writable")
    fields = job.encoding.fields()
    fitted = _fit_table(job)  # before the store is created: an interrupt here leaves no store behind
    if fitted is None:
        return store.create_store(out, meta, fields, job.codec, labels)
    table, probe = fitted
    return store.create_store(out, meta.with_table(store.table_meta(table, probe)), fields, job.codec, labels, table)


def _mark_damaged_units(out: str, labels: np.ndarray) -> None:
    """``--repair``: every complete unit whose chunks fail their checks is marked unfinished, so that the resume that
    follows recomputes exactly those (to the same bytes); damaged labels are rewritten from the dataset."""
    cache = store.open_cache(out)
    if cache.meta.format_version < 3:
        raise LogitcacheError(
            f"{out} has format version {cache.meta.format_version}, which records no digests, so damage cannot be "
            "told from data; rebuild it with --overwrite"
        )
    damaged = [(v, c, why) for v, c, why in cache.scan() if not why.startswith("incomplete")]
    whole = [why for v, _, why in damaged if v < 0]
    if whole:  # the encoding's table: fitted before the units, which all decode with it
        raise LogitcacheError(f"{out} is damaged beyond units ({whole[0]}); rebuild it with --overwrite")
    group = store.open_group(out, mode="r+")
    for v, c, _ in damaged:
        store.member_array(group, store.COMPLETE)[v, c] = 0
    try:
        labels_ok = np.array_equal(cache.labels().numpy(), labels)
    except LogitcacheError:
        labels_ok = False
    if not labels_ok:
        stored_labels = store.member_array(group, store.LABELS)
        stored_labels[...] = labels.astype(stored_labels.dtype)
    if damaged or not labels_ok:
        listed = "; ".join(f"view {v}, chunk {c}: {why}" for v, c, why in damaged[:5])
        more = f" and {len(damaged) - 5} more" if len(damaged) > 5 else ""
        warnings.warn(
            f"repair: recomputing {len(damaged)} damaged chunk(s)"
            + (f" ({listed}{more})" if damaged else "")
            + ("; labels rewritten" if not labels_ok else ""),
            stacklevel=3,
        )
    else:
        warnings.warn("repair: every complete chunk passed its checks; nothing to recompute", stacklevel=3)


def size_text(n: float) -> str:
    """Bytes for people: 1.2 MB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def raw_bytes(fields: dict, views: int, samples: int) -> int:
    """The targets' size before compression: an upper bound on what the store needs (compression only shrinks it)."""
    return views * samples * sum(f.dtype.itemsize * math.prod(f.shape) for f in fields.values())


def _out_of_space(out: str, error: OSError, group: zarr.Group, fields: dict, layout: store.Layout) -> LogitcacheError:
    """One line for a full disk, a quota or a read-only filesystem: what failed, what is kept, how much is needed."""
    done = int(store.Cache(out, group).completion().sum())
    total = layout.num_views * layout.num_chunks
    raw = raw_bytes(fields, layout.num_views, layout.num_samples)
    need = f"up to {size_text(raw)} (before compression)"
    try:
        stored = sum(store.member_array(group, name).nbytes_stored() for name in fields)
        if done:
            estimate = size_text(stored / done * total)
            need = f"about {estimate} (from the {done} chunks written), at most {size_text(raw)}"
    except Exception:
        pass
    free = ""
    if not store.is_url(out):
        free = f"; {size_text(shutil.disk_usage(out).free)} free there now"
    return LogitcacheError(
        f"writing the cache to {out} failed: {error.strerror or error}. {done}/{total} chunks are complete and kept. "
        f"The whole cache needs {need}{free}. Free space (or choose another --out), then rerun the same command "
        "with --resume"
    )


def _metadata(job: "_Build") -> CacheMeta:
    """The group attributes (docs/format.md): identity, fingerprints and versions."""
    images, layout, encoding, specs = job.images, job.layout, job.encoding, job.specs
    module = getattr(job.teacher, "_orig_mod", job.teacher)  # a compiled teacher is its module, compiled
    inputs = inputs_of(images.dataset, images.transform, images.seed, layout.num_views, job.labels, mix=images.mix)
    return CacheMeta(
        format_version=store.FORMAT_VERSION,
        num_samples=layout.num_samples,
        num_views=layout.num_views,
        num_classes=encoding.num_classes,
        chunk_rows=layout.chunk_rows,
        batch_size=job.batch_size,
        seed=images.seed,
        codec=job.codec,
        encoding=EncodingRecord(encoding.name, encoding.params()),
        values=encoding.values,
        temperature=encoding.stored_temperature,
        augment=AugmentRecord(specs.get("augment"), repr(images.transform), inputs.fingerprint, inputs.structure),
        teacher=TeacherRecord(specs.get("teacher"), type(module).__name__, teacher_sha256(module)),
        dataset=dataclasses.replace(inputs.dataset, spec=specs.get("dataset")),
        versions=versions(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        inner_chunk_rows=job.inner_chunk_rows,
        mix=images.mix,
        precision=job.compute.precision,
    )


@dataclass
class _Build:
    """One build's resolved inputs, which its steps share: the teacher and where it runs, the images it labels, the
    store's layout and encoding, and the settings of the pass."""

    out: str
    teacher: nn.Module
    compute: Compute
    images: "ReplayedViews"
    layout: store.Layout
    encoding: Encoding
    labels: np.ndarray
    codec: str
    batch_size: int
    workers: int
    progress: bool
    inner_chunk_rows: int | None
    table_probe: int
    specs: dict[str, str | None]


def build(cfg: BuildConfig) -> store.Cache:
    """The build ``cfg`` names (what ``logitcache build`` runs): its teacher, dataset and augmentation resolved from
    their specs, then ``build_cache``."""
    check_encoding_options(cfg.encoding, cfg.options)
    dataset = resolve_dataset(cfg.dataset, train=True, limit=cfg.limit)
    augment, _ = resolve_augment(cfg.augment, dataset)
    teacher = resolve_teacher(cfg.teacher, cfg.teacher_weights, key=cfg.teacher_key, num_classes=cfg.num_classes)
    return build_cache(teacher, dataset, cfg.out, augment=augment, **build_arguments(cfg))


def build_arguments(cfg: BuildConfig) -> dict[str, Any]:
    """``build_cache``'s keyword arguments for ``cfg`` (the specs recorded, the mixing as a ``Mix``)."""
    return dict(
        views=cfg.views, seed=cfg.seed, encoding=cfg.encoding, codec=cfg.codec, batch_size=cfg.batch_size,
        chunk_rows=cfg.chunk_rows, inner_chunk_rows=cfg.inner_chunk_rows, workers=cfg.workers, device=cfg.device,
        resume=cfg.resume, overwrite=cfg.overwrite, repair=cfg.repair, progress=cfg.progress,
        precision=cfg.precision, channels_last=cfg.channels_last, compile=cfg.compile, encode_on=cfg.encode_on,
        table_probe=cfg.table_probe, mix=Mix(cfg.mix, cfg.mix_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.switch_prob),
        specs={"teacher": cfg.teacher, "dataset": cfg.dataset, "augment": cfg.augment}, **cfg.options,
    )  # fmt: skip


def check_encoding_options(encoding: str, options: dict[str, Any]) -> None:
    """Options belong to the named encoding: with ``auto`` none may be given, and another encoding's are refused."""
    if encoding == AUTO and options:
        raise LogitcacheError(
            f"{', '.join(flag_of(k) for k in options)}: name the encoding these options belong to (--encoding ...); "
            "auto chooses the encoding from the number of classes"
        )
    own = ENCODINGS[encoding].options if encoding in ENCODINGS else {}
    foreign = [key for key in options if key not in own]
    if foreign and encoding in ENCODINGS:
        owners = {key: [n for n, c in ENCODINGS.items() if key in c.options] for key in foreign}
        raise LogitcacheError(
            "; ".join(
                f"{flag_of(k)} is an option of --encoding {' / '.join(owners[k]) or 'no encoding'}" for k in foreign
            )
            + f", not of {encoding}"
        )


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_cache(
    teacher: nn.Module,
    dataset: Dataset,
    out: str | os.PathLike,
    *,
    augment: Callable[[Any], torch.Tensor] | None = None,
    views: int = BuildConfig.views,
    seed: int = BuildConfig.seed,
    encoding: str = BuildConfig.encoding,
    codec: str = BuildConfig.codec,
    batch_size: int = BuildConfig.batch_size,
    chunk_rows: int = BuildConfig.chunk_rows,
    inner_chunk_rows: int | None = BuildConfig.inner_chunk_rows,
    workers: int | str = BuildConfig.workers,
    device: str = BuildConfig.device,
    resume: bool = BuildConfig.resume,
    overwrite: bool = BuildConfig.overwrite,
    repair: bool = BuildConfig.repair,
    progress: bool = BuildConfig.progress,
    specs: dict[str, str | None] | None = None,
    mix: Mix | None = None,
    table_probe: int | None = BuildConfig.table_probe,
    precision: str = BuildConfig.precision,
    channels_last: bool = BuildConfig.channels_last,
    compile: bool = BuildConfig.compile,
    encode_on: str = BuildConfig.encode_on,
    **options: Any,
) -> store.Cache:
    """Run ``teacher`` over ``views`` replayed augmentations of every sample of ``dataset`` and store soft targets.
    The defaults are ``BuildConfig``'s (``logitcache build``'s); ``build(cfg)`` runs a build from specs.

    ``augment`` defaults to the dataset's own ``transform``, which the build then takes over: it replays it on the
    dataset's images with that transform set aside (on a shallow copy; ``dataset`` itself is left as it is), so no
    image is transformed twice. Passing ``augment=dataset.transform`` does the same.

    ``encoding`` names a registered encoding (``logitcache.encoding.ENCODINGS``), or ``auto`` (``full`` up to 32
    classes, ``topk8`` with its tail table above: ``logitcache.encoding.auto_encoding``); ``options`` are its options
    (e.g. ``k=10, soft_tail=True`` for ``topk``; ``samples``, ``tau`` for ``sampled``; ``floor`` for ``quantized``), the
    rest taking their defaults. ``mix`` (``logitcache.augment.mix.Mix``): the teacher labels Mixup/CutMix images,
    mixed per sample as ``logitcache.augment.mix`` replays them. ``specs`` records how the teacher/dataset/augmentation
    were named (CLI specs), so that tools can re-create them. Returns the opened cache. Interrupting it (Ctrl-C, kill)
    loses at most the units in flight: ``resume=True`` finishes the job and the result is bitwise identical to an
    uninterrupted build on the same machine. ``repair=True`` (with ``resume``) first checks every stored chunk and
    recomputes the damaged ones. ``inner_chunk_rows``: store each unit (``chunk_rows`` rows of one view) as one Zarr v3
    shard of inner chunks of that many rows, so that a reader can fetch a few rows without the whole unit; logitcache
    itself reads whole units either way (one object per unit and field).

    Under ``torchrun`` (an initialised process group) every rank calls this with the same arguments: rank 0 alone
    creates or validates the store and its metadata; ranks then claim units one at a time from a shared counter and
    write only the units they claimed. The result is the same store, byte for byte, whatever the number of ranks.

    An encoding that keeps a per-cache table (``topk8`` with ``tail_shape="table"``) has it fitted first, on the
    teacher's outputs for the first ``table_probe`` samples of view 0 (default: the encoding's choice, 64 per class),
    by the process that creates the store; a resume keeps the stored table.

    ``precision`` (``auto``: bf16 autocast on a CUDA device that supports it, else fp32), ``channels_last`` and
    ``compile`` say how the teacher runs (``logitcache.compute``); the store records the precision, and a resume
    needs the same. ``encode_on`` says where the teacher's outputs are encoded (``logitcache.teacher.writer``):
    ``auto``, on an accelerator its device, on a CPU a thread beside the teacher.
    """
    out, specs, workers = str(out), specs or {}, resolve_workers(workers)
    dataset, augment = dataset_and_augment(dataset, augment, "build_cache")
    _check_arguments(views=views, batch_size=batch_size, chunk_rows=chunk_rows)
    _check_layout(codec, chunk_rows, inner_chunk_rows)
    compute = Compute.of(resolve_device(device), precision, channels_last)
    teacher = compute.model(teacher.eval())
    images = ReplayedViews(dataset, augment, seed, mix)
    labels, num_classes = _probe(teacher, images, compute)
    if compile:  # judged on a full batch: the shape the build runs
        first = torch.stack([images[i] for i in range(min(batch_size, images.n))])
        teacher = compiled(teacher, lambda module: _eval(module, first, compute))
    enc = make_encoding(encoding, num_classes, options)
    num_samples = dataset_len(dataset)
    job = _Build(
        out, teacher, compute, images, store.Layout(views, num_samples, chunk_rows), enc, labels, codec, batch_size,
        workers, progress, inner_chunk_rows or None,
        min(num_samples, table_probe) if table_probe else enc.probe_size(num_samples), specs,
    )  # fmt: skip
    group = _open_on_rank0(job, _metadata(job), resume=resume, overwrite=overwrite, repair=repair)
    layout = job.layout
    opened = store.Cache(out, group)
    done = opened.completion()
    units = [(v, c) for v in range(views) for c in range(layout.num_chunks) if not done[v, c]]
    if not done.any():
        _warn_if_disk_too_small(out, enc, views, num_samples)
    on_device = encodes_on_device(encode_on, compute.device, enc)
    writer = UnitWriter(
        group, enc, layout, seed, opened.has_digests, opened.table(), device=compute.device, on_device=on_device
    )
    try:
        _run_teacher(job, units, writer)
        writer.flush()
    except OSError as e:
        if e.errno not in store.OUT_OF_SPACE:
            raise
        raise _out_of_space(out, e, group, enc.fields(), layout) from None
    finally:
        writer.close()  # units already handed over are complete: an interrupt loses only the current one
    distributed.barrier()
    return store.open_cache(out)


def _check_layout(codec: str, chunk_rows: int, inner_chunk_rows: int | None) -> None:
    store.check_codec(codec)
    if inner_chunk_rows is not None and (inner_chunk_rows < 1 or chunk_rows % inner_chunk_rows):
        raise LogitcacheError(
            f"inner_chunk_rows ({inner_chunk_rows}) must divide chunk_rows ({chunk_rows}): a unit is a whole number "
            "of inner chunks"
        )


def _check_arguments(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise LogitcacheError(f"{name} must be >= 1, got {value}")


def _eval(teacher: nn.Module, x: torch.Tensor, compute: Compute) -> None:
    with torch.inference_mode(), compute.autocast():
        teacher(compute.inputs(x))


def _probe(teacher: nn.Module, images: "ReplayedViews", compute: Compute) -> tuple[np.ndarray, int]:
    """The labels and the teacher's number of classes, from one replayed image; user mistakes caught here."""
    if images.n == 0:
        raise LogitcacheError("the dataset is empty")
    labels = labels_of(images.dataset)
    probe = replay_view(images.transform, images.dataset[0][0], images.seed, 0, 0)
    if not isinstance(probe, torch.Tensor):
        raise LogitcacheError(f"the augmentation must return a tensor; it returned {type(probe).__name__}")
    try:
        num_classes = next(teacher_pass(teacher, [probe], compute)).shape[1]
    except LogitcacheError:
        raise
    except Exception as e:
        raise LogitcacheError(
            f"the teacher failed on the first image (shape {tuple(probe.shape)}): "
            f"{type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = int(np.argmax((labels < 0) | (labels >= num_classes)))
        raise LogitcacheError(f"label {labels[bad]} of sample {bad} is outside the teacher's {num_classes} classes")
    return labels, num_classes


def _fit_table(job: _Build) -> tuple[np.ndarray, int] | None:
    """The encoding's per-cache table and its probe size, fitted on the teacher's outputs for the first samples of
    view 0 (None when it keeps none). Run once, by the process that creates the store: a resume keeps the stored one."""
    if job.encoding.table_shape() is None:
        return None
    probe = Subset(job.images, range(max(1, job.table_probe)))
    out = []
    with progress_bar("tail table probe", len(probe), job.progress) as advance:
        for logits in teacher_pass(job.teacher, probe, job.compute, batch_size=job.batch_size, workers=job.workers):
            out.append(torch.log_softmax(logits, dim=-1))
            advance(len(logits))
    return job.encoding.fit_table(torch.cat(out)).numpy(), len(probe)


def _open_on_rank0(job: _Build, meta: CacheMeta, *, resume: bool, overwrite: bool, repair: bool) -> zarr.Group:
    """Rank 0 alone creates or validates the store; the other ranks open it once it agrees."""
    group = None
    if distributed.rank() == 0:
        try:
            group = _open_output(job, meta, resume=resume, overwrite=overwrite, repair=repair)
        except BaseException:
            distributed.agree(False)
            raise
    if not distributed.agree(True):
        raise LogitcacheError("rank 0 could not open the output store (see its error)")
    return group if group is not None else store.open_group(job.out, mode="r+")


def _warn_if_disk_too_small(out: str, enc: Encoding, views: int, samples: int) -> None:
    if store.is_url(out) or distributed.rank() != 0:
        return
    need, free = raw_bytes(enc.fields(), views, samples), shutil.disk_usage(out).free
    if need > free:
        warnings.warn(
            f"the cache may need up to {size_text(need)} before compression and {out} has {size_text(free)} "
            "free; if the disk fills, free space and rerun with --resume",
            stacklevel=3,
        )


def _run_teacher(job: _Build, units: list[tuple[int, int]], writer: UnitWriter) -> None:
    """The teacher over the units' batches; a unit's logits go to the writer when its last batch is done."""
    layout = job.layout
    planned: deque[PlannedBatch] = deque()

    def batches() -> Iterator[list[int]]:
        # Units are claimed lazily, so under torchrun a rank takes the next unit only when it needs work.
        for unit in distributed.claim(units, "build-units"):
            for batch in plan_batches(layout, [unit], job.batch_size):
                planned.append(batch)
                yield batch.indices

    total_rows = sum(layout.rows(c)[1] - layout.rows(c)[0] for _, c in units) // distributed.world_size()
    pieces: list[torch.Tensor] = []
    logits_of = teacher_pass(job.teacher, job.images, job.compute, batches=batches(), workers=job.workers, host=False)
    with progress_bar("build", total_rows, enabled=job.progress and distributed.rank() == 0) as advance:
        for logits in logits_of:
            batch = planned.popleft()  # the loader keeps the sampler's order
            pieces.append(logits)  # on the teacher's device; the writer checks that they are finite
            if batch.last:
                writer.submit(batch.unit, torch.cat(pieces))
                pieces.clear()
            advance(len(batch.indices))
