import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Under pytest-xdist (-n N) each worker takes its share of the cores, so N workers never oversubscribe them; the
# commands a test runs (in this process or in processes of their own) take the same share through OMP_NUM_THREADS.
# The xdist controller imports this file first, and its workers inherit its environment: a value this file set
# (marked) is replaced by each worker's share; only a value set before pytest started is kept. It is set before torch
# is imported, so that torch's thread pools are made at that size.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if "OMP_NUM_THREADS" not in os.environ or os.environ.get("LOGITCACHE_TESTS_SET_THREADS") == "1":
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORKERS))
    os.environ["LOGITCACHE_TESTS_SET_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import helpers  # noqa: E402

import logitcache as lc  # noqa: E402

HELPERS = str(Path(__file__).parent / "helpers.py")


def cli_build_args(chunk_rows: int, workers: int) -> list[str]:
    """`logitcache build` options for the tiny dataset and heavy augmentation; tests add --teacher and --out."""
    return [
        "build",
        "--dataset",
        f"{HELPERS}:tiny_dataset",
        "--augment",
        f"{HELPERS}:heavy_augment",
        "--views",
        "2",
        "--encoding",
        "topk",
        "--k",
        "3",
        "--batch-size",
        "16",
        "--chunk-rows",
        str(chunk_rows),
        "--workers",
        str(workers),
        "-q",
    ]


@pytest.fixture(scope="session")
def tiny():
    return helpers.tiny_dataset()


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory, tiny):
    """A complete top-k cache of the tiny dataset: 3 views, chunks of 64 rows (4 chunks per view)."""
    out = tmp_path_factory.mktemp("cache") / "c"
    lc.build_cache(
        helpers.tiny_teacher(),
        tiny,
        out,
        augment=helpers.heavy_augment(),
        views=3,
        seed=7,
        k=3,
        batch_size=32,
        chunk_rows=64,
        workers=0,
        progress=False,
        specs={"augment": f"{HELPERS}:heavy_augment", "dataset": f"{HELPERS}:tiny_dataset"},
        encoding="topk",
    )
    return out


def made_once(tmp_path_factory, name: str, make) -> Path:
    """The folder ``name``, filled by ``make(folder)`` once per test session and shared by every xdist worker (the
    workers' temporary folders share a parent): under a file lock, so a second worker waits for the first's result
    instead of making it again beside it. For what tests only read."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            if folder.exists():  # a make that failed: start again
                shutil.rmtree(folder)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory):
    """A real S3-compatible server (moto in server mode) on loopback, and the environment that points fsspec at it."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"  # a file, not a pipe: the server logs every request
    with log.open("w") as err:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    try:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        deadline = time.monotonic() + 120  # a loaded machine starts moto slowly; a dead server fails at once
        while True:
            try:
                client.create_bucket(Bucket="logitcache-test")
                break
            except Exception as e:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the moto S3 server did not start ({e}):\n{log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        yield env
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
