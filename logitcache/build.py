"""The precompute stage: teacher over dataset x views -> a cache.

Read top to bottom: ``build_cache`` checks its arguments, probes the teacher on one image, opens (or validates) the
store, plans the units still to do and runs the teacher over them. DataLoader workers decode and augment (replayed
from seeds); the main process runs the teacher; a ``UnitWriter`` thread compresses and writes each finished unit (one
chunk of one view) while the next batches are computed. Batches never straddle a unit, so a unit's bytes do not
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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
import zarr
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed, store
from .compat import differences, inputs_of
from .datasets import labels_of
from .encoding import Encoding, make_encoding
from .errors import LogitcacheError
from .meta import AugmentRecord, CacheMeta, EncodingRecord, TeacherRecord
from .fingerprint import teacher_sha256, versions
from .mix import Mix, mixed_view
from .progress import progress_bar
from .replay import replay_view, sample_seed
from .specs import resolve_device

_ENCODE_SALT = 0x5EED_E4C0


class ReplayedViews(Dataset):
    """Flat index ``view * N + i`` -> the replayed augmented view of sample ``i`` (mixed with its partner's when
    ``mix`` is active): the image the teacher labels."""

    def __init__(self, dataset: Dataset, transform: Callable[[Any], torch.Tensor], seed: int, mix: Mix | None = None):
        self.dataset, self.transform, self.seed, self.n = dataset, transform, seed, len(dataset)
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


def _teacher_logits(teacher: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = teacher(x.to(device, non_blocking=True))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise LogitcacheError(
            f"the teacher must return logits of shape [batch, classes]; it returned "
            f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}"
        )
    return out.float().cpu()


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


def _open_output(
    out: str,
    meta: CacheMeta,
    fields: dict,
    codec: str,
    labels: np.ndarray,
    fit_table: Callable[[], tuple[np.ndarray, int] | None],
    resume: bool,
    overwrite: bool,
    repair: bool,
) -> zarr.Group:
    if repair and not resume:
        raise LogitcacheError("--repair works on an existing cache: pass it together with --resume")
    if store.is_store(out):
        if overwrite:
            store.remove_store(out)
        elif resume:
            recorded = CacheMeta.from_json(dict(store.open_group(out, mode="r").attrs[store.ATTR_KEY]), out)
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
    fitted = fit_table()  # before the store is created: an interrupt here leaves no store behind
    if fitted is None:
        return store.create_store(out, meta, fields, codec, labels)
    table, probe = fitted
    return store.create_store(out, meta.with_table(store.table_meta(table, probe)), fields, codec, labels, table)


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
        group[store.COMPLETE][v, c] = 0
    try:
        labels_ok = np.array_equal(cache.labels().numpy(), labels)
    except LogitcacheError:
        labels_ok = False
    if not labels_ok:
        group[store.LABELS][...] = labels.astype(group[store.LABELS].dtype)
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
        stored = sum(group[name].nbytes_stored() for name in fields)
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


def _metadata(
    encoding: Encoding,
    dataset: Dataset,
    labels: np.ndarray,
    augment,
    teacher: nn.Module,
    specs: dict,
    *,
    views: int,
    seed: int,
    codec: str,
    batch_size: int,
    chunk_rows: int,
    inner_chunk_rows: int | None,
    mix: Mix,
) -> CacheMeta:
    """The group attributes (docs/format.md): identity, fingerprints and versions."""
    inputs = inputs_of(dataset, augment, seed, views, labels, mix=mix)
    return CacheMeta(
        format_version=store.FORMAT_VERSION,
        num_samples=len(dataset),
        num_views=views,
        num_classes=encoding.num_classes,
        chunk_rows=chunk_rows,
        batch_size=batch_size,
        seed=seed,
        codec=codec,
        encoding=EncodingRecord(encoding.name, encoding.params()),
        values=encoding.values,
        temperature=encoding.stored_temperature,
        augment=AugmentRecord(specs.get("augment"), repr(augment), inputs.fingerprint),
        teacher=TeacherRecord(specs.get("teacher"), type(teacher).__name__, teacher_sha256(teacher)),
        dataset=dataclasses.replace(inputs.dataset, spec=specs.get("dataset")),
        versions=versions(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        inner_chunk_rows=inner_chunk_rows or None,
        mix=mix,
    )


def build_cache(
    teacher: nn.Module,
    dataset: Dataset,
    out: str | os.PathLike,
    *,
    augment: Callable[[Any], torch.Tensor],
    views: int = 1,
    seed: int = 0,
    encoding: str = "auto",
    codec: str = "blosc-lz4",
    batch_size: int = 256,
    chunk_rows: int = 1024,
    inner_chunk_rows: int | None = None,
    workers: int = 2,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    repair: bool = False,
    progress: bool = True,
    specs: dict[str, str | None] | None = None,
    mix: Mix | None = None,
    table_probe: int | None = None,
    **options: Any,
) -> store.Cache:
    """Run ``teacher`` over ``views`` replayed augmentations of every sample of ``dataset`` and store soft targets.

    ``encoding`` names a registered encoding (``logitcache.encoding.ENCODINGS``), or ``auto`` (``full`` up to 32
    classes, ``topk8`` with its tail table above: ``logitcache.encoding.auto_encoding``); ``options`` are its options
    (e.g. ``k=10, soft_tail=True`` for ``topk``; ``samples``, ``tau`` for ``sampled``; ``floor`` for ``quantized``), the
    rest taking their defaults. ``mix`` (``logitcache.mix.Mix``): the teacher labels Mixup/CutMix images, mixed per
    sample as ``logitcache.mix`` replays them. ``specs`` records how the teacher/dataset/augmentation were named
    (CLI specs), so that tools can re-create them. Returns the opened cache. Interrupting it (Ctrl-C, kill) loses at
    most the units in flight: ``resume=True`` finishes the job and the result is bitwise identical to an
    uninterrupted build on the same machine. ``repair=True`` (with ``resume``) first checks every stored chunk and
    recomputes the damaged ones. ``inner_chunk_rows``: store each unit (``chunk_rows`` rows of one view) as one
    Zarr v3 shard of inner chunks of that many rows, so that a reader can fetch a few rows without the whole unit;
    logitcache itself reads whole units either way (one object per unit and field).

    Under ``torchrun`` (an initialised process group) every rank calls this with the same arguments: rank 0 alone
    creates or validates the store and its metadata; ranks then claim units one at a time from a shared counter and
    write only the units they claimed. The result is the same store, byte for byte, whatever the number of ranks.

    An encoding that keeps a per-cache table (``topk8`` with ``tail_shape="table"``) has it fitted first, on the
    teacher's outputs for the first ``table_probe`` samples of view 0 (default: the encoding's choice, 64 per class),
    by the process that creates the store; a resume keeps the stored table.
    """
    out, specs = str(out), specs or {}
    _check_arguments(views=views, batch_size=batch_size, chunk_rows=chunk_rows, workers=workers)
    store.check_codec(codec)
    if inner_chunk_rows is not None and (inner_chunk_rows < 1 or chunk_rows % inner_chunk_rows):
        raise LogitcacheError(
            f"inner_chunk_rows ({inner_chunk_rows}) must divide chunk_rows ({chunk_rows}): a unit is a whole number "
            "of inner chunks"
        )
    dev = resolve_device(device)
    teacher = teacher.eval().to(dev)
    labels, num_classes = _probe(teacher, dataset, augment, seed, dev)
    enc = make_encoding(encoding, num_classes, options)
    meta = _metadata(
        enc, dataset, labels, augment, teacher, specs, views=views, seed=seed, codec=codec, batch_size=batch_size,
        chunk_rows=chunk_rows, inner_chunk_rows=inner_chunk_rows, mix=mix or Mix(),
    )  # fmt: skip
    views_of = ReplayedViews(dataset, augment, seed, mix)
    probe = min(len(dataset), table_probe) if table_probe else enc.probe_size(len(dataset))
    fit = lambda: _fit_table(teacher, views_of, enc, probe, dev, batch_size, workers, progress)  # noqa: E731
    group = _open_on_rank0(out, meta, enc, codec, labels, fit, resume=resume, overwrite=overwrite, repair=repair)
    layout = store.Layout(views, len(dataset), chunk_rows)
    opened = store.Cache(out, group)
    done = opened.completion()
    units = [(v, c) for v in range(views) for c in range(layout.num_chunks) if not done[v, c]]
    if not done.any():
        _warn_if_disk_too_small(out, enc, views, len(dataset))
    writer = UnitWriter(group, enc, layout, seed, opened.has_digests, opened.table())
    try:
        _run_teacher(teacher, views_of, dev, units, layout, batch_size, workers, writer, progress)
        writer.flush()
    except OSError as e:
        if e.errno not in store.OUT_OF_SPACE:
            raise
        raise _out_of_space(out, e, group, enc.fields(), layout) from None
    finally:
        writer.close()  # units already handed over are complete: an interrupt loses only the current one
    distributed.barrier()
    return store.open_cache(out)


def _check_arguments(**values: int) -> None:
    for name, value in values.items():
        low = 0 if name == "workers" else 1
        if value < low:
            raise LogitcacheError(f"{name} must be >= {low}, got {value}")


def _probe(teacher: nn.Module, dataset: Dataset, augment, seed: int, dev: torch.device) -> tuple[np.ndarray, int]:
    """The labels and the teacher's number of classes, from one replayed image; user mistakes caught here."""
    if len(dataset) == 0:
        raise LogitcacheError("the dataset is empty")
    labels = labels_of(dataset)
    probe = replay_view(augment, dataset[0][0], seed, 0, 0)
    if not isinstance(probe, torch.Tensor):
        raise LogitcacheError(f"the augmentation must return a tensor; it returned {type(probe).__name__}")
    with torch.inference_mode():
        try:
            num_classes = _teacher_logits(teacher, probe[None], dev).shape[1]
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


