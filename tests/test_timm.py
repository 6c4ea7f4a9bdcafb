"""timm models and transforms (the optional extra `logitcache[timm]`, installed with the test extra)."""

import pytest
import torch
from torch.utils.data import DataLoader
from typer.testing import CliRunner

import helpers
import logitcache as lc
from logitcache.cli import app
from conftest import HELPERS
from logitcache import specs
from logitcache.errors import LogitcacheError

timm = pytest.importorskip("timm")  # part of the test extra: skipped only where someone left it out on purpose

# DeiT's policy without "inc1": timm 1.0's increasing posterize can ask Pillow >= 11 for 0 bits, which it refuses
RAND = "timm:rand-m9-mstd0.5"


def test_a_timm_randaugment_transform_replays_exactly(tiny):
    train_tf, eval_tf = specs.resolve_augment(RAND, tiny)
    views = [lc.replay_view(train_tf, tiny[4][0], 0, v, 4) for v in (0, 0, 1)]
    assert views[0].shape == (1, 16, 16) and torch.equal(views[0], views[1]) and not torch.equal(views[0], views[2])
    assert eval_tf(tiny[4][0]).shape == (1, 16, 16)


def test_a_cache_built_with_timm_parts_replays_through_workers(tiny, tmp_path):
    train_tf, _ = specs.resolve_augment(RAND, tiny)
    teacher = specs.build_model("timm:test_resnet", 10, 1).eval()
    out = tmp_path / "c"
    lc.build_cache(teacher, tiny, out, augment=train_tf, views=2, encoding="full", batch_size=32, chunk_rows=64,
                   workers=2, progress=False, specs={"augment": RAND})  # fmt: skip
    ds = lc.CachedKDDataset(tiny, out)  # the recorded timm spec resolves to the same transform
    ds.set_epoch(1)
    batches = {w: next(iter(DataLoader(ds, batch_size=16, num_workers=w))) for w in (0, 2)}
    assert torch.equal(batches[0][0], batches[2][0])
    with torch.no_grad():
        fresh = teacher(batches[0][0])
    assert torch.allclose(fresh, batches[0][2]["logits"].float(), atol=2e-2)  # the teacher labelled these images


def test_train_a_timm_model(tmp_path):
    args = ["train", "--out", str(tmp_path / "r"), "--dataset", f"{HELPERS}:tiny_dataset", "--model",
            "timm:test_resnet", "--augment", RAND, "--epochs", "1", "--batch-size", "32", "--workers", "0",
            "-q"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    teacher = specs.resolve_teacher(str(tmp_path / "r"))  # a timm run teaches the next one
    assert type(teacher).__module__.startswith("timm") and teacher(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_unknown_timm_names_are_one_line_errors(tiny):
    with pytest.raises(LogitcacheError, match="unknown timm model 'no_such_net'"):
        specs.build_model("timm:no_such_net", 10, 1)
    with pytest.raises(LogitcacheError, match="timm cannot make the augmentation 'nonsense'"):
        specs.resolve_augment("timm:nonsense", tiny)
    assert helpers.NUM_CLASSES == 10
