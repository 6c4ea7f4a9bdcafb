"""Mixup/CutMix with cached targets: the student sees the mixed image the teacher labelled."""

import math
import statistics

import pytest
import torch
from torch.utils.data import DataLoader
from typer.testing import CliRunner

import helpers
import logitcache as lc
from logitcache.cli import app
from conftest import HELPERS
from logitcache.errors import LogitcacheError
from logitcache.augment.mix import Mix, draw, mixed_view

BOTH = Mix("both", alpha=0.8, cutmix_alpha=1.0, prob=0.9, switch_prob=0.5)


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("mixed") / "c"
    lc.build_cache(
        helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), views=2, seed=3, encoding="full",
        batch_size=32, chunk_rows=64, workers=0, progress=False, mix=BOTH,
        specs={"augment": f"{HELPERS}:heavy_augment", "dataset": f"{HELPERS}:tiny_dataset"},
    )  # fmt: skip
    return out


def test_the_teacher_on_the_wrappers_mixed_image_gives_the_cached_target(mixed_cache, tiny):
    ds = lc.CachedKDDataset(tiny, mixed_cache)
    assert ds.mix == BOTH  # the cache's mixing by default
    teacher = helpers.tiny_teacher()
    g = torch.Generator().manual_seed(0)
    kinds = set()
    for _ in range(24):
        view, index = int(torch.randint(2, (1,), generator=g)), int(torch.randint(240, (1,), generator=g))
        image, label, target = ds.image(index, view) + (ds.target(index, view),)
        d = draw(BOTH, 3, view, index, 240, 16, 16)
        kinds.add("cutmix" if d.box else "mixup" if d.lam < 1 else "none")
        with torch.no_grad():
            fresh = teacher(image[None])[0]
        assert torch.allclose(target["logits"].float(), fresh, atol=2e-2), (view, index)
        # the label is the mixed one
        assert math.isclose(float(label.sum()), 1.0, rel_tol=1e-6)
        assert math.isclose(
            float(label[int(tiny.targets[index])]),
            d.lam + (1 - d.lam) * (int(tiny.targets[d.partner]) == int(tiny.targets[index])),
            abs_tol=1e-6,
        )  # noqa: E501
    assert kinds == {"cutmix", "mixup", "none"}  # every branch was exercised


def test_mixed_replay_is_the_same_with_0_and_2_workers_and_any_shuffle(mixed_cache, tiny):
    ds = lc.CachedKDDataset(tiny, mixed_cache)
    ds.set_epoch(1)
    seen = {}
    for workers, seed in ((0, 1), (2, 2)):
        order = torch.randperm(240, generator=torch.Generator().manual_seed(seed)).tolist()
        loader = DataLoader(ds, batch_size=32, sampler=order, num_workers=workers)
        images, labels = torch.cat([b[0] for b in loader]), torch.cat([b[1] for b in loader])
        back = torch.empty_like(images)
        back[order], labels_back = images, torch.empty_like(labels)
        labels_back[order] = labels
        seen[workers] = back, labels_back
    assert torch.equal(seen[0][0], seen[2][0]) and torch.equal(seen[0][1], seen[2][1])
    assert torch.equal(seen[0][0][7], mixed_view(helpers.heavy_augment(), tiny, 3, 1, 7, BOTH)[0])


