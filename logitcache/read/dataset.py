"""Datasets for training: replayed augmentation, and the same plus cached teacher targets.

Both take the epoch from a shared-memory tensor, so ``set_epoch`` reaches DataLoader workers, persistent ones
included, with any sampler (``DistributedSampler`` too): call it before iterating the loader, as with
``DistributedSampler.set_epoch``. Both wrap a dataset on its own terms: its public attributes (``classes``,
``class_to_idx``, ``targets``, ...) pass through, and its own ``transform`` is the augmentation replayed when none is
given (taken over: set aside on a copy of the dataset, so no image is transformed twice).
"""

from __future__ import annotations

import os
import weakref
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, DistributedSampler, get_worker_info
from torch.utils.data._utils.collate import default_collate_fn_map

from logitcache import distributed
from logitcache.read import procs
from logitcache.augment.presets import dataset_and_augment, own_transform
from logitcache.store.compat import compatibility
from logitcache.datasets import dataset_len, labels_of
from logitcache.encoding.base import torch_dtype
from logitcache.errors import LogitcacheError
from logitcache.store.meta import CacheMeta
from logitcache.augment.mix import Mix, mixed_view, soft_label
from logitcache.augment.seeds import replay_view
from logitcache.read.ring import PROCESS_SLOTS, WindowRing, process_slot
from logitcache.read.sampler import ChunkShuffleSampler
from logitcache.specs import recorded_augment
from logitcache.store import Cache, open_cache
from logitcache.read.views import SharedViews


