"""The promise across processes: whatever start method, read path and worker lifetime a loop uses, every served
(image, target) is the view the teacher labelled and the target it gave; ranks agree on shared memory; a refill
racing a copy is never served; background reads never overlap a fork; lifetimes end cleanly."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import helpers
import logitcache as lc
from conftest import HELPERS
from logitcache import specs
from logitcache.read import procs
from logitcache.errors import LogitcacheError
from logitcache.read.views import SharedViews

DATASET = f"{HELPERS}:tiny_dataset"
BATCH = 16
multiprocessing.get_context("forkserver").set_forkserver_preload(["logitcache"])  # as train does: fast workers


def _dataset(cache, path: str, **kw) -> tuple[lc.CachedKDDataset, torch.utils.data.Sampler]:
    base = specs.resolve_dataset(DATASET)  # a class from a path/file.py spec: it must reach spawned workers
    ds = lc.CachedKDDataset(base, cache, memory_mb=0 if path != "memory" else 4096, **kw)
    if path == "memory":
        assert ds.in_memory and ds.prefetches
        return ds, ds.sampler(seed=3)
    sampler = ds.chunk_sampler(window=1, seed=3, ring=path == "ring")
    assert ds.ring_serves == (path == "ring") and not ds.in_memory
    return ds, sampler


def _expected(cache: lc.Cache, view: int, indices: list[int]) -> dict[str, torch.Tensor]:
    rows = {}
    for i in indices:  # a direct read of the store, one sample at a time
        for name, t in cache.read(view, i, i + 1).items():
            rows.setdefault(name, []).append(t[0])
    return {name: torch.stack(ts) for name, ts in rows.items()}


# The fast loop keeps every read path under fork and worker lifetime, spawn with persistent workers on the two paths
# whose buffers travel to the workers (memory, ring), and forkserver on the chunk path; the full suite runs every cell.
FAST_LAYOUTS = {("fork", p, w) for p in ("memory", "ring", "chunk") for w in (True, False)} | {
    ("spawn", "memory", True), ("spawn", "ring", True), ("forkserver", "chunk", True)}  # fmt: skip
LAYOUTS = [
    pytest.param(m, p, w, marks=() if (m, p, w) in FAST_LAYOUTS else pytest.mark.smoke)
    for w in (True, False) for p in ("memory", "ring", "chunk") for m in ("fork", "spawn", "forkserver")
]  # fmt: skip


@pytest.mark.parametrize("method,path,persistent", LAYOUTS)
def test_every_start_method_serves_the_teachers_views_and_targets(built_cache, method, path, persistent):
    cache = lc.open_cache(built_cache)
    ds, sampler = _dataset(cache, path)
    # spawn without persistent workers starts each epoch's workers afresh (each a new interpreter importing torch):
    # one worker proves that a fresh worker serves its epoch's view; two workers splitting a batch stream under spawn
    # are the persistent cells' proof
    workers = 1 if method == "spawn" and not persistent else 2
    loader = DataLoader(
        ds, batch_size=BATCH, sampler=sampler, num_workers=workers, persistent_workers=persistent,
        multiprocessing_context=method, drop_last=False,
    )  # fmt: skip
    with ds:
        for epoch in range(2):
            ds.set_epoch(epoch)
            sampler.set_epoch(epoch)
            order, view = list(sampler), ds.view_of(epoch)
            for b, (images, labels, targets) in enumerate(loader):
                indices = order[b * BATCH : (b + 1) * BATCH]
                want = _expected(cache, view, indices)
                for name, t in want.items():
                    assert torch.equal(targets[name], t), (method, path, epoch, b, name)
                for row, i in enumerate(indices):
                    image, label = ds.image(i, view)
                    assert torch.equal(images[row], image) and int(labels[row]) == label
        workers_read = int(ds.rows_read[1:].sum())
        assert (workers_read > 0) == (path == "chunk"), "the read path claimed is not the one taken"
        if path == "ring":
            assert int(ds.rows_read[0]) >= len(ds)


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.smoke), "forkserver"])
def test_workers_that_wait_for_a_slow_ring_serve_its_windows(built_cache, method):
    """The filler slower than the workers (every window's read delayed past the workers' check that the training
    process is alive), so each worker waits on the ring; under forkserver that process is not a worker's parent."""
    cache = lc.open_cache(built_cache)
    read_chunks = cache.read_chunks

    def slow(view, chunks):
        time.sleep(0.4)
        return read_chunks(view, chunks)

    cache.read_chunks = slow
    ds, sampler = _dataset(cache, "ring")
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=2, persistent_workers=True,
                        multiprocessing_context=method)  # fmt: skip
    with ds:
        for epoch in range(2):
            ds.set_epoch(epoch)
            order, view = list(sampler), ds.view_of(epoch)
            for b, (_, _, targets) in enumerate(loader):
                want = _expected(cache, view, order[b * BATCH : (b + 1) * BATCH])
                assert all(torch.equal(targets[n], t) for n, t in want.items()), (method, epoch, b)


