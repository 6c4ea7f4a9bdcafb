"""The attack suite: damage done to real small stores never turns into silent wrong targets.

Each attack asserts the *named* outcome: the error names the array, view, chunk and samples and says what to run, or
`build --resume --repair` restores the undamaged store byte for byte.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.utils.data import DataLoader
from typer.testing import CliRunner
import torch
import zarr

import logitcache as lc
from conftest import HELPERS, cli_build_args
from logitcache.cli import app
from logitcache.errors import LogitcacheError
from logitcache.store import DamagedCache

BUILD = cli_build_args(chunk_rows=32, workers=0) + ["--teacher", f"{HELPERS}:tiny_teacher"]  # 2 views x 8 chunks
ARRAYS = ("ids", "logprobs", "tail", "tail_soft", "digests", "complete", "labels")
TRAIN = [
    "train",
    "--dataset",
    f"{HELPERS}:tiny_dataset",
    "--model",
    "small-resnet8-w4",
    "--epochs",
    "2",
    "--batch-size",
    "32",
    "--kd",
    "cached",
    "-q",
]


def _process(*args, check=False, timeout=300, **kw):
    """`python -m logitcache ARGS` in a process of its own: for the runs a test kills, races, or reads the stderr of
    the DataLoader workers from (what a user's terminal shows)."""
    r = subprocess.run(
        [sys.executable, "-m", "logitcache", *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw
    )
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _cli(*args, check=False):
    """The command in this process (the app's own error handling and exit codes, without a fresh interpreter's
    seconds of imports); an exception that escapes the app, which a terminal would show as a traceback, fails."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"the command raised instead of exiting with a message: {r.exception!r}\n{r.stderr}")
    if check:
        assert r.exit_code == 0, r.stderr[-3000:]
    plain = re.compile(r"\x1b\[[0-9;]*m")  # rich's colours, should the terminal have asked for them
    return subprocess.CompletedProcess(args, r.exit_code, plain.sub("", r.stdout), plain.sub("", r.stderr))


def _bytes(path):
    g = zarr.open_group(str(path), mode="r")
    return {name: g[name][...].tobytes() for name in ARRAYS}


def _file(store, array, view, chunk):
    p = Path(store) / array / "c" / str(view) / str(chunk)
    return p / "0" if p.is_dir() else p


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "c"
    _cli(*BUILD, "--out", out, check=True)
    return out


@pytest.fixture
def store(reference, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(reference, out)
    return out


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


ATTACKS = {
    "deleted": lambda p: p.unlink(),
    "flipped byte": _flip,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "emptied": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_damaged_chunk_is_named_on_every_read_path(store, attack):
    ATTACKS[attack](_file(store, "logprobs", 1, 2))
    cache = lc.open_cache(store)
    expected = "damaged at view 1, chunk 2 (samples 64-95): array 'logprobs'"
    reads = (
        lambda: cache.read_chunk(1, 2),
        lambda: cache.read(1),
        lambda: cache.read(1, 70, 71),
        lambda: cache.read_chunks(1, [5, 2, 0]),  # the ring's read of a window of scattered units
    )
    for read in reads:
        with pytest.raises(DamagedCache, match="--resume --repair") as e:
            read()
        assert expected in str(e.value)
    if attack == "deleted":
        assert "chunk file is missing" in str(e.value)
    ds = lc.CachedKDDataset(_tiny(), cache, augment=_heavy())
    with pytest.raises(DamagedCache, match="view 1, chunk 2"):
        ds.cached_targets([3, 70], view=1)
    assert ds.cached_targets([3, 40], view=0)["ids"].shape == (2, 3)  # undamaged units still read
    ring = lc.CachedKDDataset(_tiny(), cache, augment=_heavy(), memory_mb=0)
    sampler = ring.chunk_sampler(window=2)
    ring.set_epoch(1)
    with pytest.raises(DamagedCache, match="view 1, chunk 2"):
        list(DataLoader(ring, batch_size=16, sampler=sampler))
    # DataLoader workers that read the chunks themselves (their own store handles) name it too
    by_chunk = lc.CachedKDDataset(_tiny(), cache, augment=_heavy(), memory_mb=0)
    sampler = by_chunk.chunk_sampler(window=2, ring=False)
    by_chunk.set_epoch(1)
    with pytest.raises(DamagedCache, match="view 1, chunk 2") as e:
        list(DataLoader(by_chunk, batch_size=16, sampler=sampler, num_workers=2))
    assert "in DataLoader worker process" in str(e.value) and int(by_chunk.rows_read[0]) == 0  # a worker read it


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The reference build with each unit stored as a Zarr v3 shard of 4 inner chunks of 8 rows."""
    out = tmp_path_factory.mktemp("sharded") / "c"
    _cli(*BUILD, "--inner-chunk-rows", 8, "--out", out, check=True)
    return out


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_damaged_shard_is_named_like_a_damaged_chunk(sharded, reference, attack, tmp_path):
    store = tmp_path / "c"
    shutil.copytree(sharded, store)
    cache = lc.open_cache(store)
    assert cache.group["logprobs"].shards == (1, 32, 3) and cache.group["logprobs"].chunks == (1, 8, 3)
    plain = lc.open_cache(reference)
    assert all(torch.equal(t, plain.read(1)[name]) for name, t in cache.read(1).items())  # same targets
    ATTACKS[attack](_file(store, "logprobs", 1, 2))
    cache = lc.open_cache(store)
    for read in (lambda: cache.read_chunk(1, 2), lambda: cache.read(1, 70, 71)):
        with pytest.raises(DamagedCache, match="damaged at view 1, chunk 2 \\(samples 64-95\\): array 'logprobs'"):
            read()
    assert cache.read_chunk(1, 3)["ids"].shape == (32, 3)  # undamaged units still read


def test_a_sharded_store_inspects_and_verifies(sharded):
    info = json.loads(_cli("inspect", sharded, "--json", check=True).stdout)
    assert info["inner_chunk_rows"] == 8 and info["chunk_rows"] == 32
    assert "all 16 chunks are complete and intact" in _cli("verify", sharded, "--storage-only", check=True).stdout
    _cli("verify", sharded, "--teacher", f"{HELPERS}:tiny_teacher", "--dataset", f"{HELPERS}:tiny_dataset", check=True)


def test_a_sharded_build_resumed_with_another_inner_chunking_is_refused(sharded, tmp_path):
    store = tmp_path / "c"
    shutil.copytree(sharded, store)
    r = _cli(*BUILD, "--inner-chunk-rows", 16, "--out", store, "--resume")
    assert r.returncode == 2 and "inner_chunk_rows=8" in r.stderr and "Traceback" not in r.stderr
    r = _cli(*BUILD, "--inner-chunk-rows", 5, "--out", tmp_path / "d")
    assert r.returncode == 2 and "must divide chunk_rows (32)" in r.stderr


def test_a_chunk_replaced_by_another_valid_chunk_is_caught_by_the_digest(store, reference):
    # Checksums pass (the file is a real chunk), only the content is another unit's: the digest catches it.
    shutil.copy(_file(store, "logprobs", 0, 5), _file(store, "logprobs", 1, 5))
    assert _file(store, "logprobs", 0, 5).read_bytes() != _file(reference, "logprobs", 1, 5).read_bytes()
    with pytest.raises(DamagedCache, match="view 1, chunk 5 .* differ from the digest recorded"):
        lc.open_cache(store).read_chunk(1, 5)


def test_training_on_a_store_with_a_deleted_chunk_stops_with_one_line(store, tmp_path):
    _file(store, "tail", 0, 3).unlink()
    # over the memory budget: the ring reads in the training process and its workers stop with its message
    r = _process(*TRAIN, "--cache", store, "--out", tmp_path / "run", "--workers", "2", "--target-memory-mb", "0")
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert "error: cache" in lines[0] and "view 0, chunk 3 (samples 96-127): array 'tail'" in lines[0]
    assert "chunk file is missing" in lines[0] and "--resume --repair" in lines[0]


def test_verify_reports_a_deleted_completion_flag_and_train_refuses(store, tmp_path):
    _file(store, "complete", 1, 6).unlink()
    r = _cli("verify", store, "--storage-only")
    assert r.returncode == 1 and "view 1, chunk 6: incomplete" in r.stderr
    r = _cli("verify", store, "--teacher", f"{HELPERS}:tiny_teacher", "--dataset", f"{HELPERS}:tiny_dataset")
    assert r.returncode == 1 and "view 1, chunk 6: incomplete" in r.stderr
    r = _cli(*TRAIN, "--cache", store, "--out", tmp_path / "run", "--workers", "0")
    assert r.returncode == 2 and "incomplete (15/16 chunks; first missing: view 1, chunk 6)" in r.stderr


def test_verify_storage_only_lists_every_damaged_chunk(store):
    assert _cli("verify", store, "--storage-only", check=True).stdout.count("all 16 chunks are complete and intact")
    _flip(_file(store, "ids", 0, 0))
    _file(store, "logprobs", 1, 7).unlink()
    r = _cli("verify", store, "--storage-only")
    assert r.returncode == 1
    assert "view 0, chunk 0: array 'ids': it cannot be decoded" in r.stderr
    assert "view 1, chunk 7: array 'logprobs': its chunk file is missing" in r.stderr
    assert "FAILED: 2 problem(s)" in r.stderr


def test_repair_recomputes_exactly_the_damaged_units_to_the_same_bytes(store, reference):
    _file(store, "logprobs", 0, 1).unlink()
    _flip(_file(store, "ids", 1, 4))
    _file(store, "tail_soft", 1, 7).write_bytes(b"")
    _file(store, "digests", 0, 6).unlink()
    _file(store, "complete", 1, 0).unlink()
    _flip(Path(store) / "labels" / "c" / "3")  # labels are 1-D: chunk 3 holds samples 96-127
    r = _cli(*BUILD, "--out", store, "--resume", "--repair", check=True)
    assert "repair: recomputing 4 damaged chunk(s)" in r.stderr and "labels rewritten" in r.stderr
    assert _bytes(store) == _bytes(reference)
    assert _cli("verify", store, "--storage-only").returncode == 0
    r = _cli(*BUILD, "--out", store, "--resume", "--repair", check=True)
    assert "nothing to recompute" in r.stderr


def test_repair_needs_resume(store):
    r = _cli(*BUILD, "--out", store, "--repair")
    assert r.returncode == 2 and "pass it together with --resume" in r.stderr


def _edit_attrs(store, **changes):
    meta_file = Path(store) / "zarr.json"
    doc = json.loads(meta_file.read_text())
    doc["attributes"]["logitcache"].update(changes)
    meta_file.write_text(json.dumps(doc))
    return doc["attributes"]["logitcache"]


def test_edited_metadata_is_refused_by_every_reader(store, tmp_path):
    _edit_attrs(store, num_classes=12)
    with pytest.raises(LogitcacheError, match="metadata .* were edited after the build"):
        lc.open_cache(store)
    for args in (
        ("inspect", store),
        ("verify", store, "--storage-only"),
        (*TRAIN, "--cache", store, "--out", tmp_path / "run"),
    ):
        r = _cli(*args)
        assert r.returncode == 2 and "were edited after the build" in r.stderr and "Traceback" not in r.stderr


def test_a_deleted_metadata_digest_is_refused(store):
    meta_file = Path(store) / "zarr.json"
    doc = json.loads(meta_file.read_text())
    del doc["attributes"]["logitcache"]["metadata_sha256"]
    meta_file.write_text(json.dumps(doc))
    with pytest.raises(LogitcacheError, match="were edited after the build"):
        lc.open_cache(store)


def test_attributes_that_contradict_the_arrays_are_refused(store):
    # Even with a matching metadata digest (a deliberate rewrite), arrays must fit the attributes.
    from logitcache.store.meta import DIGEST_KEY as META_DIGEST, json_digest as metadata_digest

    meta = _edit_attrs(store, chunk_rows=16)
    _edit_attrs(store, **{META_DIGEST: metadata_digest(meta)})
    with pytest.raises(LogitcacheError, match=r"array '\w+' does not match the cache's metadata \(.*chunks"):
        lc.open_cache(store)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tiny tmpfs needs root")
def test_a_full_disk_during_build_is_one_line_and_resume_finishes(tmp_path, reference):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs (a container without the capability)")
    try:
        r = _process(*BUILD, "--out", mnt / "c")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        line = [x for x in r.stderr.splitlines() if x.startswith("error:")][0]
        assert "No space left on device" in line and "chunks are complete and kept" in line
        assert "The whole cache needs about" in line and "free there now" in line and "--resume" in line
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        _cli(*BUILD, "--out", mnt / "c", "--resume", check=True)
        assert _bytes(mnt / "c") == _bytes(reference)
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_a_full_disk_while_saving_an_epoch_is_one_line(reference, tmp_path, monkeypatch):
    # Saving goes through safetensors' writer; ENOSPC is injected there (a tmpfs for a whole training run would make
    # the failing epoch depend on file-system block sizes).
    import safetensors.torch

    train_module = sys.modules["logitcache.student.loop"]  # the module (the package exports its `train` function)
    calls = {"n": 0}
    real = safetensors.torch.save_file

    def failing(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] > 2:  # epoch 1 saves two files; epoch 2 fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(train_module, "save_file", failing)
    monkeypatch.setattr("logitcache.student.checkpoint.save_file", failing)
    cfg = lc.TrainConfig(
        out=str(tmp_path / "run"),
        dataset=f"{HELPERS}:tiny_dataset",
        model="small-resnet8-w4",
        epochs=2,
        batch_size=32,
        workers=0,
        kd="cached",
        cache=str(reference),
        progress=False,
    )
    with pytest.raises(LogitcacheError, match=r"cannot save epoch 2 .* No space left on device \(epochs 1-1 are saved"):
        lc.train(cfg)
    assert not list((tmp_path / "run").glob("*.partial"))
    monkeypatch.undo()
    resumed = lc.train(lc.TrainConfig(**{**vars(cfg), "resume": True}))
    assert [m["epoch"] for m in resumed.metrics] == [1, 2]


def test_two_concurrent_resumes_into_one_new_store_give_the_right_store(tmp_path, reference):
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "logitcache", *BUILD, "--out", str(out), "--resume"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    # Both may finish, or the later one may find a store being created and say so; never a wrong store.
    assert 0 in codes, results
    if codes != [0, 0]:
        _cli(*BUILD, "--out", out, "--resume", check=True)
    assert _bytes(out) == _bytes(reference)


@pytest.mark.smoke  # a training killed and resumed end to end
def test_train_killed_mid_epoch_twice_resumes_to_the_same_weights(reference, tmp_path):
    from safetensors.torch import load_file

    args = [*TRAIN, "--cache", reference, "--epochs", "4", "--workers", "0", "--seed", "3"]
    _cli(*args, "--out", tmp_path / "whole", check=True)
    run = tmp_path / "killed"
    for epochs_done, extra in ((1, []), (3, ["--resume"])):
        proc = subprocess.Popen(
            [sys.executable, "-m", "logitcache", *map(str, args), "--out", str(run), *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while proc.poll() is None and _epochs(run) < epochs_done:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # right after an epoch was saved: the next one is in flight
        proc.wait()
        assert proc.returncode == -9 and epochs_done <= _epochs(run) < 4
    _cli(*args, "--out", run, "--resume", check=True)
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _epochs(run):
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def _tiny():
    import helpers

    return helpers.tiny_dataset()


def _heavy():
    import helpers

    return helpers.heavy_augment()
