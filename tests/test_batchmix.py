"""Batch-level Mixup/CutMix with cached targets (logitcache.student.batchmix): the images, the labels and the teacher's
decoded distributions are mixed with one lambda and one pairing, and a collate function that mixes images and labels
without the targets is refused where the labels show it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate
from torchvision.transforms import v2

import helpers
import logitcache as lc
from logitcache.student.batchmix import BatchMix, BatchMixing, MixedKDLoss, check_mixing, mixed_kd_loss, mixed_probs
from logitcache.errors import LogitcacheError
from logitcache.augment.mix import Mix

C = helpers.NUM_CLASSES


@pytest.fixture(scope="module", params=[("full", {}), ("topk", {"k": 3}), ("topk8", {"k": 4})], ids=lambda p: p[0])
def cache(request, tmp_path_factory, tiny):
    encoding, options = request.param
    out = tmp_path_factory.mktemp(f"batchmix-{encoding}") / "c"
    lc.build_cache(
        helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), views=2, seed=5, encoding=encoding,
        batch_size=32, chunk_rows=64, workers=0, progress=False, **options,
    )  # fmt: skip
    return out


def _dataset(tiny, cache):
    return lc.CachedKDDataset(tiny, cache, augment=helpers.heavy_augment())


def _by_hand(logits, probs, perm, lam, temperature):
    """T^2 * mean_i KL(lam_i p_i + (1 - lam_i) p_perm(i) || softmax(s_i / T)), one sample at a time, in float64."""
    total = 0.0
    for i in range(len(logits)):
        p = lam[i].double() * probs[i].double() + (1 - lam[i].double()) * probs[perm[i]].double()
        log_q = torch.log_softmax(logits[i].double() / temperature, -1)
        total += float(sum(p[c] * (p[c].log() - log_q[c]) for c in range(len(p)) if p[c] > 0))
    return temperature**2 * total / len(logits)


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_the_mixed_loss_is_the_kl_against_the_mix_of_the_teachers_distributions(tiny, cache, mode):
    with _dataset(tiny, cache) as ds:
        ds.set_epoch(1)
        torch.manual_seed(0)
        mixer = BatchMix(num_classes=C, mode=mode)
        loader = DataLoader(ds, batch_size=16, sampler=ds.sampler(seed=1), collate_fn=mixer)
        images, labels, targets, mixing = next(iter(loader))
        assert isinstance(mixing, BatchMixing) and mixing.perm.dtype == torch.int64 and len(mixing) == 16
        assert sorted(mixing.perm.tolist()) == list(range(16))
        assert bool((mixing.lam < 1).any())
        logits = torch.randn(16, C, generator=torch.Generator().manual_seed(1)) * 3
        for temperature in (1.0, 2.0, 4.0):
            probs = lc.to_probs(targets, temperature, cache=ds)  # the unmixed teacher distributions
            expected = _by_hand(logits, probs, mixing.perm, mixing.lam, temperature)
            got = MixedKDLoss(ds, temperature)(logits, targets, mixing)
            assert float(got) == pytest.approx(expected, rel=1e-4, abs=1e-6)
            assert float(mixed_kd_loss(logits, targets, mixing, temperature, cache=ds)) == pytest.approx(expected, 1e-4)
            p = mixed_probs(targets, mixing, temperature, cache=ds)
            assert torch.allclose(p, mixing.lam[:, None] * probs + (1 - mixing.lam[:, None]) * probs[mixing.perm])
            assert torch.allclose(p.sum(1), torch.ones(16), atol=1e-5)
        # without mixing it is KDLoss itself
        kd = lc.KDLoss(ds, 2.0)(logits, targets)
        assert float(MixedKDLoss(ds, 2.0)(logits, targets)) == pytest.approx(float(kd), rel=1e-6)
        identity = BatchMixing.identity(16)
        assert float(MixedKDLoss(ds, 2.0)(logits, targets, identity)) == pytest.approx(float(kd), rel=1e-4, abs=1e-6)


def test_images_labels_and_targets_are_mixed_with_one_lambda_and_one_pairing(tiny, cache):
    with _dataset(tiny, cache) as ds:
        ds.set_epoch(0)
        samples = [ds[i] for i in range(12)]
        images, labels, targets = default_collate(samples)
        mixer = BatchMix(mixup_alpha=0.4, cutmix_alpha=0.0, mode="elem", num_classes=C, label_smoothing=0.1)
        torch.manual_seed(3)
        mixed, soft, same_targets, mixing = mixer(samples)
        lam, perm = mixing.lam, mixing.perm
        assert torch.allclose(mixed, lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * images[perm])
        smooth = F.one_hot(labels, C).float() * 0.9 + 0.01
        assert torch.allclose(soft, lam[:, None] * smooth + (1 - lam[:, None]) * smooth[perm])
        assert torch.allclose(soft.sum(1), torch.ones(12))
        for name in targets:  # the targets travel unmixed: the loss mixes them, with the same lam and perm
            assert torch.equal(same_targets[name], targets[name])
        # the same seed on the device path gives the same mixing
        torch.manual_seed(3)
        again, soft_again, mixing_again = mixer.apply(images, labels)
        assert torch.equal(again, mixed) and torch.equal(soft_again, soft)
        assert torch.equal(mixing_again.perm, perm) and torch.equal(mixing_again.lam, lam)


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_cutmix_pastes_the_partners_box_and_lambda_is_the_area_kept(mode):
    images = torch.rand(8, 3, 20, 24) + torch.arange(8.0)[:, None, None, None]  # every pixel tells its sample apart
    labels = torch.arange(8) % C
    torch.manual_seed(1)
    mixed, soft, mixing = BatchMix(mixup_alpha=0.0, cutmix_alpha=1.0, mode=mode, num_classes=C).apply(images, labels)
    lams = set()
    for i in range(8):
        j = int(mixing.perm[i])
        own = (mixed[i] == images[i]).all(0)
        theirs = (mixed[i] == images[j]).all(0)
        assert bool((own | theirs).all())  # every pixel is one of the two
        if j != i:
            assert float(theirs.float().mean()) == pytest.approx(1 - float(mixing.lam[i]), abs=1e-6)
            rows, cols = theirs.any(1).nonzero(), theirs.any(0).nonzero()
            if len(rows):  # one rectangle
                height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
                assert int(theirs.sum()) == height * width
        lams.add(round(float(mixing.lam[i]), 6))
        expected = mixing.lam[i] * F.one_hot(labels[i], C) + (1 - mixing.lam[i]) * F.one_hot(labels[j], C)
        assert torch.allclose(soft[i], expected.float())
    assert (len(lams) == 1) == (mode == "batch")


def test_no_mixing_when_prob_is_zero_and_soft_labels_are_mixed_as_they_are():
    images, labels = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    out, soft, mixing = BatchMix(prob=0.0, num_classes=C).apply(images, labels)
    assert torch.equal(out, images) and torch.equal(mixing.lam, torch.ones(6))
    assert torch.equal(soft, F.one_hot(labels, C).float())
    already = torch.softmax(torch.randn(6, C), 1)  # a dataset that mixes on its own: labels arrive soft
    torch.manual_seed(0)
    _, mixed, mixing = BatchMix(mixup_alpha=1.0, cutmix_alpha=0.0).apply(images, already)
    assert torch.allclose(mixed, mixing.lam[:, None] * already + (1 - mixing.lam[:, None]) * already[mixing.perm])


def test_batch_mixing_travels_through_workers_and_moves_with_to(tiny, cache):
    with _dataset(tiny, cache) as ds:
        ds.set_epoch(0)
        loader = DataLoader(ds, batch_size=20, sampler=ds.sampler(), num_workers=2, collate_fn=BatchMix(num_classes=C))
        batches = list(loader)
        assert len(batches) == len(ds) // 20
        for images, labels, targets, mixing in batches:
            assert images.shape[0] == labels.shape[0] == len(mixing) == 20 and labels.shape == (20, C)
            moved = mixing.to("cpu", non_blocking=True)
            assert torch.equal(moved.perm, mixing.perm) and torch.equal(moved.lam, mixing.lam)


def test_a_collate_that_mixes_images_and_labels_but_not_the_targets_is_refused(tiny, cache):
    cutmix_or_mixup = v2.RandomChoice([v2.CutMix(num_classes=C), v2.MixUp(num_classes=C)])

    def torchvision_collate(batch):
        return cutmix_or_mixup(*default_collate(batch))

    with _dataset(tiny, cache) as ds:
        ds.set_epoch(0)
        images, labels, targets = next(iter(DataLoader(ds, batch_size=8, collate_fn=torchvision_collate)))
        assert labels.shape == (8, C) and labels.is_floating_point()  # mixed labels, targets passed through
        logits = torch.randn(8, C)
        with pytest.raises(LogitcacheError, match="lc.BatchMix as the collate_fn") as e:
            check_mixing(ds, labels)
        assert "\n" not in str(e.value)
        with pytest.raises(LogitcacheError, match="labels arrive mixed"):
            MixedKDLoss(ds, 2.0)(logits, targets, labels=labels)
        with pytest.raises(LogitcacheError, match="labels arrive mixed"):
            check_mixing(ds.cache, labels)
        # what passes: integer labels (nothing to see), a batch mixer's pairing, a dataset that mixes on its own
        check_mixing(ds, torch.zeros(8, dtype=torch.int64))
        check_mixing(ds, labels, BatchMixing.identity(8))
        check_mixing(Mix("mixup"), labels)
        images, labels, targets, mixing = next(iter(DataLoader(ds, batch_size=8, collate_fn=BatchMix(num_classes=C))))
        MixedKDLoss(ds, 2.0)(logits, targets, mixing, labels=labels)


def test_mistakes_are_refused_in_one_line(tiny, cache):
    for kwargs, match in (
        ({"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, "one of them > 0"),
        ({"mixup_alpha": -1.0}, ">= 0"),
        ({"mode": "pair"}, "mode must be one of batch, elem"),
        ({"prob": 1.5}, "prob and switch_prob"),
        ({"num_classes": 0}, "num_classes must be >= 1"),
    ):
        with pytest.raises(LogitcacheError, match=match):
            BatchMix(**kwargs)
    with pytest.raises(LogitcacheError, match="needs num_classes="):
        BatchMix().apply(torch.rand(4, 1, 8, 8), torch.arange(4))
    with pytest.raises(LogitcacheError, match="float dtype"):
        BatchMix(cutmix_alpha=0.0, num_classes=C).apply(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4))
    cut = BatchMix(mixup_alpha=0.0, num_classes=C).apply(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4))
    assert cut[0].dtype == torch.uint8  # CutMix pastes pixels: any dtype
    with pytest.raises(LogitcacheError, match="4 images but 3 labels"):
        BatchMix(num_classes=C).apply(torch.rand(4, 1, 8, 8), torch.arange(3))
    with _dataset(tiny, cache) as ds:
        with pytest.raises(LogitcacheError, match="no dense form"):
            MixedKDLoss(ds, 2.0, tail="bucket")


@pytest.mark.gpu
def test_on_the_device_the_mixing_and_the_loss_match_the_host(tiny, cache):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with _dataset(tiny, cache) as ds:
        ds.set_epoch(0)
        images, labels, targets = next(iter(DataLoader(ds, batch_size=16)))
        logits = torch.randn(16, C)
        mixer = BatchMix(num_classes=C, mode="elem")
        torch.manual_seed(2)
        host = mixer.apply(images, labels)
        torch.manual_seed(2)
        dev = mixer.apply(images.cuda(), labels.cuda())
        assert dev[2].perm.is_cuda and dev[2].lam.is_cuda
        assert torch.allclose(dev[0].cpu(), host[0]) and torch.allclose(dev[1].cpu(), host[1])
        loss = MixedKDLoss(ds, 2.0).cuda()
        on_gpu = loss(logits.cuda(), {k: v.cuda() for k, v in targets.items()}, dev[2])
        assert float(on_gpu) == pytest.approx(float(MixedKDLoss(ds, 2.0)(logits, targets, host[2])), rel=1e-4)
