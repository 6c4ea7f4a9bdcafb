import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

import helpers
import logitcache as lc
from logitcache.cli import app
from conftest import HELPERS, cli_build_args
from logitcache.errors import LogitcacheError

BUILD = dict(views=2, seed=5, encoding="topk", k=3, batch_size=16, chunk_rows=32, workers=0, progress=False)


def test_store_is_plain_zarr_v3(built_cache):
    g = zarr.open_group(str(built_cache), mode="r")
    assert g.metadata.zarr_format == 3
    meta = g.attrs["logitcache"]
    json.dumps(meta)  # plain JSON, no pickle
    assert meta["encoding"] == {"name": "topk", "params": {"k": 3, "soft_tail": True}}
    assert meta["format_version"] == 3
    assert meta["num_views"] == 3 and meta["num_samples"] == 240 and meta["num_classes"] == 10
    assert g["digests"].shape == g["complete"].shape == (3, 4) and g["digests"].dtype == np.uint32
    for key in ("teacher", "dataset", "augment", "versions", "seed", "values", "temperature"):
        assert key in meta
    assert g["logprobs"].shape == (3, 240, 3) and g["logprobs"].chunks == (1, 64, 3)
    assert g["ids"].dtype == np.int16 and g["tail"].shape == (3, 240) and g["tail_soft"].shape == (3, 240, 3)
    codecs = [c["name"] for c in g["ids"].metadata.to_dict()["codecs"]]
    assert "crc32c" in codecs
    assert g["complete"][...].all()
    # no pickled objects anywhere in the store
    for f in Path(built_cache).rglob("*"):
        if f.is_file():
            assert b"\x80\x04\x95" not in f.read_bytes()[:3]


def test_open_cache_reads_views_and_ranges(built_cache):
    cache = lc.open_cache(built_cache)
    assert (cache.num_samples, cache.num_views, cache.num_classes, cache.encoding.name) == (240, 3, 10, "topk")
    view = cache.read(1)
    assert view["ids"].shape == (240, 3) and view["logprobs"].dtype == torch.float16
    part = cache.read(1, 64, 128)
    assert torch.equal(part["ids"], view["ids"][64:128])
    assert torch.allclose(lc.to_probs(part, cache=cache).sum(1), torch.ones(64), atol=1e-4)


def test_stored_targets_match_the_teacher_on_replayed_views(built_cache, tiny):
    cache = lc.open_cache(built_cache)
    teacher, tf = helpers.tiny_teacher(), helpers.heavy_augment()
    for view, index in [(0, 0), (1, 77), (2, 239), (2, 64)]:
        x = lc.replay_view(tf, tiny[index][0], 7, view, index)
        with torch.no_grad():
            logp = torch.log_softmax(teacher(x[None]), 1)[0]
        row = cache.read(view, index, index + 1)
        top, ids = logp.topk(3)
        assert torch.equal(row["ids"][0].long(), ids)
        assert torch.allclose(row["logprobs"][0].float(), top, atol=1e-2)


def test_resume_after_crash_is_bitwise_identical(tmp_path, tiny):
    ref = tmp_path / "ref"
    lc.build_cache(helpers.tiny_teacher(), tiny, ref, augment=helpers.heavy_augment(), **BUILD)

    class Crashing(torch.nn.Module):
        def __init__(self, calls):
            super().__init__()
            self.net, self.calls = helpers.tiny_teacher(), calls

        def forward(self, x):
            self.calls -= 1
            if self.calls < 0:
                raise KeyboardInterrupt
            return self.net(x)

    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        lc.build_cache(Crashing(11), tiny, out, augment=helpers.heavy_augment(), **BUILD)
    done = lc.open_cache(out).completion()
    assert 0 < done.sum() < done.size
    with pytest.raises(LogitcacheError, match="--resume"):
        lc.build_cache(Crashing(10**9), tiny, out, augment=helpers.heavy_augment(), **BUILD)
    with pytest.raises(LogitcacheError, match="incomplete"):
        lc.CachedKDDataset(tiny, out, augment=helpers.heavy_augment())
    lc.build_cache(Crashing(10**9), tiny, out, augment=helpers.heavy_augment(), resume=True, **BUILD)
    helpers.assert_same_store(ref, out, ignore=("teacher",))  # the crashing wrapper: another class