def test_a_refill_during_a_copy_is_never_served(built_cache, tiny):
    class Raced(SharedViews):
        """set_epoch refills the buffer while a worker is between its check and its copy (forced, not timed)."""

        race_to: int | None = None

        def _gather_rows(self, b, idx):
            if self.race_to is not None:
                view, self.race_to = self.race_to, None
                self.fill(b, view)
            return super()._gather_rows(b, idx)

    ds = lc.CachedKDDataset(tiny, built_cache, prefetch=False)
    assert ds.in_memory and not ds.prefetches
    ds._views.__class__ = Raced
    ds.set_epoch(0)
    indices = list(range(5, 40))
    raced_rows = ds.cached_targets(indices, 1)  # what the buffer holds after the refill: view 1's rows
    ds.set_epoch(0)
    ds._views.race_to = 1
    got = ds.cached_targets(indices, 0)
    want = _expected(ds.cache, 0, indices)
    assert any(not torch.equal(raced_rows[n], want[n]) for n in want)  # the race would have served other rows
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_a_fork_waits_for_background_reads_and_new_reads_wait_for_the_fork():
    entered, release, forked = threading.Event(), threading.Event(), []

    def reader():
        with procs.reading():
            entered.set()
            release.wait()

    def forker():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        forked.append(pid)
        os.waitpid(pid, 0)

    t = threading.Thread(target=reader)
    t.start()
    entered.wait()
    f = threading.Thread(target=forker)
    f.start()
    with procs._cond:
        while not procs._forking:  # the fork is held in its before-fork hook: the read is still going on
            procs._cond.wait(0.01)
    assert not forked
    release.set()
    t.join()
    f.join()
    assert forked and not procs._forking and not procs._inside


def _rank_main(rank: int, init: str, cache_path: str, out: str, failure: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        if rank == 1 and failure == "check":
            procs.shm_free = lambda: 0  # this rank's /dev/shm is full
        if rank == 1 and failure == "allocation":

            def fail(cache, count):
                raise RuntimeError("unable to allocate shared memory")

            SharedViews.allocate = staticmethod(fail)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            ds = lc.CachedKDDataset(specs.resolve_dataset(DATASET), cache_path)
        sampler = ds.sampler(num_replicas=2, rank=rank, seed=5)
        sampler.set_epoch(1)
        ds.set_epoch(1)
        loader = DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=0)
        served = sum(len(batch[0]) for batch in loader)
        torch.save(
            {"in_memory": ds.in_memory, "kind": type(sampler).__name__, "indices": list(sampler), "served": served},
            f"{out}/{rank}.pt",
        )
        ds.close()
    finally:
        dist.destroy_process_group()


