import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

import helpers
import logitcache as lc
from logitcache.cli import app
from conftest import HELPERS
from logitcache.teacher.verify import verify_cache

runner = CliRunner()


@pytest.fixture
def cache_copy(built_cache, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built_cache, out)
    return out


def test_inspect_json_matches_the_arrays(built_cache):
    result = runner.invoke(app, ["inspect", str(built_cache), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["num_views"], info["num_samples"], info["num_classes"], info["encoding"]) == (3, 240, 10, "topk")
    assert info["complete"] and info["completion_per_view"] == [1.0, 1.0, 1.0]
    g = zarr.open_group(str(built_cache), mode="r")
    on_disk = 0
    for name, a in info["arrays"].items():
        files = sum(f.stat().st_size for f in (Path(built_cache) / name).rglob("*") if f.is_file())
        assert a["stored_bytes"] == files, name
        assert a["bytes"] == g[name].nbytes and a["shape"] == list(g[name].shape)
        on_disk += files
    assert info["bytes_on_disk"] == on_disk
    fields = sum(info["arrays"][name]["stored_bytes"] for name in ("logprobs", "ids", "tail", "tail_soft"))
    assert info["bytes_per_view"] == pytest.approx(fields / 3, abs=0.1)
    assert info["bytes_per_kept_entry"] == pytest.approx(fields / (3 * 240 * 3), abs=1e-4)
    labels = np.asarray(helpers.tiny_dataset().targets)
    for v, stats in enumerate(info["views"]):
        assert stats["rows"] == 240
        assert stats["mean_tail_mass"] == pytest.approx(float(np.exp(g["tail"][v].astype(np.float64)).mean()), abs=1e-5)
        # T=4 is a stored point of tail_soft (betas 1/8, 1/4, 1/2): the tail's share straight from the raw arrays
        top = np.exp(g["logprobs"][v].astype(np.float64) / 4).sum(1)
        soft_tail = np.exp(g["tail_soft"][v][:, 1].astype(np.float64))
        assert stats["mean_tail_mass_t4"] == pytest.approx(float((soft_tail / (top + soft_tail)).mean()), abs=1e-4)
        top1 = g["ids"][v][:, 0]
        assert stats["top1_agreement_with_labels"] == pytest.approx(float((top1 == labels).mean()), abs=1e-4)


def test_inspect_human_output_and_missing_cache(built_cache, tmp_path):
    result = runner.invoke(app, ["inspect", str(built_cache)])
    assert result.exit_code == 0 and "teacher per view" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "does not exist" in result.output


def _verify(path, *extra, teacher=f"{HELPERS}:tiny_teacher"):
    return runner.invoke(
        app,
        ["verify", str(path), "--teacher", teacher, "--dataset", f"{HELPERS}:tiny_dataset", "--samples", "64", *extra],
    )


def test_verify_passes_on_a_good_cache(built_cache):
    result = _verify(built_cache)
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


@pytest.mark.parametrize("encoding", ["full", "sampled", "quantized"])
def test_verify_passes_for_every_encoding(tmp_path, tiny, encoding):
    out = tmp_path / encoding
    lc.build_cache(
        helpers.tiny_teacher(),
        tiny,
        out,
        augment=helpers.heavy_augment(),
        views=2,
        encoding=encoding,
        samples=20,
        tau=2.0,
        chunk_rows=64,
        workers=0,
        progress=False,
    )
    report = verify_cache(out, helpers.tiny_teacher(), tiny, augment=helpers.heavy_augment(), samples=32)
    assert report.ok, report.problems
    other = helpers.tiny_teacher()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-3.0)
    bad = verify_cache(out, other, tiny, augment=helpers.heavy_augment(), samples=32)
    assert not bad.ok and bad.first_bad is not None


def test_verify_catches_a_different_teacher(built_cache, tmp_path):
    (tmp_path / "t.py").write_text(
        "import torch\nfrom logitcache.models import SmallResNet\n"
        "def teacher():\n    torch.manual_seed(1)\n    return SmallResNet(8, 4, 1, 10).eval()\n"
    )
    result = _verify(built_cache, teacher=f"{tmp_path / 't.py'}:teacher")
    assert result.exit_code == 1
    assert "first bad: view" in result.output


def test_verify_catches_a_different_augmentation(built_cache):
    result = _verify(built_cache, "--augment", f"{HELPERS}:other_augment")
    assert result.exit_code == 1
    assert "augmentation does not replay the views" in result.output and "first bad: view" in result.output


def test_verify_catches_a_corrupted_chunk(cache_copy):
    chunk = cache_copy / "logprobs" / "c" / "2" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[40] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = _verify(cache_copy)
    assert result.exit_code == 1
    assert "view 2, chunk 1" in result.output and "first bad: view 2, sample 64" in result.output


def test_verify_catches_rewritten_numbers_with_valid_checksums(cache_copy):
    g = zarr.open_group(str(cache_copy), mode="r+")
    rows = g["logprobs"][1, 128:192]
    g["logprobs"][1, 128:192] = rows - 0.5  # a whole chunk rewritten through zarr: checksums stay valid
    report = verify_cache(cache_copy, helpers.tiny_teacher(), helpers.tiny_dataset(), samples=64)
    assert not report.ok
    v, i = report.first_bad
    assert v == 1 and 128 <= i < 192


def test_verify_catches_a_reordered_dataset(built_cache):
    ds = helpers.tiny_dataset()
    perm = np.random.default_rng(0).permutation(240)
    ds.images = [ds.images[i] for i in perm]
    ds.targets = ds.targets[perm]
    report = verify_cache(built_cache, helpers.tiny_teacher(), ds, samples=64)
    assert not report.ok and report.first_bad is not None
    assert any("dataset" in p for p in report.problems)


@pytest.mark.parametrize("encoding", ["full", "topk", "topk8", "headtail", "sampled", "quantized"])
def test_every_encoding_builds_inspects_and_verifies(tmp_path, tiny, encoding):
    from logitcache.store.inspection import inspect_cache

    out = tmp_path / encoding
    lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), encoding=encoding, k=4,
                   tail_samples=4, samples=8, batch_size=32, chunk_rows=64, workers=0, progress=False)  # fmt: skip
    info = inspect_cache(out)
    assert info["encoding"] == encoding and info["complete"] and info["bytes_per_kept_entry"] > 0
    assert info["views"][0]["top1_agreement_with_labels"] is not None
    report = verify_cache(out, helpers.tiny_teacher(), tiny, augment=helpers.heavy_augment(), samples=16)
    assert report.ok, report.problems