def test_half_written_chunk_is_recomputed(tmp_path, tiny):
    ref = tmp_path / "ref"
    lc.build_cache(helpers.tiny_teacher(), tiny, ref, augment=helpers.heavy_augment(), **BUILD)
    out = tmp_path / "torn"
    lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), **BUILD)
    # power loss mid-unit: data chunk torn, completion flag never written
    chunk_file = out / "logprobs" / "c" / "1" / "2" / "0"
    chunk_file.write_bytes(chunk_file.read_bytes()[:7])
    (out / "complete" / "c" / "1" / "2").unlink()
    assert not lc.open_cache(out).is_complete
    lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), resume=True, **BUILD)
    helpers.assert_same_store(ref, out)


# 16 teacher batches a view: dies in view 0, and (a further layout, left to the full suite) in view 1
@pytest.mark.parametrize("die_after", [3, pytest.param(20, marks=pytest.mark.smoke)])
def test_kill_9_then_resume_via_cli(tmp_path, die_after, monkeypatch):
    """A build process killed with SIGKILL mid-build; the CLI's --resume (run in this process: only the killed
    build needs a process of its own) finishes it to the bytes of an uninterrupted CLI build."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    common = cli_build_args(chunk_rows=32, workers=2)
    env = {**os.environ, "DIE_AFTER": str(die_after)}
    cmd = [sys.executable, "-m", "logitcache"]
    killed = subprocess.run(
        cmd + common + ["--teacher", f"{HELPERS}:dying_teacher", "--out", str(out)], env=env, capture_output=True
    )
    assert killed.returncode == -9
    assert not lc.open_cache(out).is_complete
    monkeypatch.setenv("DIE_AFTER", "100000")
    for args in (
        ["--teacher", f"{HELPERS}:dying_teacher", "--out", str(out), "--resume"],
        ["--teacher", f"{HELPERS}:tiny_teacher", "--out", str(ref)],
    ):
        r = runner.invoke(app, common + args)
        assert r.exit_code == 0 and r.exception is None, r.output
    helpers.assert_same_store(ref, out, ignore=("teacher",))  # the dying wrapper: another spec


def test_existing_cache_with_other_inputs_is_refused(tmp_path, tiny):
    out = tmp_path / "c"
    lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), **BUILD)
    other_teacher = helpers.tiny_teacher()
    with torch.no_grad():
        other_teacher.head.bias.add_(1.0)
    with pytest.raises(LogitcacheError, match="different teacher"):
        lc.build_cache(other_teacher, tiny, out, augment=helpers.heavy_augment(), resume=True, **BUILD)
    with pytest.raises(LogitcacheError, match="different augmentation"):
        lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=helpers.other_augment(), resume=True, **BUILD)
    with pytest.raises(LogitcacheError, match="encoding"):
        lc.build_cache(
            helpers.tiny_teacher(),
            tiny,
            out,
            augment=helpers.heavy_augment(),
            resume=True,
            encoding="full",
            **{k: v for k, v in BUILD.items() if k not in ("k", "encoding")},
        )
    with pytest.raises(LogitcacheError, match="different dataset"):
        lc.build_cache(
            helpers.tiny_teacher(),
            helpers.TinyImages(240, seed=9),
            out,
            augment=helpers.heavy_augment(),
            resume=True,
            **BUILD,
        )
    cache = lc.build_cache(other_teacher, tiny, out, augment=helpers.heavy_augment(), overwrite=True, **BUILD)
    assert cache.is_complete


def test_overwrite_refuses_a_foreign_folder(tmp_path, tiny):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(LogitcacheError, match="not a logitcache store"):
        lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), overwrite=True, **BUILD)
    assert (out / "thesis.tex").exists()


runner = CliRunner()


def _cli_build(tmp_path, *extra, teacher=f"{HELPERS}:tiny_teacher", dataset=f"{HELPERS}:tiny_dataset"):
    args = [
        "build",
        "--teacher",
        teacher,
        "--dataset",
        dataset,
        "--out",
        str(tmp_path / "out"),
        "--augment",
        f"{HELPERS}:heavy_augment",
        "--views",
        "1",
        "--workers",
        "0",
        "-q",
        *extra,
    ]
    return runner.invoke(app, args)


@pytest.mark.parametrize(
    "case, kwargs, extra, message",
    [
        ("missing path", {"dataset": "imagefolder:/nonexistent/folder"}, [], "does not exist"),
        ("unknown dataset", {"dataset": "imagenet-42"}, [], "unknown dataset"),
        ("unknown teacher", {"teacher": "resnet9000"}, [], "unknown teacher"),
        ("missing module", {"teacher": "no_such_pkg.mod:fn"}, [], "cannot import"),
        ("missing file", {"teacher": "nowhere/teacher.py:fn"}, [], "does not exist"),
        ("wrong return type", {"teacher": f"{HELPERS}:not_a_module"}, [], "not a torch.nn.Module"),
        ("k too large", {}, ["--encoding", "topk", "--k", "11"], "k must be between 1"),
        ("k below 1", {}, ["--encoding", "topk", "--k", "0"], "greater than or equal to 1"),
        ("k without its encoding", {}, ["--k", "3"], "name the encoding"),
        ("labels outside classes", {"teacher": "helpers_small:five_class_teacher"}, [], "outside the teacher"),
        ("NaN teacher", {"teacher": f"{HELPERS}:nan_teacher"}, [], "NaN"),
        ("missing weights", {}, ["--teacher-weights", "/nonexistent.safetensors"], "does not exist"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, monkeypatch, case, kwargs, extra, message):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "helpers_small.py").write_text(
        "from logitcache.models import SmallResNet\ndef five_class_teacher():\n    return SmallResNet(8, 4, 1, 5)\n"
    )
    result = _cli_build(tmp_path, *extra, **kwargs)
    assert result.exit_code == 2, (case, result.output)
    assert message in result.output, (case, result.output)
    assert "Traceback" not in result.output
    if case == "NaN teacher":
        assert not lc.open_cache(tmp_path / "out").completion().any()


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(
        app,
        [
            "build",
            "--teacher",
            f"{HELPERS}:tiny_teacher",
            "--dataset",
            f"{HELPERS}:tiny_dataset",
            "--out",
            str(blocker / "sub"),
            "--augment",
            "none",
            "-q",
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 2 and "cannot create" in result.output, result.output


def test_format_version_1_stores_are_still_read(tmp_path, tiny):
    # A version-1 top-k store has no tail_soft array and {"k": k} as its parameters; it decodes with a flat tail.
    out = tmp_path / "v1"
    lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), soft_tail=False, **BUILD)
    g = _as_old_version(out, 1)
    meta = dict(g.attrs["logitcache"])
    assert "tail_soft" not in set(g.array_keys())
    meta["encoding"] = {"name": "topk", "params": {"k": 3}}
    g.attrs["logitcache"] = meta
    cache = lc.open_cache(out)
    targets = cache.read(0)
    assert "tail_soft" not in targets
    assert torch.allclose(lc.to_probs(targets, 4.0, cache=cache).sum(1), torch.ones(240), atol=1e-4)
    ds = lc.CachedKDDataset(tiny, cache, augment=helpers.heavy_augment())
    assert set(ds[0][2]) == {"logprobs", "ids", "tail"}  # the stored fields alone
    meta["format_version"] = 4
    g.attrs["logitcache"] = meta
    with pytest.raises(LogitcacheError, match="format version 4"):
        lc.open_cache(out)


def _as_old_version(out, version):
    """What a store of an older format looks like: no digests array, no metadata digest."""
    shutil.rmtree(Path(out) / "digests")
    g = zarr.open_group(str(out), mode="r+")
    meta = dict(g.attrs["logitcache"])
    del meta["metadata_sha256"]
    meta["format_version"] = version
    g.attrs["logitcache"] = meta
    return g


def test_format_version_2_stores_are_read_and_said_to_lack_digests(tmp_path, tiny):
    out = tmp_path / "v2"
    lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), **BUILD)
    reference = lc.open_cache(out).read(1)
    _as_old_version(out, 2)
    cache = lc.open_cache(out)
    assert not cache.has_digests
    assert all(torch.equal(reference[k], v) for k, v in cache.read(1).items())
    r = CliRunner().invoke(app, ["verify", str(out), "--storage-only"])
    assert r.exit_code == 1 and "records no per-chunk digests" in r.output


def test_cli_flat_tail_builds_without_tail_soft(tmp_path):
    out = tmp_path / "flat"
    args = cli_build_args(chunk_rows=64, workers=0) + ["--teacher", f"{HELPERS}:tiny_teacher", "--out", str(out)]
    r = CliRunner().invoke(app, args + ["--flat-tail"])
    assert r.exit_code == 0, r.output
    cache = lc.open_cache(out)
    assert cache.encoding.params() == {"k": 3, "soft_tail": False} and "tail_soft" not in cache.field_names


def test_cli_refuses_an_option_of_another_encoding(tmp_path):
    args = cli_build_args(chunk_rows=64, workers=0) + ["--teacher", f"{HELPERS}:tiny_teacher", "--out", str(tmp_path)]
    r = CliRunner().invoke(app, args + ["--encoding", "full"])  # cli_build_args passes --k 3
    assert r.exit_code == 2, r.output
    assert "--k is an option of --encoding topk / topk8 / headtail, not of full" in r.output
    assert not (tmp_path / "zarr.json").exists()


def test_dry_run_estimates_the_size_and_writes_nothing(tmp_path, tiny):
    from logitcache.teacher.estimate import estimate_build

    args = cli_build_args(chunk_rows=64, workers=0) + ["--teacher", f"{HELPERS}:tiny_teacher", "--out", str(tmp_path)]
    r = CliRunner().invoke(app, args + ["--dry-run"])
    assert r.exit_code == 0 and "dry run, nothing written" in r.output and "B per sample and view" in r.output, r.output
    assert not any(tmp_path.iterdir())
    # the estimate against the real thing: 2 views of 240 samples
    est = estimate_build(helpers.tiny_teacher(), tiny, augment=helpers.heavy_augment(), views=2, chunk_rows=64,
                         k=3, batch_size=16, workers=0)  # fmt: skip
    lc.build_cache(helpers.tiny_teacher(), tiny, tmp_path / "c", augment=helpers.heavy_augment(), views=2,
                   chunk_rows=64, k=3, batch_size=16, workers=0, progress=False, encoding="topk")  # fmt: skip
    cache = lc.open_cache(tmp_path / "c")
    # the chunks' bytes (the metadata documents are a fixed few KB, which the estimate leaves out)
    stored = sum(
        f.stat().st_size for name in cache.field_names for f in (tmp_path / "c" / name / "c").rglob("*") if f.is_file()
    )
    assert est.samples == 480 and 0.7 < est.total_bytes / stored < 1.3, (est, stored)


def test_topk8_layout_2_stores_steps_and_layout_1_stores_still_read(tmp_path, tiny):
    # Layout 2 stores the steps between consecutive 8-bit log-probabilities instead of the values (the same
    # numbers, smaller after compression). A store written before layouts existed has no "layout" (nor "tail_shape":
    # its tail is flat; nor "tail_rank") in its encoding's parameters and holds the values: it must decode to exactly
    # the targets a layout 2 store with a flat tail holds.
    from logitcache.store.meta import DIGEST_KEY as META_DIGEST, json_digest as metadata_digest

    build = dict(BUILD, encoding="topk8", k=5, tail_shape="flat")
    new, old = tmp_path / "new", tmp_path / "old"
    lc.build_cache(helpers.tiny_teacher(), tiny, new, augment=helpers.heavy_augment(), **build)
    lc.build_cache(helpers.tiny_teacher(), tiny, old, augment=helpers.heavy_augment(), layout=1, **build)
    g = zarr.open_group(str(old), mode="r+")
    meta = dict(g.attrs["logitcache"])
    for option in ("layout", "tail_shape", "tail_rank"):
        del meta["encoding"]["params"][option]
    meta[META_DIGEST] = metadata_digest(meta)
    g.attrs["logitcache"] = meta

    a, b = lc.open_cache(new), lc.open_cache(old)
    assert a.encoding.params() == {"k": 5, "layout": 2, "tail_shape": "flat", "tail_rank": 0}
    assert b.encoding.params() == {"k": 5, "layout": 1, "tail_shape": "flat", "tail_rank": 0}
    stored_a, stored_b = a.read(1, fields_only=True), b.read(1, fields_only=True)
    assert torch.equal(stored_a["q"].long().cumsum(1), stored_b["q"].long())
    assert not torch.equal(stored_a["q"], stored_b["q"])
    ta, tb = a.read(1), b.read(1)  # on the wire, both in layout 2: the same numbers
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    for temperature in (1.0, 4.0):
        assert torch.equal(lc.to_probs(ta, temperature, cache=a), lc.to_probs(tb, temperature, cache=b))
    item_a = lc.CachedKDDataset(tiny, a, augment=helpers.heavy_augment())[3][2]
    item_b = lc.CachedKDDataset(tiny, b, augment=helpers.heavy_augment())[3][2]
    assert all(torch.equal(item_a[k], item_b[k]) for k in item_a)
    assert inspect_json(old)["encoding_params"] == {"k": 5, "layout": 1, "tail_shape": "flat", "tail_rank": 0}
    with pytest.raises(LogitcacheError, match="reads layouts 1 and 2"):
        lc.build_cache(helpers.tiny_teacher(), tiny, tmp_path / "x", augment=helpers.heavy_augment(), layout=3, **build)


def inspect_json(path):
    r = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_topk8_layouts_decode_alike_at_100_classes():
    # Wide logits (spread positions and steps), both layouts, every temperature the soft tail serves.
    from logitcache.encoding import CompactTopKEncoding

    logits = torch.randn(512, 100, generator=torch.Generator().manual_seed(3)) * 4
    one, two = (CompactTopKEncoding(100, 10, layout=n, tail_shape="flat") for n in (1, 2))
    s1, s2 = one.encode(logits), two.encode(logits)
    assert not torch.equal(s1["tail_soft8"], s2["tail_soft8"])
    t1, t2 = one.wire(s1), two.wire(s2)  # layout 1 travels as layout 2
    for temperature in (1.0, 2.0, 4.0, 8.0):
        assert torch.equal(lc.to_probs(t1, temperature, cache=one), lc.to_probs(t2, temperature, cache=two))


@pytest.mark.parametrize(
    "classes, name, k",
    [(4, "full", None), (10, "full", None), (32, "full", None), (33, "topk8", 10), (5000, "headtail", 10)],
)
def test_the_default_encoding_fits_the_number_of_classes(classes, name, k):
    from logitcache.encoding import make_encoding

    enc = make_encoding("auto", classes)
    assert enc.name == name and getattr(enc, "k", None) == k
    assert make_encoding("topk", 4).k == 4 and make_encoding("headtail", 6).k == 5  # defaults never above C allows
    assert make_encoding("topk", 40, {"k": 7}).k == 7


def test_the_default_build_of_a_four_class_folder_stores_every_class(tmp_path):
    from PIL import Image

    for c in range(4):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("L", (16, 16), color=40 * c + i).save(tmp_path / "data" / f"class{c}" / f"{i}.png")
    (tmp_path / "teacher.py").write_text(
        "from logitcache.models import SmallResNet\ndef four():\n    return SmallResNet(8, 4, 3, 4)\n"
    )
    result = runner.invoke(app, ["build", "--teacher", f"{tmp_path / 'teacher.py'}:four", "--dataset",
                                 f"imagefolder:{tmp_path / 'data'}", "--out", str(tmp_path / "c"), "--views", "1",
                                 "--workers", "0", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert lc.open_cache(tmp_path / "c").encoding.name == "full"
