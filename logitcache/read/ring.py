"""Windows of a chunk-shuffled epoch, read once per rank into memory the DataLoader workers share.

``ChunkShuffleSampler`` serves a rank's share of an epoch one *window* (``window`` chunks' rows) at a time. Left to
themselves the workers would each decode every chunk of a window (the DataLoader deals a window's batches to all of
them): the store would be read once per worker. Here one thread of the rank's main process reads the windows in
order, each chunk once, into a ring of ``slots`` shared-memory buffers allocated before the workers fork; a worker
waits until the window its batch needs is in its slot and gathers from it; a slot is refilled once every row of the
window it holds has been served.

Integrity (the student never gets another sample's target): a slot's tag says which (epoch, window) it holds and is
cleared before the slot is rewritten; a worker checks the tag before and after it copies rows (a seqlock), so a copy
that raced a refill is refused, never served. Tags are written and read under a lock shared by every process
(``procs.shared_lock``): its acquire and release are the barriers that order the window's data before its tag for
the reader (what one process wrote before releasing the lock, the next to acquire it sees), on weakly ordered CPUs too
(aarch64), where plain stores to shared memory may become visible out of order.
Requests the ring cannot serve in order (another sampler, the same rows twice, an epoch abandoned midway) end in a
``LogitcacheError`` that says so, never in other rows' targets.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import torch
from torch.utils.data import get_worker_info

from logitcache.read import procs
from logitcache.errors import LogitcacheError
from logitcache.read.sampler import ChunkShuffleSampler

MAX_WORKERS = 256
PROCESS_SLOTS = MAX_WORKERS + 1  # per-process counters: the main process, and each DataLoader worker


def process_slot() -> int:
    """This process's counter slot: 0 in the main process, worker ``w``'s is ``w + 1``."""
    info = get_worker_info()
    if info is None:
        return 0
    if info.id >= MAX_WORKERS:
        raise LogitcacheError(
            f"DataLoader worker {info.id}: a CachedKDDataset serves at most {MAX_WORKERS} workers per loader"
        )
    return info.id + 1


class WindowRing:
    SLOTS = 3  # one window served, one read ahead, one being refilled

    def __init__(
        self,
        sampler: ChunkShuffleSampler,
        fields: dict[str, tuple[tuple[int, ...], torch.dtype]],
        read_chunks: Callable[[int, list[int]], list[dict[str, torch.Tensor]]],
        rows_read: torch.Tensor,
        lock: Any,
        slots: int = SLOTS,
        stall_s: float = 120.0,
        name: str = "",
    ):
        if slots < 2:
            raise ValueError("a ring needs at least 2 slots (one served while the next is read)")
        self.sampler, self.read_chunks, self.rows_read, self.stall_s = sampler, read_chunks, rows_read, stall_s
        self.lock, self.name, self.owner = lock, name, os.getpid()
        self.span = sampler.window * sampler.chunk_rows
        self.buffers = [
            {
                name: torch.empty((self.span, *shape), dtype=dtype).share_memory_()
                for name, (shape, dtype) in fields.items()
            }
            for _ in range(slots)
        ]
        # tags[s]: the key (epoch, window) slot s holds, -1 while it is empty or being written (under self.lock)
        self.tags = torch.full((slots,), -1, dtype=torch.int64).share_memory_()
        # served[s, p]: rows of slot s's window that process p has copied out (each written by its own process only)
        self.served = torch.zeros((slots, PROCESS_SLOTS), dtype=torch.int64).share_memory_()
        self.total = torch.zeros(PROCESS_SLOTS, dtype=torch.int64).share_memory_()  # rows served this epoch
        self.pids = torch.zeros(PROCESS_SLOTS, dtype=torch.int64).share_memory_()  # the process that owns each slot
        self.largest = torch.zeros(1, dtype=torch.int64).share_memory_()  # the largest request (a batch) seen
        self.epoch = torch.full((1,), -1, dtype=torch.int64).share_memory_()  # the epoch being served, -1: none yet
        self.active = torch.zeros(1, dtype=torch.int64).share_memory_()  # 1: the ring serves it, 0: read by chunk
        self.failed = torch.zeros(1, dtype=torch.int64).share_memory_()  # the filler died: its message's length
        self.message = torch.zeros(4096, dtype=torch.uint8).share_memory_()
        self.waiting = torch.zeros(1, dtype=torch.int64).share_memory_()  # 1: the filler waits for a slot to be freed
        self._view = -1
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._starts: tuple[int, torch.Tensor] | None = None  # (epoch, chunk starts), per process

    def __getstate__(self) -> dict:
        # a worker started by spawn or forkserver gets the shared tensors and the lock; the filler (its thread and
        # what it reads with) stays with the training process
        return {**self.__dict__, "read_chunks": None, "_thread": None, "_stop": None, "_error": None, "_starts": None}

    @property
    def slots(self) -> int:
        return len(self.buffers)

    def _key(self, epoch: int, window: int) -> int:
        return epoch * (1 << 32) + window

    def _windows(self) -> int:
        return -(-len(self.sampler) // self.span)

    def _rows_in(self, window: int) -> int:
        return min(self.span, len(self.sampler) - window * self.span)

    # --- the main process ----------------------------------------------------------------------------------------
    def start(self, epoch: int, view: int) -> bool:
        """Serve ``epoch`` (reading ``view``) from the ring; False when it cannot, because the previous epoch was left
        midway (its leftover requests, which persistent workers still run, would be counted against this one): then
        this epoch reads by chunk."""
        if self._thread is not None and int(self.epoch[0]) == epoch and int(self.total.sum()) == 0:
            return True  # set_epoch again before anything of this epoch was served: the filler goes on
        self.stop()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        # every row of the previous epoch served but the last partial batch a loader may drop
        previous_complete = int(self.epoch[0]) < 0 or int(self.total.sum()) + int(self.largest[0]) > len(self.sampler)
        self.active[0] = 0
        with self.lock:
            self.tags.fill_(-1)
        self.served.zero_()
        self.total.zero_()
        self.failed.zero_()
        self.epoch[0] = epoch
        if not previous_complete:
            return False
        self._view, self._stop = view, threading.Event()
        self.active[0] = 1
        self._thread = threading.Thread(
            target=self._fill_all, args=(epoch, self._stop), name="logitcache-ring", daemon=True
        )
        self._thread.start()
        return True

    def stop(self) -> None:
        """Stop the filler; workers still waiting on this ring stop with an error instead of waiting."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.active[0] = 0

    def _fill_all(self, epoch: int, stop: threading.Event) -> None:
        # Everything this thread does with torch or the store runs inside procs.reading(), released only while it
        # sleeps: a fork of the training process must never catch it mid-call (a first call of a torch function
        # registers an exit handler under a libc lock that a forked child would inherit held; RESULTS.md).
        try:
            with procs.reading():
                chunk_starts = self.sampler.chunk_starts(epoch)
                order = torch.argsort(chunk_starts).tolist()
                sizes = self.sampler.chunk_sizes().tolist()
                starts = chunk_starts.tolist()
            carry: tuple[int, dict[str, torch.Tensor]] | None = None  # a chunk that spans two windows, read once
            at = 0  # index into order: the first chunk that may still have rows for the next window
            for w in range(self._windows()):
                slot, lo, hi = w % self.slots, w * self.span, w * self.span + self._rows_in(w)
                if w >= self.slots and not self._wait_free(slot, self._rows_in(w - self.slots), stop):
                    return
                parts = []  # (chunk, first, last): chunk c's rows [first, last) of the rank's share are this window's
                while at < len(order) and starts[order[at]] < hi:
                    c = order[at]
                    first, last = max(lo, starts[c]), min(hi, starts[c] + sizes[c])
                    if last > first:
                        parts.append((c, first, last))
                    if starts[c] + sizes[c] > hi:
                        break  # the chunk continues in the next window
                    at += 1
                wanted = [c for c, _, _ in parts if carry is None or c != carry[0]]
                with procs.reading():
                    with self.lock:
                        self.tags[slot] = -1  # before any write: a reader that sees this tag does not use the slot
                    self.served[slot].zero_()  # every row of the window it held was served: the counts are complete
                    rows = dict(zip(wanted, self.read_chunks(self._view, wanted)))  # one concurrent read per window
                    if carry is not None:
                        rows.setdefault(*carry)
                    buffer = self.buffers[slot]
                    for c, first, last in parts:
                        for name, t in buffer.items():
                            t[first - lo : last - lo] = rows[c][name][first - starts[c] : last - starts[c]]
                    self.rows_read[0] += sum(sizes[c] for c in wanted)
                    carry = (parts[-1][0], rows[parts[-1][0]]) if parts else None
                    with self.lock:  # its release orders the rows above before the tag, for every reader
                        self.tags[slot] = self._key(epoch, w)
        except BaseException as e:  # the waiting workers raise its message; set_epoch raises the error itself
            self._error = e
            text = (str(e) or type(e).__name__).encode()[: len(self.message)]
            with procs.reading(), self.lock:  # the message before its length, for every reader
                self.message[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
                self.failed[0] = len(text)

    def _wait_free(self, slot: int, rows: int, stop: threading.Event) -> bool:
        # the filler is two windows ahead while it waits here (most of the epoch): polling every 5 ms costs the
        # training process next to nothing and leaves the next window dozens of batches to be read in
        with procs.reading():
            self.waiting[0] = 1
        try:
            while True:
                with procs.reading():
                    if int(self.served[slot].sum()) >= rows:
                        return True
                if stop.wait(0.005):
                    return False
        finally:
            with procs.reading():
                self.waiting[0] = 0

    # --- any process -----------------------------------------------------------------------------------------------
    def serves(self, epoch: int) -> bool:
        return bool(self.active[0]) and int(self.epoch[0]) == epoch

    def count(self, rows: int) -> None:
        """Rows of the epoch served by chunk instead (how the next epoch knows this one was not left midway)."""
        self.total[self._claim()] += rows
        if rows > int(self.largest[0]):
            self.largest[0] = rows

    def take(self, indices: list[int], epoch: int) -> dict[str, torch.Tensor]:
        """The rows of ``indices`` (this rank's samples of ``epoch``, requested in the sampler's order)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if self._starts is None or self._starts[0] != epoch:
            self._starts = (epoch, self.sampler.chunk_starts(epoch))
        pos = self._starts[1][idx // self.sampler.chunk_rows] + idx % self.sampler.chunk_rows
        outside = (pos < 0) | (pos >= len(self.sampler))
        if outside.any():
            raise LogitcacheError(
                f"sample {int(idx[outside][0])} is not in this rank's share of epoch {epoch}: targets read through the "
                "chunk-shuffle ring must be requested in the order of the dataset's own chunk_sampler()"
            )
        me = self._claim()
        if len(idx) > int(self.largest[0]):
            self.largest[0] = len(idx)
        window = pos // self.span
        first, last = int(window.min()), int(window.max())
        if first == last:  # most batches: one window, one gather per field
            return self._gather(epoch, first, pos - first * self.span, me)
        out = {name: torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype) for name, t in self.buffers[0].items()}
        for w in range(first, last + 1):
            rows = (window == w).nonzero()[:, 0]
            if len(rows):
                for name, t in self._gather(epoch, w, pos[rows] - w * self.span, me).items():
                    out[name][rows] = t
        return out

    def _gather(self, epoch: int, window: int, offsets: torch.Tensor, me: int) -> dict[str, torch.Tensor]:
        slot, key = window % self.slots, self._key(epoch, window)
        self._wait_for(slot, key, epoch, window)
        rows = {name: t[offsets] for name, t in self.buffers[slot].items()}
        with self.lock:
            moved = int(self.tags[slot]) != key
        if moved:  # the slot was rewritten while we copied: those rows are not ours
            raise LogitcacheError(self._out_of_order(epoch, window))
        self.served[slot, me] += len(offsets)
        self.total[me] += len(offsets)
        return rows

    def _claim(self) -> int:
        """This process's counter slot, checked to be its own: two loaders iterating one dataset at once would share
        worker slots and lose counts."""
        me, pid = process_slot(), os.getpid()
        holder = int(self.pids[me])
        if holder != pid:
            if holder and procs.alive(holder):
                raise LogitcacheError(
                    f"two DataLoaders read targets from one CachedKDDataset at once (process {pid} and {holder} are "
                    f"both its worker {me - 1}); give each loader its own dataset"
                )
            self.pids[me] = pid
        return me

    def _wait_for(self, slot: int, key: int, epoch: int, window: int) -> None:
        last, since, waited = None, time.monotonic(), time.monotonic()
        checked = waited
        while True:
            with self.lock:
                tag = int(self.tags[slot])
            if tag == key:
                return
            if self.failed[0]:
                if self._error is not None:  # the filler's own process: its error itself (e.g. DamagedCache)
                    raise self._error
                with self.lock:
                    text = bytes(self.message[: int(self.failed[0])].tolist())
                raise LogitcacheError(text.decode(errors="replace"))
            if tag > key or not self.serves(epoch):  # the slot has moved past this window: it was freed
                raise LogitcacheError(self._out_of_order(epoch, window))
            if time.monotonic() - checked > 0.25 and get_worker_info() is not None:  # the training process alive?
                checked = time.monotonic()
                if not procs.alive(self.owner):
                    raise LogitcacheError(
                        f"the training process {self.owner} that reads the ring of {self.name or 'the store'} has "
                        "exited; this DataLoader worker stops"
                    )
            state = (tag, int(self.served.sum()))
            if state != last:
                last, since = state, time.monotonic()
            elif time.monotonic() - since > self.stall_s and self.waiting[0]:  # the filler waits for us: a deadlock
                raise LogitcacheError(self._out_of_order(epoch, window) + f" (nothing moved for {self.stall_s:g} s)")
            elif time.monotonic() - since > self.stall_s:
                raise LogitcacheError(
                    f"waited {time.monotonic() - waited:.0f} s for window {window} of epoch {epoch} of "
                    f"{self.name or 'the store'} and nothing moved for {self.stall_s:g} s (the store reads that "
                    "slowly, or the training process stopped serving; chunk_sampler(stall_s=...) sets the limit)"
                )
            time.sleep(0.0005)

    def _out_of_order(self, epoch: int, window: int) -> str:
        return (
            f"targets of epoch {epoch}, window {window} were requested out of the chunk-shuffle order (another "
            "sampler, the same samples twice, or an epoch left midway): iterate the dataset's own chunk_sampler() "
            "once per epoch, or take it with chunk_sampler(ring=False)"
        )
