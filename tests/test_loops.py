"""The loops users write: every augmentation that differs from the cache's is refused with what differs; the wrapper
takes a dataset as it comes (its attributes, its own transform); the slow or wrong loops warn once."""

from __future__ import annotations

import sys
import warnings

import helpers
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import logitcache as lc
from logitcache.errors import LogitcacheError
from logitcache.augment.fingerprint import fingerprint_mismatch, replay_fingerprint

BUILD = dict(views=2, seed=3, batch_size=48, chunk_rows=16, workers=0, progress=False)


class Speckle:
    """A user's own transform: noise of a set amount, drawn from torch's generator (so it replays)."""

    def __init__(self, amount: float):
        self.amount = amount

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.amount * torch.rand_like(x)


def pipeline(*extra, size=16, brightness=0.4, magnitude=9, amount=0.05) -> v2.Compose:
    """Crop, flip, colour jitter, RandAugment and a user transform: each test changes one thing."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomCrop(size, padding=2),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=brightness),
            v2.RandAugment(magnitude=magnitude),
            v2.ToDtype(torch.float32, scale=True),
            Speckle(amount),
            *extra,
        ]
    )


def flip_crop(*extra) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.RandomCrop(16, padding=2), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True), *extra])  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("loops") / "c"
    lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=pipeline(), **BUILD)
    return out


@pytest.fixture(scope="module")
def light(tmp_path_factory, tiny):
    """A cache of cheap views, for the tests that iterate epochs."""
    out = tmp_path_factory.mktemp("loops") / "light"
    lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=flip_crop(), **BUILD)
    return out


def test_the_same_pipeline_built_again_is_accepted(cache, tiny):
    with lc.CachedKDDataset(tiny, cache, augment=pipeline()) as ds:
        assert ds[5][0].shape == (1, 16, 16)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.25])
def test_random_erasing_added_is_refused_and_named(cache, tiny, p):
    with pytest.raises(LogitcacheError, match=rf"RandomErasing\(p={p}\) added at transforms\[7\]"):
        lc.CachedKDDataset(tiny, cache, augment=pipeline(v2.RandomErasing(p=p)))


@pytest.mark.parametrize(
    "changed, named",
    [
        (dict(brightness=0.2), r"ColorJitter\.brightness \[0\.6, 1\.4\] -> \[0\.8, 1\.2\] at transforms\[3\]"),
        (dict(magnitude=5), r"RandAugment\.magnitude 9 -> 5 at transforms\[4\]"),
        (dict(size=12), r"RandomCrop\.size \[16, 16\] -> \[12, 12\] at transforms\[1\]"),
        (dict(amount=0.1), r"Speckle\.amount 0\.05 -> 0\.1 at transforms\[6\]"),
    ],
    ids=["colorjitter-strength", "randaugment-magnitude", "crop-size", "user-class-attribute"],
)
def test_a_changed_parameter_is_refused_and_named(cache, tiny, changed, named):
    with pytest.raises(LogitcacheError, match=named) as e:
        lc.CachedKDDataset(tiny, cache, augment=pipeline(**changed))
    assert "\n" not in str(e.value)


def test_a_resume_with_another_augmentation_is_refused_and_named(cache, tmp_path, tiny):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(cache, out)
    with pytest.raises(LogitcacheError, match=r"RandomErasing\(p=0\.05\) added"):
        lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=pipeline(v2.RandomErasing(p=0.05)), resume=True,
                       **BUILD)  # fmt: skip


def test_the_pixel_check_sees_a_transform_that_fires_on_5_percent_of_views(tiny):
    recorded = replay_fingerprint(flip_crop(), tiny, 3, 2)
    assert fingerprint_mismatch(recorded, replay_fingerprint(flip_crop(), tiny, 3, 2)) is None
    rare = replay_fingerprint(flip_crop(v2.RandomErasing(p=0.05)), tiny, 3, 2)
    assert fingerprint_mismatch(recorded, rare) is not None


def test_a_store_without_a_recorded_structure_is_compared_by_pixels_as_before(cache, tmp_path, tiny):
    # A store written before the structure was recorded: 4 thumbnails, no structure. The same pipeline still opens;
    # another crop is refused by its pixels.
    import shutil

    import zarr

    from logitcache.store.meta import DIGEST_KEY, json_digest

    out = tmp_path / "old"
    shutil.copytree(cache, out)
    group = zarr.open_group(str(out), mode="r+")
    meta = dict(group.attrs["logitcache"])
    meta["augment"] = {k: v for k, v in meta["augment"].items() if k != "structure"}
    meta["augment"]["fingerprint"] = meta["augment"]["fingerprint"][:4]
    meta[DIGEST_KEY] = json_digest(meta)
    group.attrs["logitcache"] = meta
    assert lc.open_cache(out).meta.augment.structure is None
    lc.CachedKDDataset(tiny, out, augment=pipeline()).close()
    with pytest.raises(LogitcacheError, match="does not replay the views"):
        lc.CachedKDDataset(tiny, out, augment=pipeline(size=12))


# -- the dataset on its own terms ------------------------------------------------------------------------------------


class Folder(helpers.TinyImages):
    """An ImageFolder-like dataset: classes, class_to_idx, targets, and its own training transform."""

    def __init__(self, transform=None):
        super().__init__(240, seed=0)
        self.classes = [f"band{i}" for i in range(helpers.NUM_CLASSES)]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform

    def __getitem__(self, i: int):
        image, label = super().__getitem__(i)
        return (self.transform(image) if self.transform is not None else image), label


def test_the_dataset_is_wrapped_as_it_is_with_its_attributes_and_its_own_transform(tmp_path):
    train_set = Folder(transform=flip_crop())
    own = train_set.transform
    lc.build_cache(helpers.tiny_teacher(), train_set, tmp_path / "c", **BUILD)  # augment: the dataset's transform
    assert train_set.transform is own  # the user's dataset is left as it is
    with lc.CachedKDDataset(train_set, tmp_path / "c") as ds:  # the cache records no spec: the dataset's transform
        assert ds.augment is own and train_set.transform is own
        assert ds.classes == train_set.classes and ds.class_to_idx == train_set.class_to_idx
        assert np.array_equal(ds.targets, train_set.targets)
        raw = helpers.TinyImages(240, seed=0)[7][0]
        ds.set_epoch(1)
        assert torch.equal(ds[7][0], lc.replay_view(own, raw, 3, 1, 7))  # transformed once, as the teacher saw it
        assert set(ds.cached_targets([7], 1)) == set(ds[7][2])
        with pytest.raises(AttributeError, match="nor has its dataset"):
            ds.no_such_attribute
    with lc.CachedKDDataset(train_set, tmp_path / "c", augment=own) as ds:  # passing it explicitly: the same
        assert torch.equal(ds[7][0], lc.replay_view(own, raw, 3, 0, 7))
    replayed = lc.ReplayDataset(train_set, seed=3, num_views=2)
    assert replayed.classes == train_set.classes
    assert torch.equal(replayed[7][0], lc.replay_view(own, raw, 3, 0, 7))


def test_a_subset_of_a_dataset_with_a_transform_replays_that_transform_once(tmp_path):
    # a train/val split: the Subset has no transform of its own; the one of the dataset it selects from is replayed
    full = Folder(transform=flip_crop())
    own, split = full.transform, torch.utils.data.Subset(full, list(range(40, 200)))
    lc.build_cache(helpers.tiny_teacher(), split, tmp_path / "c", **BUILD)
    raw = helpers.TinyImages(240, seed=0)[split.indices[7]][0]  # sample 7 of the split, untransformed
    with lc.CachedKDDataset(split, tmp_path / "c") as ds:
        assert ds.augment is own and len(ds) == 160
        ds.set_epoch(1)
        assert torch.equal(ds[7][0], lc.replay_view(own, raw, 3, 1, 7))  # transformed once, as the teacher saw it
        assert int(ds[7][1]) == full[split.indices[7]][1]
    with lc.CachedKDDataset(split, tmp_path / "c", augment=own) as ds:  # passing it explicitly: the same
        assert torch.equal(ds[7][0], lc.replay_view(own, raw, 3, 0, 7))
    # a split of a split (nested Subsets) reaches the same transform and the same views
    nested = torch.utils.data.Subset(torch.utils.data.Subset(full, list(range(20, 220))), list(range(20, 180)))
    with lc.CachedKDDataset(nested, tmp_path / "c") as ds:
        assert ds.augment is own and torch.equal(ds[7][0], lc.replay_view(own, raw, 3, 0, 7))
    assert full.transform is own and split.dataset is full  # the user's datasets are left as they are
    with pytest.raises(LogitcacheError, match="as augment="):  # a split of a dataset without a transform
        lc.CachedKDDataset(torch.utils.data.Subset(Folder(), list(range(40, 200))), tmp_path / "c")


def test_a_dataset_with_another_transform_is_refused_with_what_differs(cache):
    # the cache of the same images, built from Python with pipeline(): no spec recorded, the dataset's transform taken
    with pytest.raises(LogitcacheError, match=r"RandAugment\.magnitude 9 -> 5"):
        lc.CachedKDDataset(Folder(transform=pipeline(magnitude=5)), cache)
    with pytest.raises(LogitcacheError, match="as augment="):  # neither a recorded spec nor a transform
        lc.CachedKDDataset(Folder(), cache)


# -- warnings where a loop is slow or wrong --------------------------------------------------------------------------


def _caught(fn, pattern: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if pattern in str(w.message)]


def test_another_sampler_on_the_chunk_path_warns_once_with_the_amplification_and_the_fix(light, tiny):
    # One view over memory_mb, a chunk cache of one chunk: a shuffled order decodes a 16-row chunk for nearly every
    # sample; the dataset's own sampler reads each chunk once per epoch and does not warn.
    ds = lc.CachedKDDataset(tiny, light, augment=flip_crop(), memory_mb=0, max_cache_mb=1e-6)
    loader = DataLoader(ds, batch_size=16, shuffle=True, num_workers=0)

    def epochs(ds=ds, loader=loader, count=2):
        for epoch in range(count):
            ds.set_epoch(epoch)
            for _ in loader:
                pass

    slow = _caught(epochs, "chunk by chunk")
    assert len(slow) == 1
    assert "rows decoded per row served" in str(slow[0].message) and "ds.sampler()" in str(slow[0].message)
    ds.close()
    ds = lc.CachedKDDataset(tiny, light, augment=flip_crop(), memory_mb=0, max_cache_mb=1e-6)
    loader = DataLoader(ds, batch_size=16, sampler=ds.sampler(), num_workers=0)
    assert _caught(lambda: epochs(ds, loader, 1), "chunk by chunk") == []
    ds.close()


def test_a_second_pass_without_set_epoch_warns_once(light, tiny):
    with lc.CachedKDDataset(tiny, light, augment=flip_crop()) as ds:
        loader = DataLoader(ds, batch_size=32, sampler=ds.sampler(), num_workers=0)

        def epochs(set_epoch: bool, count: int = 2):
            for epoch in range(count):
                if set_epoch:
                    ds.set_epoch(epoch)
                for _ in loader:
                    pass

        assert _caught(lambda: epochs(True), "set_epoch") == []
        missed = _caught(lambda: epochs(False), "set_epoch")  # a second pass, and a third
        assert len(missed) == 1 and "second pass" in str(missed[0].message)
    replayed = lc.ReplayDataset(tiny, flip_crop(), num_views=2)
    assert len(_caught(lambda: [replayed[i % len(tiny)] for i in range(2 * len(tiny) + 40)], "set_epoch")) == 1


def _print_warnings(worker_id: int) -> None:
    # A forked worker inherits pytest's recording of warnings into the parent's list; print them, as Python does
    # outside pytest, so that the test reads what a user sees on the terminal.
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: print(
        warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end=""
    )


def test_a_second_pass_without_set_epoch_warns_once_from_workers(light, tiny, capfd):
    ds = lc.CachedKDDataset(tiny, light, augment=flip_crop())
    loader = DataLoader(ds, batch_size=32, sampler=ds.sampler(), num_workers=2, multiprocessing_context="fork",
                        persistent_workers=True, worker_init_fn=_print_warnings)  # fmt: skip
    ds.set_epoch(0)
    for _ in range(3):  # three passes, one set_epoch
        for _ in loader:
            pass
    del loader  # its persistent workers end
    ds.close()
    assert capfd.readouterr().err.count("a second pass over the data without set_epoch") == 1
