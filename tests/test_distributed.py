"""torchrun builds and DDP training (gloo on CPU), and stores on a real S3-compatible server (moto) on loopback."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import logitcache as lc
import helpers
from conftest import HELPERS, cli_build_args

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
BUILD = cli_build_args(chunk_rows=16, workers=1)


def _run(args, nproc=None, env=None, check=True):
    cmd = (
        TORCHRUN + [f"--nproc-per-node={nproc}", "-m", "logitcache"] if nproc else [sys.executable, "-m", "logitcache"]
    ) + args
    # A session of its own, so that a hung run is killed with every rank and DataLoader worker, not just torchrun.
    # torchrun's ranks run one thread each (torchrun's own default, which the suite's OMP_NUM_THREADS would replace)
    threads = {"OMP_NUM_THREADS": "1"} if nproc else {}
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **threads, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(args[:1])} timed out after 300 s:\n{stderr[-3000:]}") from None
    r = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _build_here(args):
    """A single-process reference build, run in this process: a process of its own would only add its start-up."""
    from typer.testing import CliRunner

    from logitcache.cli import app

    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output


def _same_bytes(a, b, ignore=()):
    helpers.assert_same_store(a, b, ignore)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "c"
    _build_here(BUILD + ["--teacher", f"{HELPERS}:tiny_teacher", "--out", str(out)])
    return out


def test_two_rank_build_equals_single_process_bitwise(single, tmp_path):
    out = tmp_path / "two"
    _run(BUILD + ["--teacher", f"{HELPERS}:tiny_teacher", "--out", str(out)], nproc=2)
    _same_bytes(single, out)
    assert lc.open_cache(out).meta.num_views == 2


@pytest.mark.smoke  # a further encoding on the two-rank layout
def test_two_rank_topk8_build_with_its_tail_table_equals_single_process_bitwise(tmp_path):
    # rank 0 alone fits the table (before any unit is written); every rank's units and the table match one process's
    args = BUILD + ["--teacher", f"{HELPERS}:tiny_teacher", "--encoding", "topk8"]
    _build_here(args + ["--out", str(tmp_path / "one")])
    _run(args + ["--out", str(tmp_path / "two")], nproc=2)
    helpers.assert_same_store(tmp_path / "one", tmp_path / "two")  # every array (topk8's tail table and tail_coef)


@pytest.mark.smoke  # a job killed and resumed, on three ranks
def test_three_rank_build_killed_on_one_rank_resumes_to_the_same_bytes(single, tmp_path):
    # rank 1 is killed mid-unit at its fourth teacher call, once the store holds a finished unit of any rank's
    out = tmp_path / "three"
    r = _run(
        BUILD + ["--teacher", f"{HELPERS}:dying_teacher", "--out", str(out)],
        nproc=3,
        env={"DIE_AFTER": "3", "DIE_RANK": "1", "DIE_ONCE_WRITTEN": str(out)},
        check=False,
    )
    assert r.returncode != 0
    done = lc.open_cache(out).completion()
    assert 0 < done.sum() < done.size, done
    _run(
        BUILD + ["--teacher", f"{HELPERS}:dying_teacher", "--out", str(out), "--resume"],
        nproc=2,
        env={"DIE_AFTER": "1000000"},
    )
    _same_bytes(single, out, ignore=("teacher",))  # the dying wrapper: another teacher spec


def test_an_error_on_one_rank_ends_every_rank_with_its_message(tmp_path):
    # Rank 1's teacher returns NaN: rank 1 stops with its one-line error and torchrun stops rank 0 too (the 300 s
    # limit of _run turns a hang into a failure).
    out = tmp_path / "c"
    r = _run(BUILD + ["--teacher", f"{HELPERS}:nan_on_rank1_teacher", "--out", str(out)], nproc=2, check=False)
    assert r.returncode != 0
    assert "error: the teacher produced NaN/inf for view" in r.stderr
    assert "nothing was written for its chunk" in r.stderr
    assert not lc.open_cache(out).is_complete  # what was written is kept, marked for --resume


def test_two_rank_ddp_training_from_the_cache(single, tmp_path):
    out = tmp_path / "run"
    r = _run(
        [
            "train",
            "--out",
            str(out),
            "--dataset",
            f"{HELPERS}:tiny_dataset",
            "--model",
            "small-resnet8-w4",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--workers",
            "2",  # forked while the next view is prefetched: logitcache.read.procs holds that read back during the fork
            "--kd",
            "cached",
            "--cache",
            str(single),
            "-q",
        ],
        nproc=2,
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # written once, by rank 0
    assert r.stdout.count("train loss") == 1  # one summary table
    names = ["checkpoint.safetensors", "config.json", "metrics.jsonl", "model.json", "model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert '"world_size": 2' in (out / "config.json").read_text()
    # the ranks' test shards add up to the whole test set: the recorded accuracy is the saved model's on every test
    # image once. Re-evaluated here shard by shard exactly as the ranks did (every 2nd image, batch 512, one thread
    # each): a single pass with other batches or threads may flip a near-tie prediction by float rounding alone.
    from torch.utils.data import DataLoader, Subset

    from logitcache import specs
    from logitcache.student.loop import evaluate

    test = specs.resolve_dataset(f"{HELPERS}:tiny_dataset", train=False)
    _, eval_tf = specs.resolve_augment(f"{HELPERS}:heavy_augment", test)
    model, threads = specs.resolve_teacher(str(out)), torch.get_num_threads()
    torch.set_num_threads(1)  # what each rank ran with
    try:
        counts = [
            evaluate(
                model,
                DataLoader(Subset(lc.ReplayDataset(test, eval_tf), range(rank, 100, 2)), batch_size=512),
                torch.device("cpu"),
            )
            for rank in (0, 1)
        ]
    finally:
        torch.set_num_threads(threads)
    correct, total = sum(c for c, _ in counts), sum(t for _, t in counts)
    assert total == len(test) == 100
    assert json.loads(lines[-1])["test_accuracy"] == correct / total


@pytest.mark.smoke  # end to end on an object store
def test_build_to_and_train_from_s3(s3_env, single, tmp_path):
    url = "s3://logitcache-test/caches/tiny"
    _run(BUILD + ["--teacher", f"{HELPERS}:tiny_teacher", "--out", url], env=s3_env)
    r = _run(["inspect", url, "--json"], env=s3_env)
    assert '"complete": true' in r.stdout
    run = tmp_path / "from-s3"
    _run(
        [
            "train",
            "--out",
            str(run),
            "--dataset",
            f"{HELPERS}:tiny_dataset",
            "--model",
            "small-resnet8-w4",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--workers",
            "2",
            "--kd",
            "cached",
            "--cache",
            url,
            "-q",
        ],
        env=s3_env,
    )
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    # The remote store holds what a local single-process build holds; DataLoader workers reading it by chunk through
    # their own S3 handles serve exactly the local store's targets.
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from torch.utils.data import DataLoader
        import helpers, logitcache as lc
        from logitcache import specs
        url, local = sys.argv[1], lc.open_cache(sys.argv[2])
        helpers.assert_same_store(url, sys.argv[2])
        ds = lc.CachedKDDataset(specs.resolve_dataset({HELPERS + ":tiny_dataset"!r}), url, memory_mb=0)
        sampler = ds.chunk_sampler(window=1, ring=False)
        ds.set_epoch(1)
        order = list(sampler)
        for b, (_, _, t) in enumerate(DataLoader(ds, batch_size=32, sampler=sampler, num_workers=2)):
            for row, i in enumerate(order[b * 32 : (b + 1) * 32]):
                want = local.read(1, i, i + 1)
                assert all(torch.equal(t[n][row], want[n][0]) for n in t), (b, row)
        assert int(ds.rows_read[1:].sum()) >= len(ds) and int(ds.rows_read[0]) == 0  # the workers read S3
        """
    )
    r = subprocess.run([sys.executable, "-c", code, url, str(single)], env={**os.environ, **s3_env},
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]


def test_control_messages_stay_off_nccl():
    # NCCL rejects CPU tensors: on GPU machines logitcache's own group gets a gloo leg for its CPU control messages,
    # and a user's NCCL-only group gets them on the current CUDA device instead.
    from logitcache import distributed

    assert distributed.default_backend(cuda=False) == "gloo"
    assert distributed.default_backend(cuda=True) == "cpu:gloo,cuda:nccl"
    for backend in ("gloo", "cpu:gloo,cuda:nccl", "mpi"):
        assert distributed.control_device(backend).type == "cpu"
    if torch.cuda.is_available():
        assert distributed.control_device("nccl").type == "cuda"
