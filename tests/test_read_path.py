"""The read path at scale: the shared in-memory view, the chunk-aware shuffle, and the memory budget."""

import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader

import helpers
import logitcache as lc
from logitcache.read.sampler import ChunkShuffleSampler

SEED = 7  # the built_cache fixture's base seed; 240 samples, 3 views, chunks of 64 rows


@pytest.mark.parametrize("workers,prefetch", [(0, False), (2, False), (0, True), (2, True)])
def test_the_shared_view_serves_exactly_what_direct_reads_return(built_cache, tiny, workers, prefetch):
    ds = lc.CachedKDDataset(tiny, built_cache, prefetch=prefetch)
    assert ds.in_memory and ds.prefetches == prefetch
    cache = lc.open_cache(built_cache)
    order = torch.randperm(len(tiny), generator=torch.Generator().manual_seed(0)).tolist()
    loader = DataLoader(ds, batch_size=40, sampler=order, num_workers=workers, persistent_workers=workers > 0)
    for epoch in range(4):  # views 0, 1, 2, 0: refilled in place, seen by persistent workers
        ds.set_epoch(epoch)
        direct = cache.read(epoch % 3)
        got = [batch for batch in loader]
        for name in direct:
            assert torch.equal(torch.cat([t[name] for _, _, t in got]), direct[name][order]), (epoch, name)
        images = torch.cat([x for x, _, _ in got])
        assert torch.equal(
            images[5], lc.replay_view(helpers.heavy_augment(), tiny[order[5]][0], SEED, epoch % 3, order[5])
        )
    # each epoch read its view once, sequentially, in the main process (with prefetch: epoch 4's view as well, during
    # epoch 3); no worker decoded a chunk
    ds._views.join()
    assert int(ds.rows_read[0]) == (5 if prefetch else 4) * len(tiny) and int(ds.rows_read[1:].sum()) == 0


def test_prefetch_reads_the_next_view_during_the_epoch_and_never_serves_it_half_filled(built_cache, tiny):
    ds = lc.CachedKDDataset(tiny, built_cache)
    ds.set_epoch(0)
    ds._views.join()
    assert sorted(ds._views.holds.tolist()) == [0, 1]  # epoch 0's view, and epoch 1's read ahead
    reads = int(ds.rows_read[0])
    ds.set_epoch(1)  # served from the prefetched buffer: nothing read now but epoch 2's view, in the background
    ds._views.join()
    assert int(ds.rows_read[0]) == reads + len(tiny) and sorted(ds._views.holds.tolist()) == [1, 2]
    assert torch.equal(ds.cached_targets(list(range(240)), 1)["ids"], lc.open_cache(built_cache).read(1)["ids"])


def test_a_damaged_chunk_met_by_the_prefetch_stops_the_next_epoch(built_cache, tiny, tmp_path):
    import shutil

    from logitcache.store import DamagedCache

    store = tmp_path / "c"
    shutil.copytree(built_cache, store)
    next(p for p in (store / "logprobs" / "c" / "1").rglob("*") if p.is_file()).unlink()
    ds = lc.CachedKDDataset(tiny, store)
    ds.set_epoch(0)  # view 0 is intact; view 1's damage is met in the background and kept for epoch 1
    with pytest.raises(DamagedCache, match="view 1"):
        ds.set_epoch(1)


def test_without_set_epoch_the_chunk_path_serves_the_same_targets(built_cache, tiny):
    ds = lc.CachedKDDataset(tiny, built_cache)
    cache = lc.open_cache(built_cache)
    assert torch.equal(ds.cached_targets([5, 200, 3], 0)["logprobs"], cache.read(0)["logprobs"][[5, 200, 3]])
    assert int(ds.rows_read.sum()) == 64 + (240 - 3 * 64)  # chunk 0 (rows 0-63) and chunk 3 (rows 192-239)


def test_a_view_over_the_memory_budget_is_read_by_chunks(built_cache, tiny):
    ds = lc.CachedKDDataset(tiny, built_cache, memory_mb=0)
    assert not ds.in_memory
    ds.set_epoch(1)
    cache = lc.open_cache(built_cache)
    assert int(ds.rows_read.sum()) == 0  # nothing preloaded
    assert torch.equal(ds.cached_targets(list(range(240)), 1)["ids"], cache.read(1)["ids"])


