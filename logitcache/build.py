"""The precompute stage: teacher over dataset x views -> a cache.

DataLoader workers decode and augment (replayed from seeds); the main process runs the teacher; a writer thread
compresses and writes each finished unit (one chunk of one view) while the next batches are computed. Batches never
straddle a unit, so a unit's bytes do not depend on which run, resume or rank computed it.
"""

from __future__ import annotations

import datetime
import math
import os
import shutil
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import zarr
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import distributed, store
from .specs import resolve_device
from .datasets import labels_of
from .encoding import make_encoding
from .errors import LogitcacheError
from .fingerprint import dataset_fingerprint, teacher_sha256, versions
from .progress import progress_bar
from .replay import fingerprint_mismatch, replay_fingerprint, replay_view, sample_seed

_ENCODE_SALT = 0x5EED_E4C0

VALUES = {"full": "logits", "topk": "log-probs", "sampled": "sample counts", "quantized": "log-probs"}

# Settings whose change makes an existing cache a different cache (resume is refused, --overwrite needed).
_IDENTITY = ("num_samples", "num_views", "num_classes", "chunk_rows", "batch_size", "seed", "encoding", "codec")


class ReplayedViews(Dataset):
    """Flat index ``view * N + i`` -> the replayed augmented view of sample ``i``."""

    def __init__(self, dataset: Dataset, transform: Callable[[Any], torch.Tensor], seed: int):
        self.dataset, self.transform, self.seed, self.n = dataset, transform, seed, len(dataset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, flat: int) -> torch.Tensor:
        view, index = divmod(flat, self.n)
        return replay_view(self.transform, self.dataset[index][0], self.seed, view, index)


def plan_batches(
    layout: store.Layout, units: list[tuple[int, int]], batch_size: int
) -> list[tuple[tuple[int, int], list[int]]]:
    """``(unit, flat indices)`` per batch; batch boundaries restart at every unit so results are unit-local."""
    plan = []
    for view, chunk in units:
        start, stop = layout.rows(chunk)
        for b in range(start, stop, batch_size):
            plan.append(((view, chunk), [view * layout.num_samples + i for i in range(b, min(b + batch_size, stop))]))
    return plan


def _teacher_logits(teacher: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = teacher(x.to(device, non_blocking=True))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise LogitcacheError(
            f"the teacher must return logits of shape [batch, classes]; it returned "
            f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}"
        )
    return out.float().cpu()


def _check_compatible(path: str, existing: dict, meta: dict) -> None:
    for key in _IDENTITY:
        if existing.get(key) != meta.get(key):
            raise LogitcacheError(
                f"{path} was built with {key}={existing.get(key)!r}, this build has "
                f"{meta.get(key)!r}; pass --overwrite to replace it"
            )
    checks = [
        ("teacher", "sha256", "a different teacher"),
        ("dataset", "labels_sha256", "a different dataset"),
        ("dataset", "samples_sha256", "a different dataset"),
    ]
    for section, key, what in checks:
        if existing[section].get(key) != meta[section].get(key):
            raise LogitcacheError(f"{path} was built with {what}; pass --overwrite to replace it")
    bad = fingerprint_mismatch(existing["augment"]["fingerprint"], meta["augment"]["fingerprint"])
    if bad:
        # The replayed pixels decide, not repr(): a user transform's repr may hold a memory address.
        raise LogitcacheError(f"{path} was built with a different augmentation ({bad}); pass --overwrite to rebuild")


def _open_output(
    out: str, meta: dict, fields: dict, codec: str, labels: np.ndarray, resume: bool, overwrite: bool, repair: bool
) -> zarr.Group:
    if repair and not resume:
        raise LogitcacheError("--repair works on an existing cache: pass it together with --resume")
    if store.is_store(out):
        if overwrite:
            store.remove_store(out)
        elif resume:
            _check_compatible(out, dict(store.open_group(out, mode="r").attrs[store.ATTR_KEY]), meta)
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
    return store.create_store(out, meta, fields, codec, labels)


def _mark_damaged_units(out: str, labels: np.ndarray) -> None:
    """``--repair``: every complete unit whose chunks fail their checks is marked unfinished, so that the resume that
    follows recomputes exactly those (to the same bytes); damaged labels are rewritten from the dataset."""
    cache = store.open_cache(out)
    if cache.meta["format_version"] < 3:
        raise LogitcacheError(
            f"{out} has format version {cache.meta['format_version']}, which records no digests, so damage cannot be "
            "told from data; rebuild it with --overwrite"
        )
    damaged = [(v, c, why) for v, c, why in cache.scan() if not why.startswith("incomplete")]
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


