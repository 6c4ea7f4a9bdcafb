import random

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

import helpers
from logitcache.teacher.build import ReplayedViews
from logitcache.augment.fingerprint import fingerprint_mismatch, replay_fingerprint
from logitcache.augment.seeds import replay_view, sample_seed


def _load(ds, workers, shuffle):
    g = torch.Generator().manual_seed(123)
    indices = list(RandomSampler(range(len(ds)), generator=g)) if shuffle else list(range(len(ds)))
    loader = DataLoader(ds, batch_size=None, sampler=indices, num_workers=workers)
    return {i: x for i, x in zip(indices, loader)}


def test_replay_is_identical_across_workers_and_order(tiny):
    ds = ReplayedViews(helpers.TinyImages(60), helpers.heavy_augment(), seed=3)
    a = _load(ds, 0, shuffle=False)
    b = _load(ds, 2, shuffle=True)
    assert a.keys() == b.keys()
    for i in a:
        assert torch.equal(a[i], b[i]), i


def test_views_differ_and_seeds_are_distinct(tiny):
    tf = helpers.heavy_augment()
    x0 = replay_view(tf, tiny[5][0], 0, 0, 5)
    x1 = replay_view(tf, tiny[5][0], 0, 1, 5)
    assert not torch.equal(x0, x1)
    seeds = {sample_seed(s, v, i) for s in range(3) for v in range(4) for i in range(500)}
    assert len(seeds) == 3 * 4 * 500
    assert all(0 <= s < 2**63 for s in seeds)


def test_caller_rng_is_untouched(tiny):
    tf = helpers.heavy_augment()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    replay_view(tf, tiny[0][0], 0, 0, 0)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1] and expected[2] == got[2]


def test_python_and_numpy_randomness_is_replayed(tiny):
    tf = helpers._PythonAndNumpyNoise()
    x = torch.zeros(1, 2, 2)
    assert torch.equal(replay_view(tf, x, 0, 0, 9), replay_view(tf, x, 0, 0, 9))
    assert not torch.equal(replay_view(tf, x, 0, 0, 9), replay_view(tf, x, 0, 0, 10))


def test_fingerprint_detects_another_augmentation(tiny):
    rec = replay_fingerprint(helpers.heavy_augment(), tiny, 0, 2)
    assert fingerprint_mismatch(rec, replay_fingerprint(helpers.heavy_augment(), tiny, 0, 2)) is None
    assert fingerprint_mismatch(rec, replay_fingerprint(helpers.other_augment(), tiny, 0, 2)) is not None
    assert fingerprint_mismatch(rec, replay_fingerprint(helpers.heavy_augment(), tiny, 1, 2)) is not None


def test_presets_keep_the_channel_count_and_size():
    from PIL import Image

    from logitcache import specs

    gray = helpers.tiny_dataset()  # 1-channel 16x16
    rgb = [(Image.fromarray(np.full((20, 24, 3), 100, np.uint8)), 0)]
    for spec in ("pad-crop-flip", "rrc-flip", "none"):
        for ds, channels, size in ((gray, 1, 16), (rgb, 3, 20)):
            train, evaluation = specs.resolve_augment(spec, ds)
            for tf in (train, evaluation):
                out = replay_view(tf, ds[0][0], 0, 0, 0)
                assert out.shape[0] == channels, (spec, channels)
                assert out.dtype == torch.float32 and min(out.shape[-2:]) == size