def test_chunk_shuffle_order_is_a_function_of_seed_and_epoch_and_covers_every_sample_once():
    def order(epoch, rank=0, world=1, seed=3):
        s = ChunkShuffleSampler(1000, 64, window=3, num_replicas=world, rank=rank, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0) == order(0) and order(0) != order(1) and order(0) != order(0, seed=4)
    assert sorted(order(2)) == list(range(1000))
    shares = [order(5, r, 3) for r in range(3)]
    assert [len(s) for s in shares] == [333] * 3 and len(set().union(*shares)) == 999  # disjoint, one left out
    # chunk-aware: each window of 3 * 64 positions draws from at most window + 2 = 5 chunks (a rank's share need not
    # start on a chunk boundary, and the last chunk is short), not from ~all 16 as a full shuffle would
    for s in shares:
        for start in range(0, len(s), 3 * 64):
            assert len({i // 64 for i in s[start : start + 3 * 64]}) <= 5
    assert len({i // 64 for i in order(0)[:64]}) > 1  # and it is shuffled within the window


def test_chunk_shuffle_is_independent_of_the_number_of_workers(built_cache, tiny):
    ds = lc.CachedKDDataset(tiny, built_cache, memory_mb=0)
    seen = {}
    for workers in (0, 2):
        sampler = ChunkShuffleSampler(len(ds), 64, window=2, seed=1)
        sampler.set_epoch(3)
        ds.set_epoch(3)
        loader = DataLoader(ds, batch_size=16, sampler=sampler, num_workers=workers)
        seen[workers] = torch.cat([t["ids"] for _, _, t in loader]), torch.cat([x for x, _, _ in loader])
    assert torch.equal(seen[0][0], seen[2][0]) and torch.equal(seen[0][1], seen[2][1])


@pytest.mark.parametrize("workers", [0, 2])
def test_the_ring_reads_each_chunk_once_per_epoch_and_serves_what_direct_reads_return(built_cache, tiny, workers):
    # A view over the memory budget, iterated with the dataset's own chunk sampler: the main process reads each window
    # (here one 64-row chunk: 4 windows through a ring of 3 slots, so slots are reused) once, and the workers serve
    # from it. Read amplification 1.00 per epoch; no worker decodes a chunk; persistent workers across epochs.
    ds = lc.CachedKDDataset(tiny, built_cache, memory_mb=0)
    sampler = ds.chunk_sampler(window=1, seed=1)
    cache = lc.open_cache(built_cache)
    loader = DataLoader(ds, batch_size=24, sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
    for epoch in range(4):
        ds.set_epoch(epoch)  # sets the sampler's epoch too
        order = list(sampler)
        got = [batch for batch in loader]
        direct = cache.read(epoch % 3)
        for name in direct:
            assert torch.equal(torch.cat([t[name] for _, _, t in got]), direct[name][order]), (epoch, name)
        assert torch.equal(got[1][0][3], ds.image(order[27], epoch % 3)[0])  # the image the teacher labelled
    assert int(ds.rows_read[0]) == 4 * len(tiny) and int(ds.rows_read[1:].sum()) == 0


def test_the_ring_reuses_each_slot_many_times(tiny, tmp_path):
    # 15 windows of one 16-row chunk through 3 slots: each slot holds five windows in turn, and a slot is refilled
    # only once every row of the window it held has been served (3 epochs, 2 workers, batches across windows).
    out = tmp_path / "c"
    lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), views=1, seed=7, k=3,
                   batch_size=16, chunk_rows=16, workers=0, progress=False, encoding="topk")  # fmt: skip
    ds = lc.CachedKDDataset(tiny, out, augment=helpers.heavy_augment(), memory_mb=0)
    sampler = ds.chunk_sampler(window=1, seed=2)
    loader = DataLoader(ds, batch_size=10, sampler=sampler, num_workers=2, persistent_workers=True)
    direct = lc.open_cache(out).read(0)["ids"]
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert torch.equal(torch.cat([t["ids"] for _, _, t in loader]), direct[list(sampler)]), epoch
    assert int(ds.rows_read[0]) == 3 * len(tiny) and int(ds.rows_read[1:].sum()) == 0


def test_ring_ranks_read_their_share_once_and_together_serve_every_sample_once(built_cache, tiny):
    cache = lc.open_cache(built_cache)
    served = []
    for rank in range(2):
        ds = lc.CachedKDDataset(tiny, built_cache, memory_mb=0)
        sampler = ds.chunk_sampler(window=1, num_replicas=2, rank=rank, seed=3)
        ds.set_epoch(2)
        got = list(DataLoader(ds, batch_size=10, sampler=sampler, num_workers=0))
        order = list(sampler)
        assert torch.equal(torch.cat([t["ids"] for _, _, t in got]), cache.read(2)["ids"][order])
        # a rank reads whole chunks: its 120 rows and the rest of the chunk it shares with the other rank
        assert len(order) <= int(ds.rows_read.sum()) <= len(order) + 64
        served += order
        with pytest.raises(lc.LogitcacheError, match="not in this rank's share"):
            ds[next(i for i in range(len(tiny)) if i not in order)]
    assert sorted(served) == list(range(len(tiny)))


def test_the_ring_refuses_another_order_and_falls_back_after_an_epoch_left_midway(built_cache, tiny):
    ds = lc.CachedKDDataset(tiny, built_cache, memory_mb=0)
    sampler = ds.chunk_sampler(window=1, seed=1)
    ds._ring.stall_s = 0.5
    ds.set_epoch(0)
    backwards = list(sampler)[::-1]  # the last window first: its slot is still the first window's, never served
    deadline = time.monotonic() + 60  # the filler has filled the slots it can and waits for one to be served
    while not ds._ring.waiting[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(lc.LogitcacheError, match="out of the chunk-shuffle order"):
        list(DataLoader(ds, batch_size=16, sampler=backwards))
    # an epoch left midway (that one, then this one): the next one warns and reads by chunk, its targets right all the
    # same; the ring serves again after a complete epoch
    direct = lc.open_cache(built_cache).read
    loader = DataLoader(ds, batch_size=16, sampler=sampler)
    for epoch in (1, 2):
        with pytest.warns(UserWarning, match="left midway"):
            ds.set_epoch(epoch)
        assert not ds._ring.serves(epoch)
        if epoch == 1:
            next(iter(loader))
    assert torch.equal(torch.cat([t["ids"] for _, _, t in loader]), direct(2)["ids"][list(sampler)])
    ds.set_epoch(3)
    assert ds._ring.serves(3)
    assert torch.equal(torch.cat([t["ids"] for _, _, t in loader]), direct(0)["ids"][list(sampler)])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_chunk_met_by_the_ring_stops_the_epoch_with_its_message(built_cache, tiny, tmp_path, workers):
    import shutil

    store = tmp_path / "c"
    shutil.copytree(built_cache, store)
    next(p for p in (store / "ids" / "c" / "1").rglob("*") if p.is_file()).unlink()
    ds = lc.CachedKDDataset(tiny, store, memory_mb=0)
    sampler = ds.chunk_sampler(window=1)
    ds.set_epoch(1)
    batches = iter(DataLoader(ds, batch_size=16, sampler=sampler, num_workers=workers))
    with pytest.raises(Exception, match="view 1") as e:
        list(batches)
    assert "LogitcacheError" in str(e.value) or isinstance(e.value, lc.LogitcacheError)
    helpers.stop_workers(batches)
    with pytest.raises(lc.LogitcacheError, match="view 1"):
        ds.set_epoch(2)


def test_train_over_the_budget_uses_the_chunk_shuffle(built_cache, tmp_path):
    from conftest import HELPERS

    cfg = lc.TrainConfig(
        out=str(tmp_path / "r"), dataset=f"{HELPERS}:tiny_dataset", model="small-resnet8-w4", epochs=2,
        batch_size=32, workers=2, progress=False, kd="cached", cache=str(built_cache), target_memory_mb=0,
    )  # fmt: skip
    import sys
    import warnings

    train_mod, seen = sys.modules["logitcache.student.loop"], []
    setup = train_mod._setup

    def recorded(cfg):
        run = setup(cfg)
        seen.append((run.train_ds, run.train_ds.ring_serves))
        return run

    train_mod._setup = recorded
    try:
        with warnings.catch_warnings():  # the ring serves every epoch: none falls back to reading by chunk
            warnings.filterwarnings("error", message=".*left midway")
            result = lc.train(cfg)
    finally:
        train_mod._setup = setup
    assert result.metrics[-1]["train_loss"] > 0
    ((ds, ring),) = seen
    assert ring and not ds.in_memory  # the path claimed ...
    assert int(ds.rows_read[0]) == 2 * len(ds) and int(ds.rows_read[1:].sum()) == 0  # ... is the path taken
    import json

    assert json.loads((tmp_path / "r" / "config.json").read_text())["target_memory_mb"] == 0


def test_two_ranks_share_an_epoch_exactly_once():
    """Each rank's share is a pure function of (num_replicas, rank, seed, epoch): the two shares, drawn here as two
    ranks draw them, together serve every sample once but one (1001 samples: 500 per rank, the last left out)."""
    shares = []
    for rank in range(2):
        s = ChunkShuffleSampler(1001, 64, window=2, num_replicas=2, rank=rank, seed=9)
        s.set_epoch(4)
        shares.append(list(s))
    served = shares[0] + shares[1]
    assert len(shares[0]) == len(shares[1]) == 500 and len(set(served)) == 1000 and max(served) <= 1000


def test_too_little_shared_memory_falls_back_to_chunks_with_a_warning(built_cache, tiny, monkeypatch):
    import shutil

    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(64, 64, 0) if p == "/dev/shm" else real(p))
    with pytest.warns(UserWarning, match="shared memory"):
        ds = lc.CachedKDDataset(tiny, built_cache)
    assert not ds.in_memory
    ds.set_epoch(0)
    assert torch.equal(ds.cached_targets([1, 2], 0)["ids"], lc.open_cache(built_cache).read(0, 1, 3)["ids"])