def _size_text(n: float) -> str:
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
    need = f"up to {_size_text(raw)} (before compression)"
    try:
        stored = sum(group[name].nbytes_stored() for name in fields)
        if done:
            estimate = _size_text(stored / done * total)
            need = f"about {estimate} (from the {done} chunks written), at most {_size_text(raw)}"
    except Exception:
        pass
    free = ""
    if not store.is_url(out):
        free = f"; {_size_text(shutil.disk_usage(out).free)} free there now"
    return LogitcacheError(
        f"writing the cache to {out} failed: {error.strerror or error}. {done}/{total} chunks are complete and kept. "
        f"The whole cache needs {need}{free}. Free space (or choose another --out), then rerun the same command "
        "with --resume"
    )


def _metadata(
    encoder,
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
) -> dict:
    """The group attributes (FORMAT.md): identity, fingerprints and versions, all plain JSON."""
    return {
        "format_version": store.FORMAT_VERSION,
        "num_samples": len(dataset),
        "num_views": views,
        "num_classes": encoder.num_classes,
        "chunk_rows": chunk_rows,
        "batch_size": batch_size,
        "seed": seed,
        "codec": codec,
        "encoding": {"name": encoder.name, "params": encoder.params()},
        "values": VALUES[encoder.name],
        "temperature": encoder.params().get("tau", 1.0),
        "view_rule": "epoch e uses view e % num_views",
        "augment": {
            "spec": specs.get("augment"),
            "repr": repr(augment),
            "fingerprint": replay_fingerprint(augment, dataset, seed, views),
        },
        "teacher": {"spec": specs.get("teacher"), "class": type(teacher).__name__, "sha256": teacher_sha256(teacher)},
        "dataset": {"spec": specs.get("dataset"), **dataset_fingerprint(dataset, labels)},
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def build_cache(
    teacher: nn.Module,
    dataset: Dataset,
    out: str | os.PathLike,
    *,
    augment: Callable[[Any], torch.Tensor],
    views: int = 1,
    seed: int = 0,
    encoding: str = "topk",
    k: int = 10,
    soft_tail: bool = True,
    samples: int = 50,
    tau: float = 1.0,
    floor: float = 20.0,
    codec: str = "blosc-lz4",
    batch_size: int = 256,
    chunk_rows: int = 1024,
    workers: int = 2,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    repair: bool = False,
    progress: bool = True,
    specs: dict[str, str | None] | None = None,
) -> store.Cache:
    """Run ``teacher`` over ``views`` replayed augmentations of every sample of ``dataset`` and store soft targets.

    ``soft_tail=False`` (top-k) omits the tail's softened masses (format version 1's flat tail; for comparisons).
    ``specs`` records how the teacher/dataset/augmentation were named (CLI specs), so that tools can re-create them.
    Returns the opened cache. Interrupting it (Ctrl-C, kill) loses at most the units in flight: ``resume=True``
    finishes the job and the result is bitwise identical to an uninterrupted build on the same machine.
    ``repair=True`` (with ``resume``) first checks every stored chunk and recomputes the damaged ones as well.

    Under ``torchrun`` (an initialised process group) every rank calls this with the same arguments: rank 0 alone
    creates or validates the store and its metadata; ranks then claim units one at a time from a shared counter and
    write only the units they claimed. The result is the same store, byte for byte, whatever the number of ranks.
    """
    out = str(out)
    specs = specs or {}
    for name, value, low in (
        ("views", views, 1),
        ("batch_size", batch_size, 1),
        ("chunk_rows", chunk_rows, 1),
        ("workers", workers, 0),
    ):
        if value < low:
            raise LogitcacheError(f"{name} must be >= {low}, got {value}")
    if codec not in store.CODECS:
        raise LogitcacheError(f"unknown codec {codec!r}; choose one of: {', '.join(store.CODECS)}")
    dev = resolve_device(device)
    teacher = teacher.eval().to(dev)
    n = len(dataset)
    if n == 0:
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
    params = {
        "topk": {"k": k, "soft_tail": soft_tail},
        "sampled": {"samples": samples, "tau": tau},
        "quantized": {"floor": floor},
    }
    encoder = make_encoding(encoding, num_classes, params.get(encoding, {}))

    meta = _metadata(
        encoder,
        dataset,
        labels,
        augment,
        teacher,
        specs,
        views=views,
        seed=seed,
        codec=codec,
        batch_size=batch_size,
        chunk_rows=chunk_rows,
    )
    fields = encoder.fields()
    group = None
    if distributed.rank() == 0:
        try:
            group = _open_output(out, meta, fields, codec, labels, resume, overwrite, repair)
        except BaseException:
            distributed.agree(False)
            raise
    if not distributed.agree(True):
        raise LogitcacheError("rank 0 could not open the output store (see its error)")
    if group is None:
        group = store.open_group(out, mode="r+")
    layout = store.Layout(views, n, chunk_rows)
    opened = store.Cache(out, group)
    done, has_digests = opened.completion(), opened.has_digests
    units = [(v, c) for v in range(views) for c in range(layout.num_chunks) if not done[v, c]]
    total_rows = sum(layout.rows(c)[1] - layout.rows(c)[0] for _, c in units) // distributed.world_size()
    planned: deque[tuple[tuple[int, int], list[int]]] = deque()

    def batches() -> Iterator[list[int]]:
        # Units are claimed lazily, so under torchrun a rank takes the next unit only when it needs work.
        for unit in distributed.claim(units, "build-units"):
            for step in plan_batches(layout, [unit], batch_size):
                planned.append(step)
                yield step[1]

    loader = DataLoader(
        ReplayedViews(dataset, augment, seed),
        batch_sampler=batches(),
        num_workers=workers,
        pin_memory=dev.type == "cuda",
    )
    field_names = sorted(fields)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logitcache-writer")
    in_flight: list[Future] = []
    buffer: list[torch.Tensor] = []

    def encode_and_write(logits: torch.Tensor, unit: tuple[int, int]) -> None:
        # Runs on the writer thread, overlapping the teacher. Sampling encodings draw from a generator seeded per
        # unit, so a unit's bytes stay a function of its inputs.
        rng = torch.Generator().manual_seed(sample_seed(seed ^ _ENCODE_SALT, unit[0], unit[1]))
        encoded = {name: t.numpy() for name, t in encoder.encode(logits, rng).items()}
        store.write_unit(group, field_names, unit[0], unit[1], layout.rows(unit[1]), encoded, has_digests)

    def submit(unit: tuple[int, int]) -> None:
        logits = torch.cat(buffer)
        buffer.clear()
        in_flight.append(writer.submit(encode_and_write, logits, unit))
        while len(in_flight) > 4 or (in_flight and in_flight[0].done()):  # bounded: back-pressure on slow disks
            in_flight.pop(0).result()

    if not store.is_url(out) and distributed.rank() == 0 and not done.any():
        need, free = raw_bytes(fields, views, n), shutil.disk_usage(out).free
        if need > free:
            warnings.warn(
                f"the cache may need up to {_size_text(need)} before compression and {out} has {_size_text(free)} "
                "free; if the disk fills, free space and rerun with --resume",
                stacklevel=2,
            )
    try:
        _run_units(loader, planned, teacher, dev, n, layout, buffer, submit, progress, total_rows)
        for f in in_flight:
            f.result()
    except OSError as e:
        if e.errno not in store.OUT_OF_SPACE:
            raise
        raise _out_of_space(out, e, group, fields, layout) from None
    finally:
        # Units already handed to the writer are complete: let them land, so an interrupt loses only the current one.
        writer.shutdown(wait=True)
    distributed.barrier()
    return store.open_cache(out)


def _run_units(loader, planned, teacher, dev, n, layout, buffer, submit, progress, total_rows) -> None:
    """The teacher over the planned batches; a unit's logits go to the writer when its last batch is done."""
    with (
        progress_bar("build", total_rows, enabled=progress and distributed.rank() == 0) as advance,
        torch.inference_mode(),
    ):
        for x in loader:
            unit, idx = planned.popleft()  # the loader keeps the sampler's order
            logits = _teacher_logits(teacher, x, dev)
            finite = torch.isfinite(logits).all(dim=1)
            if not finite.all():
                bad = idx[int((~finite).nonzero()[0])]
                raise LogitcacheError(
                    f"the teacher produced NaN/inf for view {bad // n}, sample {bad % n}; "
                    "nothing was written for its chunk"
                )
            buffer.append(logits)
            start, stop = layout.rows(unit[1])
            if idx[-1] == unit[0] * n + stop - 1:  # the unit's last batch
                submit(unit)
            advance(len(idx))