def _fit_table(
    teacher: nn.Module,
    views: ReplayedViews,
    enc: Encoding,
    probe_samples: int,
    dev: torch.device,
    batch_size: int,
    workers: int,
    progress: bool,
) -> tuple[np.ndarray, int] | None:
    """The encoding's per-cache table and its probe size, fitted on the teacher's outputs for the first samples of
    view 0 (None when it keeps none). Run once, by the process that creates the store: a resume keeps the stored one."""
    if enc.table_shape() is None:
        return None
    probe = Subset(views, range(max(1, probe_samples)))
    out = []
    with progress_bar("tail table probe", len(probe), progress) as advance, torch.inference_mode():
        for images in DataLoader(probe, batch_size=batch_size, num_workers=workers):
            out.append(torch.log_softmax(_teacher_logits(teacher, images, dev), dim=-1))
            advance(len(images))
    return enc.fit_table(torch.cat(out)).numpy(), len(probe)


def _open_on_rank0(
    out: str,
    meta: CacheMeta,
    enc: Encoding,
    codec: str,
    labels: np.ndarray,
    fit_table: Callable[[], tuple[np.ndarray, int] | None],
    *,
    resume: bool,
    overwrite: bool,
    repair: bool,
) -> zarr.Group:
    """Rank 0 alone creates or validates the store; the other ranks open it once it agrees."""
    group = None
    if distributed.rank() == 0:
        try:
            group = _open_output(out, meta, enc.fields(), codec, labels, fit_table, resume, overwrite, repair)
        except BaseException:
            distributed.agree(False)
            raise
    if not distributed.agree(True):
        raise LogitcacheError("rank 0 could not open the output store (see its error)")
    return group if group is not None else store.open_group(out, mode="r+")


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


