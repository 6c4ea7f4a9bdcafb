"""What crosses processes: background work that never overlaps a fork, a lock every start method shares, and
shared-memory placement decided once for all ranks of a job.

Forking while another thread is inside a call hands the child locks that no thread of the child will release: the
child can hang. Measured (benchmarks/RESULTS.md, process layouts): a DataLoader worker forked while the ring's
filler made its first call of a torch function inherited glibc's exit-handler lock held (the call was registering
the destructor of a function-local static), and hung at its own first call of another torch function. So every
torch and store call of logitcache's background threads (the next view's prefetch, the ring's filler) runs inside
``reading()``; an ``os.register_at_fork`` hook waits until no thread is inside one and holds new ones back until the
fork is done. Threads are only paused, never stopped, so whoever forks (a DataLoader starting its workers, the
user's own code) needs to do nothing.

Shared memory (``/dev/shm`` on Linux) is per node, and every rank of a node allocates at the same moment: a rank
that decided alone could fit where its neighbours do not, and ranks on different read paths no longer split an epoch
between them. ``place()`` counts every local rank against the free space and agrees on the smallest answer.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from logitcache import distributed
from logitcache.errors import LogitcacheError

T = TypeVar("T")

_cond = threading.Condition()
_forking = 0  # forks under way (threads may fork at once)
_inside: set[int] = set()  # idents of the threads inside a read
_hooked = False


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one owned by another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def reading() -> Iterator[None]:
    """A stretch of a background thread's work with torch or the store: a fork of this process waits until it is
    over, and it waits for a fork under way."""
    global _hooked
    me = threading.get_ident()
    with _cond:
        if not _hooked:  # registered late, so it runs before earlier hooks that take locks (logging's)
            os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_in_child)
            _hooked = True
        while _forking:
            _cond.wait()
        _inside.add(me)
    try:
        yield
    finally:
        with _cond:
            _inside.discard(me)
            _cond.notify_all()


def _before_fork() -> None:
    global _forking
    me = threading.get_ident()
    with _cond:
        _forking += 1
        while _inside - {me}:  # a read in the forking thread itself cannot be waited for
            _cond.wait()


def _after_fork() -> None:
    global _forking
    with _cond:
        _forking -= 1
        _cond.notify_all()


def _in_child() -> None:
    global _cond, _forking, _inside
    _cond, _forking, _inside = threading.Condition(), 0, set()  # the reading threads do not exist here


LOCK_TIMEOUT_S = 60.0


class SharedLock:
    """A lock that DataLoader workers share under every start method: a named POSIX semaphore (the spawn context's
    kind, which stays openable by name where fork's is unlinked at once), passed to workers as they start. Holding it
    orders memory: what one process wrote before releasing it is seen by the next process that acquires it, on
    weakly ordered CPUs too (aarch64), which is what makes a tag written under it a correct publication of the data
    written before. Critical sections are a few reads and writes of small tensors, so a lock not free within
    ``LOCK_TIMEOUT_S`` means a process died holding it: that is an error, not a wait forever."""

    def __init__(self) -> None:
        try:
            self._lock = multiprocessing.get_context("spawn").Lock()
        except OSError as e:  # no writable /dev/shm for named semaphores
            raise LogitcacheError(
                f"cannot create a lock shared with DataLoader workers ({e.strerror or e}); on Linux, /dev/shm must "
                "be writable"
            ) from None

    def __enter__(self) -> "SharedLock":
        if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            raise LogitcacheError(
                f"a lock shared with the DataLoader workers was not released within {LOCK_TIMEOUT_S:g} s: a worker "
                "or the training process died while holding it; restart the run (--resume keeps finished epochs)"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def shared_lock() -> SharedLock:
    return SharedLock()


def shm_free() -> int | None:
    """Free bytes in /dev/shm, where torch's shared tensors live on Linux; None where there is none (torch shares
    memory another way there)."""
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def local_world_size() -> int:
    """Processes of this job on this node (torchrun's LOCAL_WORLD_SIZE), each of which allocates the same."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def place(what: str, options: list[int], nbytes: Callable[[int], int]) -> int:
    """The largest of ``options`` (descending, ending with 0 = nothing shared) whose ``nbytes(option)`` per rank fits
    /dev/shm for every rank of the node, agreed by all ranks (the smallest choice wins). Warns once when it is not
    the first option."""
    free, ranks = shm_free(), local_world_size()
    local = next((o for o in options if free is None or nbytes(o) * ranks * 1.1 <= free), 0)
    chosen = distributed.all_min(local)
    if chosen != options[0] and distributed.rank() == 0:
        warnings.warn(
            f"{what} needs {nbytes(options[0]) / 2**20:,.0f} MiB of shared memory per process x {ranks} process(es) "
            f"on this node, and /dev/shm has {(free or 0) / 2**20:,.0f} MiB free (on this rank; all ranks agree on the "
            "most cautious choice); "
            + ("reading by chunks instead (slower when shuffled" if chosen == 0 else "using less of it (slower")
            + "; in Docker, raise --shm-size)",
            stacklevel=3,
        )
    return chosen


def allocate(what: str, make: Callable[[], T]) -> T | None:
    """``make()``, or None on every rank when it fails on any of them (an allocation that /dev/shm could not hold
    after all, e.g. another job took the space meanwhile): then all ranks fall back together."""
    try:
        made, error = make(), None
    except Exception as e:  # torch: "unable to allocate shared memory ..." (or mmap/ftruncate failures)
        made, error = None, e
    if distributed.all_min(0 if made is None else 1) == 1:  # every rank reaches this collective, whatever failed
        return made
    if error is not None and not isinstance(error, RuntimeError):
        raise error
    if distributed.rank() == 0 or error is not None:
        warnings.warn(f"{what}: shared memory could not be allocated ({error or 'on another rank'}); reading by "
                      "chunks instead on every rank", stacklevel=3)  # fmt: skip
    return None