class ReplayDataset(Dataset):
    """``ds[i]`` -> ``(view of image i for the current epoch, label)``, the view replayed from ``(seed, view, i)``.

    With ``num_views`` set, epoch ``e`` uses view ``e % num_views``; without, every epoch gets a fresh view ``e``.
    With ``mix`` (``logitcache.augment.mix.Mix``) active the image is mixed with its partner's view as
    ``logitcache.augment.mix`` replays it, and the label is the mixed one: a float vector ``[num_classes]``
    (``F.cross_entropy`` takes it). ``augment`` defaults to ``base.transform``, taken over
    (``logitcache.augment.presets.dataset_and_augment``). The wrapped dataset's public attributes pass through
    (``ds.classes``, ``ds.targets``). With ``num_views`` set, serving more samples than one epoch holds without a
    ``set_epoch`` in between warns once: every such pass replays the same view.
    """

    def __init__(
        self,
        base: Dataset,
        augment: Callable[[Any], torch.Tensor] | None = None,
        seed: int = 0,
        num_views: int | None = None,
        mix: Mix | None = None,
        num_classes: int | None = None,
    ):
        base, augment = dataset_and_augment(base, augment, type(self).__name__)
        self.base, self.augment, self.seed, self.num_views = base, augment, seed, num_views
        self.mix = mix or Mix()
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        # Samples served after the last set_epoch, per process slot (each slot written by one process alone), and
        # the warnings already given by any process (0: read amplification, 1: a pass without set_epoch).
        self._served = torch.zeros(PROCESS_SLOTS, dtype=torch.int64).share_memory_()
        self._warned = torch.zeros(2, dtype=torch.int64).share_memory_()
        # Shared with the workers: a warning's check-and-set (and, in CachedKDDataset, the publication of buffers).
        self._lock = procs.shared_lock()
        self._pass = -(-dataset_len(base) // distributed.world_size())  # one epoch's samples on this rank
        if self.mix.active:  # partners' labels, without loading their images twice
            self._labels = labels_of(base)
            self.num_classes = num_classes or int(self._labels.max()) + 1

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: the wrapped dataset's public attributes (classes, targets, ...).
        base = self.__dict__.get("base")
        if base is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        try:
            return getattr(base, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}, nor has its dataset "
                f"({type(base).__name__})"
            ) from None

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch
        self._served.zero_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def view_of(self, epoch: int) -> int:
        return epoch % self.num_views if self.num_views else epoch

    def __len__(self) -> int:
        return dataset_len(self.base)

    def image(self, index: int, view: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        if self.mix.active:
            image, d = mixed_view(self.augment, self.base, self.seed, view, index, self.mix)
            label = soft_label(int(self._labels[index]), int(self._labels[d.partner]), d.lam, self.num_classes)
            return image, label
        image, label = self.base[index]
        return replay_view(self.augment, image, self.seed, view, index), int(label)

    def __getitem__(self, index: int):
        self._count(1)
        return self.image(index, self.view_of(self.epoch))

    def _first_warning(self, which: int) -> bool:
        """True for the one process, of all that share this dataset, that gives warning ``which``: the check and
        the set happen under the shared lock, so two workers crossing a threshold together warn once."""
        with self._lock:
            first = not self._warned[which]
            self._warned[which] = 1
        return bool(first)

    def _count(self, n: int) -> None:
        """Counts ``n`` samples served; the first sample past one epoch's without a ``set_epoch`` warns, once."""
        if self.num_views is None:
            return
        self._served[process_slot()] += n
        if not self._warned[1] and int(self._served.sum()) > self._pass and self._first_warning(1):
            warnings.warn(
                f"{type(self).__name__}: a second pass over the data without set_epoch ({int(self._served.sum())} "
                f"samples served, one epoch holds {self._pass}): it replays view {self.view_of(self.epoch)} and its "
                "order again; call ds.set_epoch(epoch) before iterating each epoch (in a single process too)",
                stacklevel=3,
            )


class CachedKDDataset(ReplayDataset):
    """``ds[i]`` -> ``(image, label, target)``: ``image`` is exactly the view the teacher labelled for this epoch.

    ``target`` is a dict of tensors (a dict-like ``TargetRow`` when the DataLoader fetches a batch; the default
    collate makes either a dict of batched tensors): the stored fields as they travel, decoded on the device by
    ``logitcache.KDLoss(ds)`` (or ``kd_loss(..., cache=ds)``, ``to_probs(..., cache=ds)``).
    ``augment`` defaults to the one recorded in the cache (a CLI spec), else to the dataset's own ``transform``,
    taken over (set aside on a copy of the dataset, so no image is transformed twice; ``augment=base.transform`` does
    the same). Any augmentation that differs from the recorded one, in its structure (transforms and parameters) or
    in its replayed views, is refused with a message naming the difference (``allow_mismatch=True`` turns that into
    a warning, at your own risk). ``mix`` defaults to the cache's Mixup/CutMix (then ``label`` is the mixed label
    vector); another one is refused. The dataset's public attributes pass through (``ds.classes``, ``ds.targets``);
    ``cached_targets`` reads the cached targets by index.

    Reading: when one view's targets fit ``memory_mb``, ``set_epoch`` reads the
    epoch's view sequentially, once, into shared memory that every DataLoader worker of this process (one copy per
    rank) serves from: each chunk is read once per epoch whatever the shuffle; when two views fit, the next epoch's is
    read in the background during this one (``prefetch=False`` turns that off), so an epoch does not wait for it.
    Otherwise iterate the dataset with its own ``chunk_sampler()`` (a ``ChunkShuffleSampler``, whose order keeps the
    chunks needed at a time few): the main process then reads each window of chunks once, in order, into a small ring
    of shared memory the workers serve from (``logitcache.read.ring``), so each chunk is read once per rank and epoch.
    Any other order is served one whole chunk at a time from an LRU of ``max_cache_mb`` per worker (a shuffled
    order reads each chunk about once per sample): when a process decodes several times the rows it serves, it warns
    once, with the figure and the fix (``ds.sampler()``).
    Without ``set_epoch`` (or before it) the chunk path serves, so results never depend on which path ran.
    """

    def __init__(
        self,
        base: Dataset,
        cache: Cache | str | os.PathLike,
        *,
        augment: Callable[[Any], torch.Tensor] | None = None,
        allow_mismatch: bool = False,
        mix: Mix | None = None,
        memory_mb: float = 4096,
        max_cache_mb: float = 512,
        prefetch: bool = True,
    ):
        cache = cache if isinstance(cache, Cache) else open_cache(cache)
        cache.require_complete()
        meta = cache.meta
        if augment is None:
            try:
                augment = recorded_augment(meta, base)
            except LogitcacheError as e:
                if own_transform(base) is None:  # nothing else to replay
                    raise LogitcacheError(
                        f"{' '.join(str(e).split())}, or a dataset whose transform is that augmentation"
                    ) from None
        super().__init__(base, augment, meta.seed, cache.num_views, mix or cache.mix, cache.num_classes)
        self.cache = cache
        self._pid = os.getpid()
        self._memory_mb = memory_mb
        self._reads = [self._pid, 0, 0]  # this process's rows served and rows decoded on the chunk path
        self._check(self.base, meta, allow_mismatch)
        self._chunks: OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = OrderedDict()
        self._chunk_bytes = max(1, sum(t.nbytes for t in cache.read_chunk(0, 0).values()))
        self._max_chunks = max(1, int(max_cache_mb * 2**20 // self._chunk_bytes))
        # rows decoded from the store, per process slot (main = 0, worker w = w + 1): read amplification
        self.rows_read = torch.zeros(PROCESS_SLOTS, dtype=torch.int64).share_memory_()
        # (self._lock, from ReplayDataset: the views' and the ring's tags are written under it too)
        # Whole views in shared memory (logitcache.read.views) when one fits memory_mb: the epoch's, and when two fit
        # the next epoch's, read in the background meanwhile.
        self._views: SharedViews | None = None
        self._sampler: DistributedSampler | ChunkShuffleSampler | None = None
        self._ring: WindowRing | None = None
        self._closed = False
        nbytes = cache.view_nbytes()
        fit = int(memory_mb * 2**20 // max(1, nbytes))  # whole views within memory_mb (the same on every rank)
        options = [n for n in ((2,) if prefetch and cache.num_views > 1 and fit >= 2 else ()) + (1,) if n <= fit]
        wanted = procs.place("one view of targets", [*options, 0], lambda n: n * nbytes)  # collective: every rank
        if wanted:
            self._views = procs.allocate(
                "one view of targets", lambda: SharedViews(cache, wanted, self._lock, self.rows_read)
            )

    def sampler(
        self, *, num_replicas: int = 1, rank: int = 0, seed: int = 0, window: int = 8
    ) -> DistributedSampler | ChunkShuffleSampler:
        """The sampler this dataset's read path wants, the same kind on every rank (the placement is agreed): a
        shuffled ``DistributedSampler`` (``drop_last``) when each view is served from memory, else
        ``chunk_sampler()``. Call it before the DataLoader starts its workers; ``set_epoch`` sets its epoch too."""
        if self.in_memory:
            self._sampler = DistributedSampler(
                self, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
            )
            self._pass = len(self._sampler)
            return self._sampler
        return self.chunk_sampler(window=window, num_replicas=num_replicas, rank=rank, seed=seed)

    def chunk_sampler(
        self,
        *,
        window: int = 8,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        ring: bool = True,
        stall_s: float = 120.0,
    ) -> ChunkShuffleSampler:
        """The chunk-aware shuffle for this dataset (``set_epoch`` sets its epoch too). When the view is read by chunk
        (not ``in_memory``) and ``ring``, its windows are read once per rank into shared memory for the workers:
        call this before the DataLoader starts its workers, and iterate every epoch in full. A worker that waits
        ``stall_s`` seconds for a window without any progress stops with an error naming it. ``ring=False`` removes
        a ring made by an earlier call."""
        sampler = ChunkShuffleSampler(
            len(self), self.cache.chunk_rows, window=window, num_replicas=num_replicas, rank=rank, seed=seed
        )
        self._sampler, self._pass = sampler, len(sampler)
        if self._ring is not None:
            self._ring.stop()
            self._ring = None
        if ring and not self.in_memory:
            fields = {n: (f.shape, torch_dtype(f.dtype)) for n, f in self.cache.encoding.fields().items()}
            ring_bytes = self.cache.view_nbytes() // len(self) * WindowRing.SLOTS * sampler.window * sampler.chunk_rows
            if procs.place("the ring of windows", [1, 0], lambda n: n * ring_bytes):
                self._ring = procs.allocate(
                    "the ring of windows",
                    lambda: WindowRing(
                        sampler, fields, self.cache.read_chunks, self.rows_read, self._lock, stall_s=stall_s,
                        name=str(self.cache.path),
                    ),
                )  # fmt: skip
                if self._ring is not None:  # a dataset dropped without close() stops its filler too
                    weakref.finalize(self, self._ring.stop)
        return sampler

    @property
    def in_memory(self) -> bool:
        """Whether one view's targets fit ``memory_mb``, so each epoch's view is served from shared memory."""
        return self._views is not None

    @property
    def prefetches(self) -> bool:
        """Whether the next epoch's view is read in the background during this one (two views fit ``memory_mb``)."""
        return self._views is not None and self._views.prefetches

    @property
    def ring_serves(self) -> bool:
        """Whether a ring of windows (``chunk_sampler()``) reads this dataset's chunks for its workers."""
        return self._ring is not None

    def set_epoch(self, epoch: int) -> None:
        self._open()
        super().set_epoch(epoch)
        if self._sampler is not None:
            self._sampler.set_epoch(epoch)
        if self._ring is not None and not self._ring.start(epoch, self.view_of(epoch)):
            warnings.warn(
                f"epoch {epoch}: the previous epoch was left midway, so this one reads its targets by chunk (slower); "
                "the ring of windows resumes with the next complete epoch",
                stacklevel=2,
            )
        if self._views is not None:
            self._views.set_epoch(self.view_of(epoch), self.view_of(epoch + 1))

    def close(self) -> None:
        """Stop the background reads and release the shared buffers; the dataset then reads by chunk. ``train``
        calls it when a run ends, however it ends; ``with CachedKDDataset(...) as ds:`` does the same."""
        self._closed = True
        if self._ring is not None:
            self._ring.stop()
        if self._views is not None:
            try:
                self._views.close()
            except LogitcacheError:  # a process died holding the lock: nothing will read these buffers again
                pass
        self._views, self._ring = None, None

    def __enter__(self) -> "CachedKDDataset":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> None:
        if self._closed:
            raise LogitcacheError("this CachedKDDataset was closed; make a new one to train again")

    def __getstate__(self) -> dict:
        # What a DataLoader worker needs (spawn/forkserver pickle it): the shared tensors travel as shared memory,
        # the lock as its name, the store as its path; no chunk cache, no sampler (the views drop their thread).
        return {**self.__dict__, "_chunks": OrderedDict(), "_sampler": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()  # the store was opened anew by unpickling it

    def _check(self, base: Dataset, meta: CacheMeta, allow_mismatch: bool) -> None:
        for diff in compatibility(meta, base, self.augment, self.mix):
            if diff.what == "images" and own_transform(base) is not None:
                raise LogitcacheError(
                    f"{diff}; the dataset applies its own transform to every image: pass augment=dataset.transform "
                    "to replay it instead, or a dataset without one"
                )
            if diff.what != "augmentation" or not allow_mismatch:
                raise LogitcacheError(str(diff))
            warnings.warn(
                f"{diff} -- continuing because allow_mismatch=True: targets will not match the images", stacklevel=3
            )

    def target(self, index: int, view: int) -> dict[str, torch.Tensor]:
        """The cached target of sample ``index`` in ``view`` (a dict of tensors without a batch dimension)."""
        return {name: t[0] for name, t in self.cached_targets([index], view).items()}

    def cached_targets(
        self, indices: list[int], view: int, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The cached targets of ``indices`` in ``view``, batched: from the shared view when it holds ``view``, else
        one gather per chunk and field; all in one buffer (``labels`` too, under a private key, when given)."""
        return self._targets(indices, view, labels, served=False)

    def _targets(
        self, indices: list[int], view: int, labels: torch.Tensor | None, served: bool
    ) -> dict[str, torch.Tensor]:
        # served: a request of the loader's order (the ring serves it, when it serves this epoch's view)
        batch = self._from_memory(indices, view)
        if batch is None:
            epoch = self.epoch
            ring = self._ring if served and view == self.view_of(epoch) else None
            if ring is not None and ring.serves(epoch):
                batch = self.cache.wire(ring.take(indices, epoch))
            else:
                self._own_handle()
                batch = self.cache.take(view, indices, self._chunk)
                if ring is not None:
                    ring.count(len(indices))
                elif served and self._views is None:
                    self._watch_reads(len(indices))
        if labels is not None:
            batch[_LABELS] = labels
        return packed(batch)

    def _from_memory(self, indices: list[int], view: int) -> dict[str, torch.Tensor] | None:
        rows = self._views.gather(indices, view) if self._views is not None else None
        return self.cache.wire(rows) if rows is not None else None

    def _own_handle(self) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: open its own store handle, lazily
            self.cache, self._pid = self.cache.reopened(), os.getpid()
            self._chunks.clear()

    def _read_counts(self) -> list[int]:
        """This process's ``[pid, rows served, rows decoded]`` on the chunk path (a new process starts at zero)."""
        if self._reads[0] != os.getpid():
            self._reads = [os.getpid(), 0, 0]
        return self._reads

    def _watch_reads(self, served: int) -> None:
        """Warns once (over all processes) when this process decodes several times the rows it serves: the view is
        read by chunk in an order that is not the dataset's sampler's, each chunk decoded again and again."""
        counts = self._read_counts()
        counts[1] += served
        if self._warned[0] or counts[1] < 4 * self.cache.chunk_rows:
            return
        info = get_worker_info()
        amplification = counts[2] / counts[1]
        if amplification > max(4, 2 * (info.num_workers if info is not None else 1)) and self._first_warning(0):
            warnings.warn(
                f"targets are read chunk by chunk at {amplification:.1f} rows decoded per row served: one view "
                f"({self.cache.view_nbytes() / 2**20:.1f} MiB) is not held in memory (memory_mb="
                f"{self._memory_mb:g}), and the samples come in an order that is not the dataset's sampler's; pass "
                "sampler=ds.sampler() to the DataLoader (each chunk is then read once per epoch)",
                stacklevel=4,
            )

    def _chunk(self, view: int, chunk: int) -> dict[str, torch.Tensor]:
        key = (view, chunk)
        rows = self._chunks.get(key)
        if rows is None:
            rows = self.cache.read_chunk(view, chunk)
            n = len(next(iter(rows.values())))
            self._read_counts()[2] += n  # this process's, for the warning (a slot outlives its process)
            self.rows_read[process_slot()] += n  # per slot, shared: the read amplification benchmarks report
            self._chunks[key] = rows
            if len(self._chunks) > self._max_chunks:
                self._chunks.popitem(last=False)
        else:
            self._chunks.move_to_end(key)
        return rows

    def __getitem__(self, index: int):
        self._count(1)
        view = self.view_of(self.epoch)
        image, label = self.image(index, view)
        return image, label, {name: t[0] for name, t in self._targets([index], view, None, served=True).items()}

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, Any, Mapping[str, torch.Tensor]]]:
        # The DataLoader's batched fetch: targets are gathered for the whole batch at once and each sample gets a
        # TargetRow into them, which the default collate turns back into the batch without stacking anything. Integer
        # labels travel in the same buffer (LabelRow, an int): a batch then crosses from a worker in as many
        # shared-memory segments as it would without targets (images, labels).
        self._count(len(indices))
        view = self.view_of(self.epoch)
        samples = [self.image(i, view) for i in indices]
        labels = [label for _, label in samples]
        fold = all(type(label) is int for label in labels)
        batch = self._targets(indices, view, torch.tensor(labels, dtype=torch.int64) if fold else None, served=True)
        folded = batch.pop(_LABELS, None)  # present exactly when the labels are folded in: every label an int
        return [
            (image, label if folded is None else LabelRow(int(label), folded, row), TargetRow(batch, row))
            for row, (image, label) in enumerate(samples)
        ]


def packed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors as views into one buffer. A DataLoader worker sends every distinct storage to the main process
    through its own shared-memory segment; one segment per batch instead of one per field is what keeps a batch of
    targets nearly free next to the images (benchmarks/bench_scale.py)."""
    items = sorted(tensors.items(), key=lambda kv: -kv[1].element_size())  # widest first: every view stays aligned
    sizes = [-(-t.nbytes // 8) * 8 for _, t in items]
    buffer = torch.empty(sum(sizes), dtype=torch.uint8)
    out, offset = {}, 0
    for (name, t), size in zip(items, sizes):
        view = buffer[offset : offset + t.nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        out[name], offset = view, offset + size
    return {name: out[name] for name in tensors}


class TargetRow(Mapping):
    """One sample's cached target as a read-only mapping ``field -> tensor``, a row of its batch's tensors.

    Why not a dict of per-sample tensors: through DataLoader workers each extra tensor per sample costs a split, a
    stack and an inter-process copy, enough to slow the loader next to images alone. The default collate
    (``torch.utils.data.default_collate``, extended below for this type) returns the batch tensors themselves when it
    gets a whole batch's rows in order, and stacks the rows otherwise.
    """

    __slots__ = ("batch", "row")

    def __init__(self, batch: dict[str, torch.Tensor], row: int):
        self.batch, self.row = batch, row

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.batch[name][self.row]

    def __iter__(self) -> Iterator[str]:
        return iter(self.batch)

    def __len__(self) -> int:
        return len(self.batch)


def collate_target_rows(rows: list[TargetRow], *, collate_fn_map: dict | None = None) -> dict[str, torch.Tensor]:
    batch = rows[0].batch
    whole = all(r.batch is batch and r.row == i for i, r in enumerate(rows))
    if whole and len(rows) == len(next(iter(batch.values()))):
        return batch
    return {name: torch.stack([r[name] for r in rows]) for name in batch}


class LabelRow(int):
    """A sample's integer label that also knows its place in its batch's label tensor (which shares the targets'
    buffer). It is an ``int`` in every other respect, so a user's own collate_fn sees plain labels."""

    batch: torch.Tensor
    row: int

    def __new__(cls, value: int, batch: torch.Tensor, row: int):
        label = super().__new__(cls, value)
        label.batch, label.row = batch, row
        return label


def collate_label_rows(rows: list[LabelRow], *, collate_fn_map: dict | None = None) -> torch.Tensor:
    batch = rows[0].batch
    if len(rows) == len(batch) and all(r.batch is batch and r.row == i for i, r in enumerate(rows)):
        return batch
    return torch.tensor([int(r) for r in rows], dtype=torch.int64)


_LABELS = "__labels__"  # the labels' key inside a packed batch, removed before anyone sees the targets

# A side effect of importing logitcache, on purpose: torch's documented extension point for custom element types
# (torch.utils.data.default_collate's collate_fn_map). It adds a type torch does not know and changes nothing for any
# other type, so a user's own collate_fn keeps working (tests/test_data.py checks both).
default_collate_fn_map[TargetRow] = collate_target_rows
default_collate_fn_map[LabelRow] = collate_label_rows