def test_partners_lambdas_and_switches_have_the_intended_distribution():
    # 20,000 draws; tolerances are > 5 standard errors of each statistic
    n, draws = 1000, [draw(BOTH, 0, 0, i, 1000, 32, 32) for i in range(20000)]
    mixed = [d for d in draws if d.lam < 1 or d.box]
    assert abs(len(mixed) / len(draws) - 0.9) < 0.011  # prob 0.9 (a box of area 0 is vanishingly rare)
    cut = [d for d in mixed if d.box]
    assert abs(len(cut) / len(mixed) - 0.5) < 0.02  # switch_prob 0.5
    lams = [d.lam for d in mixed if not d.box]  # Beta(0.8, 0.8): mean 1/2, variance 1 / (4 (2a + 1)) = 0.0962
    assert abs(statistics.mean(lams) - 0.5) < 0.015 and abs(statistics.pvariance(lams) - 0.0962) < 0.01
    # CutMix: lam is exactly the kept area, and its mean is timm's: Beta(1, 1) gives 1/2 before the box is clipped
    # at the borders, clipping keeps more. The expectation, computed over lam and every centre of a 32 x 32 image:
    for d in cut:
        y0, y1, x0, x1 = d.box
        assert 0 <= y0 <= y1 <= 32 and 0 <= x0 <= x1 <= 32 and d.lam == 1 - (y1 - y0) * (x1 - x0) / 1024
    import numpy as np

    lam = (np.arange(2000) + 0.5) / 2000
    side = (32 * np.sqrt(1 - lam)).astype(int)[:, None]
    c = np.arange(32)[None, :]
    extent = np.clip(c + side // 2, 0, 32) - np.clip(c - side // 2, 0, 32)  # [lam, centre] along one axis
    expected = 1 - float((extent.mean(1) ** 2).mean()) / 1024  # the two axes' centres are independent
    assert abs(statistics.mean(d.lam for d in cut) - expected) < 0.01, expected
    counts = torch.bincount(torch.tensor([d.partner for d in mixed]) * 10 // n, minlength=10).float()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 33.7  # partners uniform: chi-square, 9 degrees of freedom, p = 1e-4
    assert draw(BOTH, 0, 0, 5, n, 32, 32) == draw(BOTH, 0, 0, 5, n, 32, 32) != draw(BOTH, 0, 1, 5, n, 32, 32)


def test_other_mixing_is_refused_naming_the_difference(mixed_cache, tiny, tmp_path):
    with pytest.raises(LogitcacheError, match="built with mixup alpha 0.8 or cutmix .* asks for no mixing"):
        lc.CachedKDDataset(tiny, mixed_cache, mix=Mix())
    with pytest.raises(LogitcacheError, match="asks for cutmix alpha 1, prob 1"):
        lc.CachedKDDataset(tiny, mixed_cache, mix=Mix("cutmix"))
    plain = tmp_path / "plain"
    lc.build_cache(helpers.tiny_teacher(), tiny, plain, augment=helpers.heavy_augment(), views=1, encoding="full",
                   batch_size=32, chunk_rows=64, workers=0, progress=False)  # fmt: skip
    with pytest.raises(LogitcacheError, match="built with no mixing but this run asks for mixup"):
        lc.CachedKDDataset(tiny, plain, augment=helpers.heavy_augment(), mix=Mix("mixup"))
    with pytest.raises(LogitcacheError, match="mix"):  # resuming into a store built without mixing
        lc.build_cache(helpers.tiny_teacher(), tiny, plain, augment=helpers.heavy_augment(), views=1,
                       encoding="full", batch_size=32, chunk_rows=64, workers=0, progress=False, resume=True,
                       mix=Mix("mixup"))  # fmt: skip
    # verify replays the mixed images the teacher labelled
    from logitcache.teacher.verify import verify_cache

    assert verify_cache(mixed_cache, helpers.tiny_teacher(), tiny, samples=32).ok


def test_train_with_mixing_runs_and_refuses_other_mixing(mixed_cache, tmp_path):
    common = ["--dataset", f"{HELPERS}:tiny_dataset", "--model", "small-resnet8-w4", "--epochs", "1",
              "--batch-size", "32", "--workers", "0", "-q"]  # fmt: skip
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "a"), "--kd", "cached", "--cache", str(mixed_cache)]
                           + common)  # fmt: skip
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "b"), "--mix", "cutmix", "--augment",
                                 f"{HELPERS}:heavy_augment"] + common)  # fmt: skip
    assert r.exit_code == 0, r.output  # mixing without a cache (the plain arm of a comparison)
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "c"), "--kd", "cached", "--cache",
                                 str(mixed_cache), "--mix", "none"] + common)  # fmt: skip
    assert r.exit_code == 2 and "asks for no mixing" in r.output, r.output


def test_cli_build_records_the_mixing(tmp_path):
    from conftest import cli_build_args

    out = tmp_path / "c"
    args = cli_build_args(chunk_rows=64, workers=0) + ["--teacher", f"{HELPERS}:tiny_teacher", "--out", str(out)]
    r = CliRunner().invoke(app, args + ["--mix", "mixup", "--mix-alpha", "0.4", "--mix-prob", "0.5"])
    assert r.exit_code == 0, r.output
    assert lc.open_cache(out).meta.to_json()["mix"] == {
        "mode": "mixup", "alpha": 0.4, "cutmix_alpha": 1.0, "prob": 0.5, "switch_prob": 0.5,
    }  # fmt: skip


def test_only_the_alphas_a_mode_draws_from_are_checked_and_the_error_names_the_field_and_its_flag():
    from logitcache.augment.mix import Mix

    assert Mix("cutmix", alpha=0).cutmix_alpha == 1.0 and not Mix("none", alpha=0).active
    with pytest.raises(LogitcacheError, match=r"Mix alpha \(--mix-alpha\) must be > 0 for mode mixup, got 0"):
        Mix("mixup", alpha=0)
    with pytest.raises(LogitcacheError, match=r"Mix cutmix_alpha \(--cutmix-alpha\)"):
        Mix("both", cutmix_alpha=-1)
