import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import helpers
import logitcache as lc
from logitcache.errors import LogitcacheError

SEED = 7  # the built_cache fixture's base seed


def _expected_image(tiny, epoch, index, num_views=3):
    return lc.replay_view(helpers.heavy_augment(), tiny[index][0], SEED, epoch % num_views, index)


def test_getitem_returns_the_replayed_view_and_its_target(built_cache, tiny):
    ds = lc.CachedKDDataset(tiny, built_cache)  # augmentation resolved from the spec recorded in the cache
    cache = lc.open_cache(built_cache)
    for epoch, index in [(0, 0), (1, 5), (2, 239), (3, 64), (7, 100)]:
        ds.set_epoch(epoch)
        image, label, target = ds[index]
        assert torch.equal(image, _expected_image(tiny, epoch, index))
        assert label == tiny[index][1]
        stored = cache.read(epoch % 3, index, index + 1)
        for name in ("logprobs", "ids", "tail"):
            assert torch.equal(target[name], stored[name][0])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_with_persistent_workers_sees_every_epoch(built_cache, tiny, workers):
    ds = lc.CachedKDDataset(tiny, built_cache)
    loader = DataLoader(ds, batch_size=40, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    teacher = helpers.tiny_teacher()
    for epoch in range(4):
        ds.set_epoch(epoch)
        seen = 0
        for images, labels, targets in loader:
            # find each image's index through its label-independent replay: compare with the expected view
            with torch.no_grad():
                logp = torch.log_softmax(teacher(images), 1)
            top, ids = logp.topk(3, dim=1)
            # the teacher on the wrapper's image reproduces the stored target: ids equal, values within fp16
            assert torch.equal(ids, targets["ids"].long())
            assert torch.allclose(top, targets["logprobs"].float(), atol=1e-2)
            assert torch.allclose(lc.to_probs(targets, cache=ds).sum(1), torch.ones(len(images)), atol=1e-4)
            seen += len(images)
        assert seen == len(tiny)


def test_distributed_sampler_replays_the_same_views(built_cache, tiny):
    ds = lc.CachedKDDataset(tiny, built_cache)
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3)
    loader = DataLoader(ds, batch_size=None, sampler=sampler, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        ds.set_epoch(epoch), sampler.set_epoch(epoch)
        indices = list(sampler)
        for index, (image, label, target) in zip(indices, loader):
            assert torch.equal(image, _expected_image(tiny, epoch, index))


def test_mismatched_dataset_is_refused(built_cache, tiny):
    with pytest.raises(LogitcacheError, match="samples but the cache"):
        lc.CachedKDDataset(helpers.TinyImages(100), built_cache)
    with pytest.raises(LogitcacheError, match="labels differ"):
        lc.CachedKDDataset(helpers.TinyImages(240, seed=5), built_cache)
    shuffled = helpers.tiny_dataset()
    perm = list(range(1, 240)) + [0]
    shuffled.images = [shuffled.images[i] for i in perm]
    shuffled.targets = shuffled.targets[perm]
    with pytest.raises(LogitcacheError, match="differ"):
        lc.CachedKDDataset(shuffled, built_cache)


def test_mismatched_augmentation_is_refused(built_cache, tiny):
    with pytest.raises(LogitcacheError, match="does not replay the views"):
        lc.CachedKDDataset(tiny, built_cache, augment=helpers.other_augment())
    with pytest.warns(UserWarning, match="allow_mismatch"):
        lc.CachedKDDataset(tiny, built_cache, augment=helpers.other_augment(), allow_mismatch=True)


def test_chunks_are_read_whole(built_cache, tiny, monkeypatch):
    ds = lc.CachedKDDataset(tiny, built_cache, augment=helpers.heavy_augment())
    reads = []
    original = ds.cache.read_chunk  # the one primitive every target read goes through (and checks)
    monkeypatch.setattr(ds.cache, "read_chunk", lambda v, c: reads.append((v, c)) or original(v, c))
    for i in range(240):
        ds.target(i, 1)
    assert reads == [(1, 0), (1, 1), (1, 2), (1, 3)]  # each chunk once, whole


def test_batched_fetch_equals_per_sample_fetch(built_cache, tiny):
    # The DataLoader calls __getitems__ with a whole batch; it must give exactly what __getitem__ gives per sample,
    # for batches inside one chunk and across all four.
    ds = lc.CachedKDDataset(tiny, built_cache)
    ds.set_epoch(4)
    order = torch.randperm(240, generator=torch.Generator().manual_seed(0)).tolist()
    for batch in (order[:50], list(range(70, 90)), [239, 0, 64, 63, 128, 0], [5]):
        fetched = ds.__getitems__(batch)
        assert len(fetched) == len(batch)
        for index, (image, label, target) in zip(batch, fetched):
            ref_image, ref_label, ref_target = ds[index]
            assert torch.equal(image, ref_image) and label == ref_label
            assert target.keys() == ref_target.keys()
            for name in target:
                assert torch.equal(target[name], ref_target[name]), (index, name)
    loader = DataLoader(ds, batch_size=32, sampler=order, num_workers=0)
    images, labels, targets = next(iter(loader))
    assert torch.equal(images, torch.stack([_expected_image(tiny, 4, i) for i in order[:32]]))
    assert torch.equal(targets["ids"], lc.open_cache(built_cache).read(4 % 3)["ids"][order[:32]])


def test_target_rows_collate_whole_batches_and_any_mix(built_cache, tiny):
    from torch.utils.data import default_collate

    ds = lc.CachedKDDataset(tiny, built_cache)
    ds.set_epoch(2)
    first, second = ds.__getitems__([3, 70, 200, 9]), ds.__getitems__([100, 5])
    stored = lc.open_cache(built_cache).read(2)
    cases = [(first, [3, 70, 200, 9]), (first[::-1], [9, 200, 70, 3]), (first[1:3], [70, 200])]
    cases.append((first[:2] + second, [3, 70, 100, 5]))
    for samples, indices in cases:
        images, labels, targets = default_collate(samples)
        assert labels.tolist() == [int(tiny.targets[i]) for i in indices]
        assert set(targets) == {"ids", "logprobs", "tail", "tail_soft"}
        for name, value in targets.items():
            assert torch.equal(value, stored[name][indices]), name
        assert dict(samples[0][2]).keys() == targets.keys()  # a row reads like a dict
        assert all(type(label) is not int and isinstance(label, int) for _, label, _ in samples)  # an int, and more
    # a whole batch: the labels are a view of the targets' buffer (one shared-memory segment from a worker, not two)
    images, labels, targets = default_collate(first)
    assert labels.untyped_storage().data_ptr() == targets["ids"].untyped_storage().data_ptr()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loaders_batch_carries_labels_and_targets_in_one_storage(built_cache, tiny, workers):
    ds = lc.CachedKDDataset(tiny, built_cache)
    ds.set_epoch(0)
    order = list(range(239, -1, -1))
    loader = DataLoader(ds, batch_size=40, sampler=order, num_workers=workers)
    for b, (images, labels, targets) in enumerate(loader):
        rows = order[40 * b : 40 * b + 40]
        assert labels.dtype == torch.int64 and labels.tolist() == [int(tiny.targets[i]) for i in rows]
        assert labels.untyped_storage().data_ptr() == targets["logprobs"].untyped_storage().data_ptr()
        assert torch.equal(targets["logprobs"], lc.open_cache(built_cache).read(0)["logprobs"][rows])


def test_a_users_own_collate_fn_still_works(built_cache, tiny):
    # logitcache registers TargetRow in torch's default_collate_fn_map on import; that must change nothing for other
    # types, nor stop a user's own collate_fn from seeing (and batching) the targets however it likes.
    from torch.utils.data import default_collate

    plain = [(torch.full((2,), float(i)), i, {"w": torch.tensor(i)}) for i in range(3)]
    x, y, extra = default_collate(plain)
    assert torch.equal(x[:, 0], torch.tensor([0.0, 1.0, 2.0])) and y.tolist() == [0, 1, 2]
    assert torch.equal(extra["w"], torch.tensor([0, 1, 2]))

    def user_collate(samples):
        images = torch.stack([s[0] for s in samples])
        ids = torch.stack([torch.as_tensor(s[2]["ids"]) for s in samples])  # a row reads like a dict
        return images, ids, len(samples)

    ds = lc.CachedKDDataset(tiny, built_cache)
    ds.set_epoch(1)
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=16, num_workers=workers, collate_fn=user_collate)
        images, ids, n = next(iter(loader))
        assert n == 16 and images.shape[0] == 16
        assert torch.equal(ids, lc.open_cache(built_cache).read(1, 0, 16)["ids"])
