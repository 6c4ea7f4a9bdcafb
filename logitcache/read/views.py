"""Whole views of a cache's targets in shared memory, served to the DataLoader workers of one rank.

A view that fits the memory budget is read once per epoch, in order, into a buffer allocated before any worker starts
(so every worker maps the same pages); with two buffers the next epoch's view is read by a background thread during
this one. Integrity: each buffer's (view held, fill count) is published under a lock shared by every process only
once the buffer is complete, and a reader checks it before and after copying rows (a seqlock), so rows copied while
``set_epoch`` refilled the buffer are dropped (the caller reads them by chunk instead), never served.
"""

from __future__ import annotations

import threading

import torch

from logitcache.read import procs
from logitcache.encoding.base import torch_dtype
from logitcache.store import Cache


class SharedViews:
    """``count`` (1 or 2) view buffers of ``cache``'s fields; ``lock`` is the dataset's shared lock and ``rows_read``
    its per-process read counters (slot 0: this process)."""

    def __init__(self, cache: Cache, count: int, lock, rows_read: torch.Tensor):
        self.cache, self._lock, self._rows_read = cache, lock, rows_read
        self.buffers = self.allocate(cache, count)
        # holds[b]: the view buffer b holds, -1 while it is empty or being filled; fills[b] counts its fills
        self.holds = torch.full((count,), -1, dtype=torch.int64).share_memory_()
        self.fills = torch.zeros(count, dtype=torch.int64).share_memory_()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False

    @staticmethod
    def allocate(cache: Cache, count: int) -> list[dict[str, torch.Tensor]]:
        fields = cache.encoding.fields().items()
        shape = (cache.num_samples,)
        return [
            {name: torch.empty((*shape, *f.shape), dtype=torch_dtype(f.dtype)).share_memory_() for name, f in fields}
            for _ in range(count)
        ]

    @property
    def prefetches(self) -> bool:
        return len(self.buffers) == 2

    def set_epoch(self, view: int, upcoming: int) -> None:
        """Hold ``view`` (read now unless a buffer holds it) and, with two buffers, read ``upcoming`` in the
        background. An error of the previous background read is raised here."""
        self.join()
        if self._buffer_of(view) is None:
            self.fill(self._spare(avoid=upcoming), view)
        if self.prefetches and self._buffer_of(upcoming) is None:
            spare = self._spare(avoid=view)
            self._unpublish(spare)  # before the thread starts: never served while it is being filled
            self._thread = threading.Thread(
                target=self._prefetch, args=(spare, upcoming), name="logitcache-prefetch", daemon=True
            )
            self._thread.start()

    def join(self) -> None:
        """Wait for the background read; raise its error, if it had one."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def gather(self, indices: list[int], view: int) -> dict[str, torch.Tensor] | None:
        """The rows of ``indices`` from the buffer holding ``view``, or None (none holds it, or it was refilled
        during the copy)."""
        with self._lock:
            held = [(int(self.holds[b]), int(self.fills[b])) for b in range(len(self.buffers))]
        b = next((b for b, (v, _) in enumerate(held) if v == view), None)
        if b is None:
            return None
        rows = self._gather_rows(b, torch.as_tensor(indices, dtype=torch.int64))
        with self._lock:
            if (int(self.holds[b]), int(self.fills[b])) != held[b]:
                return None
        return rows

    def _gather_rows(self, b: int, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: t[idx] for name, t in self.buffers[b].items()}

    def fill(self, b: int, view: int) -> None:
        """The whole view, read in order (a few dozen chunks per call, each checked against its digest); published
        under the lock once complete. On the prefetch thread every torch and store call runs inside
        procs.reading(): a fork never catches it mid-call."""
        with procs.reading():
            self._unpublish(b)
        buffer, block, n = self.buffers[b], self.cache.chunk_rows * 32, self.cache.num_samples
        for start in range(0, n, block):
            if self._closed:  # close() during a prefetch: leave the buffer unpublished
                return
            stop = min(start + block, n)
            with procs.reading():
                rows = self.cache.read(view, start, stop, fields_only=True)
                for name, t in buffer.items():
                    t[start:stop] = rows[name]
                del rows
        with procs.reading():
            self._rows_read[0] += n
            with self._lock:
                self.holds[b] = view

    def close(self) -> None:
        """Stop the background read and unpublish every buffer."""
        self._closed = True
        if self._thread is not None:
            self._thread.join()
            self._thread, self._error = None, None
        with self._lock:
            self.holds.fill_(-1)

    def _prefetch(self, b: int, view: int) -> None:
        try:
            self.fill(b, view)
        except BaseException as e:  # raised in the training thread, at the next set_epoch
            self._error = e

    def _buffer_of(self, view: int) -> int | None:
        with self._lock:
            return next((b for b in range(len(self.buffers)) if int(self.holds[b]) == view), None)

    def _spare(self, avoid: int) -> int:
        """A buffer to fill: one not holding view ``avoid`` (the one to keep) when there are two."""
        with self._lock:
            return next((b for b in range(len(self.buffers)) if int(self.holds[b]) != avoid), 0)

    def _unpublish(self, b: int) -> None:
        with self._lock:
            self.holds[b] = -1
            self.fills[b] += 1

    def __getstate__(self) -> dict:
        # A worker only gathers: the buffers and tags travel as shared memory, the lock as its name; no thread.
        return {**self.__dict__, "_thread": None, "_error": None, "cache": None}