class UnitWriter:
    """Encodes and writes finished units on one background thread, overlapping the teacher.

    At most a few units wait (back-pressure on slow disks). Sampling encodings draw from a generator seeded per unit,
    so a unit's bytes stay a function of its inputs.
    """

    MAX_IN_FLIGHT = 4

    def __init__(
        self,
        group: zarr.Group,
        enc: Encoding,
        layout: store.Layout,
        seed: int,
        has_digests: bool,
        table: torch.Tensor | None = None,
    ):
        self.group, self.enc, self.layout, self.seed, self.has_digests = group, enc, layout, seed, has_digests
        self.table = {"table": table} if table is not None else {}  # an encoding with a table encodes against it
        self.field_names = sorted(enc.fields())
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logitcache-writer")
        self.in_flight: list[Future] = []

    def submit(self, unit: tuple[int, int], logits: torch.Tensor) -> None:
        self.in_flight.append(self.pool.submit(self._write, unit, logits))
        while len(self.in_flight) > self.MAX_IN_FLIGHT or (self.in_flight and self.in_flight[0].done()):
            self.in_flight.pop(0).result()  # a write's error surfaces here

    def _write(self, unit: tuple[int, int], logits: torch.Tensor) -> None:
        view, chunk = unit
        rng = torch.Generator().manual_seed(sample_seed(self.seed ^ _ENCODE_SALT, view, chunk))
        encoded = {name: t.numpy() for name, t in self.enc.encode(logits, rng, **self.table).items()}
        store.write_unit(self.group, self.field_names, view, chunk, self.layout.rows(chunk), encoded, self.has_digests)

    def flush(self) -> None:
        while self.in_flight:
            self.in_flight.pop(0).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _run_teacher(
    teacher: nn.Module,
    views: ReplayedViews,
    dev: torch.device,
    units: list[tuple[int, int]],
    layout: store.Layout,
    batch_size: int,
    workers: int,
    writer: UnitWriter,
    progress: bool,
) -> None:
    """The teacher over the units' batches; a unit's logits go to the writer when its last batch is done."""
    n = layout.num_samples
    planned: deque[PlannedBatch] = deque()

    def batches() -> Iterator[list[int]]:
        # Units are claimed lazily, so under torchrun a rank takes the next unit only when it needs work.
        for unit in distributed.claim(units, "build-units"):
            for batch in plan_batches(layout, [unit], batch_size):
                planned.append(batch)
                yield batch.indices

    loader = DataLoader(
        views, batch_sampler=batches(), num_workers=workers,
        pin_memory=dev.type == "cuda",
    )  # fmt: skip
    total_rows = sum(layout.rows(c)[1] - layout.rows(c)[0] for _, c in units) // distributed.world_size()
    pieces: list[torch.Tensor] = []
    with (
        progress_bar("build", total_rows, enabled=progress and distributed.rank() == 0) as advance,
        torch.inference_mode(),
    ):
        for x in loader:
            batch = planned.popleft()  # the loader keeps the sampler's order
            logits = _teacher_logits(teacher, x, dev)
            finite = torch.isfinite(logits).all(dim=1)
            if not finite.all():
                bad = batch.indices[int((~finite).nonzero()[0])]
                raise LogitcacheError(
                    f"the teacher produced NaN/inf for view {bad // n}, sample {bad % n}; "
                    "nothing was written for its chunk"
                )
            pieces.append(logits)
            if batch.last:
                writer.submit(batch.unit, torch.cat(pieces))
                pieces.clear()
            advance(len(batch.indices))