# rank 1 cannot hold the view: its /dev/shm check fails, or (smoke: the same agreement, another cause) the allocation
@pytest.mark.parametrize("failure", ["check", pytest.param("allocation", marks=pytest.mark.smoke)])
def test_ranks_agree_on_shared_memory_and_split_the_epoch(built_cache, tmp_path, failure):
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(_rank_main, args=(init, str(built_cache), str(tmp_path), failure), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["in_memory"] is False and r1["in_memory"] is False  # rank 0 alone would have held the view
    assert r0["kind"] == r1["kind"] == "ChunkShuffleSampler"
    both = r0["indices"] + r1["indices"]
    n = lc.open_cache(built_cache).num_samples
    assert len(both) == len(set(both)) == n - n % 2  # every sample once across ranks
    assert r0["served"] == r1["served"] == n // 2


def test_close_stops_background_reads_and_train_closes_on_error(built_cache, tiny, tmp_path, monkeypatch):
    def ours():
        return [t for t in threading.enumerate() if t.name.startswith("logitcache-") and t.is_alive()]

    with lc.CachedKDDataset(tiny, built_cache) as ds:
        ds.set_epoch(0)  # the next view is being prefetched
    assert not ours() and not ds.in_memory
    with pytest.raises(LogitcacheError, match="closed"):
        ds.set_epoch(1)

    train_mod = sys.modules["logitcache.student.loop"]

    calls, alive = [], []

    def interrupted(*args, **kwargs):  # the first step: window 0 half served, the filler waits for its slot
        calls.append(1)
        if len(calls) == 1:
            alive.extend(ours())
            raise KeyboardInterrupt
        return lc.kd_loss(*args, **kwargs)

    monkeypatch.setattr(train_mod, "kd_loss", interrupted)
    cfg = lc.TrainConfig(
        out=str(tmp_path / "run"), dataset=DATASET, model="small-resnet8-w4", epochs=2, batch_size=32, kd="cached",
        cache=str(built_cache), workers=0, target_memory_mb=0, shuffle_window=1, progress=False,
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        lc.train(cfg)
    assert [t.name for t in alive] == ["logitcache-ring"]
    assert not ours()


def test_set_epoch_twice_is_harmless_and_ring_false_removes_the_ring(built_cache, tiny):
    ds = lc.CachedKDDataset(tiny, built_cache, memory_mb=0)
    sampler = ds.chunk_sampler(window=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.set_epoch(0)
        ds.set_epoch(0)
    order = list(sampler)
    got = ds._targets(order[:20], 0, None, served=True)
    for name, t in _expected(ds.cache, 0, order[:20]).items():
        assert torch.equal(got[name], t)
    assert int(ds.rows_read[0]) > 0  # the ring read them
    ds.chunk_sampler(window=1, ring=False)
    assert not ds.ring_serves
    ds.close()


def test_two_loaders_over_one_dataset_fail_clearly(built_cache, tiny):
    ds = lc.CachedKDDataset(tiny, built_cache, memory_mb=0)
    sampler = ds.chunk_sampler(window=2)
    ds.set_epoch(0)
    a = DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=1, persistent_workers=True,
                   multiprocessing_context="fork")  # fmt: skip
    b = DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=1, persistent_workers=True,
                   multiprocessing_context="fork")  # fmt: skip
    first = iter(a)
    next(first)  # a's worker holds worker slot 0 before b's starts
    second = iter(b)
    with pytest.raises(LogitcacheError, match="two DataLoaders"):
        next(second)
    helpers.stop_workers(first)
    helpers.stop_workers(second)
    ds.close()


def test_too_many_workers_is_a_clear_error(monkeypatch):
    from logitcache.read import ring

    monkeypatch.setattr(ring, "get_worker_info", lambda: type("Info", (), {"id": ring.MAX_WORKERS})())
    with pytest.raises(LogitcacheError, match=f"at most {ring.MAX_WORKERS} workers"):
        ring.process_slot()


def test_a_worker_waiting_on_the_ring_stops_when_its_parent_is_gone(built_cache, tiny, monkeypatch):
    from logitcache.read import ring as ring_mod

    ds = lc.CachedKDDataset(tiny, built_cache, memory_mb=0)
    ds.chunk_sampler(window=1)
    ring = ds._ring
    ring.epoch[0], ring.active[0] = 0, 1  # epoch 0 served, nothing filled yet: a worker would wait
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ring.owner = gone.pid  # as if the training process had died (exited and reaped)
    monkeypatch.setattr(ring_mod, "get_worker_info", lambda: type("Info", (), {"id": 0})())
    with pytest.raises(LogitcacheError, match="has exited"):
        ring._wait_for(0, ring._key(0, 0), 0, 0)
    ds.close()


def test_a_stall_names_the_store_the_window_and_the_wait(built_cache, tiny):
    ds = lc.CachedKDDataset(tiny, built_cache, memory_mb=0)
    ds.chunk_sampler(window=1, stall_s=0.2)
    ring = ds._ring
    ring.epoch[0], ring.active[0] = 0, 1  # the filler is not running: nothing moves, and it is not waiting for us
    with pytest.raises(LogitcacheError, match=r"window 1 of epoch 0 of .*nothing moved for 0.2 s.*stall_s"):
        ring._wait_for(1, ring._key(0, 1), 0, 1)
    ds.close()
