"""Benchmark 8, the read path at ImageNet scale (issue 15). A simulation that isolates the read path, and says so.

SYNTHETIC DATA: N tiny 1x4x4 images and a random linear teacher over C classes, so that images cost almost nothing
and the loader's speed is the targets' read path alone. No accuracy is measured here.

For each store variant (encoding, views) three read paths are timed in one DataLoader setting (2 workers, batch 256,
persistent workers) against the same loader without targets (`ReplayDataset`, the "images only" rate):
  - shuffled + chunk LRU: a global shuffle, targets read by whole chunks into each worker's 512 MB LRU (the read path
    before issue 15; once a view exceeds the LRU each chunk is decoded again for almost every sample it serves);
  - shared view:  the epoch's view read once, sequentially, into memory shared by the workers (`set_epoch`), then a
    global shuffle (what `train` does when the view fits --target-memory-mb);
  - chunk shuffle: `ChunkShuffleSampler` (window 8 chunks) with the chunk LRU (what `train` does when it does not).
Recorded per path: loader rate and ratio to images only, read amplification (rows decoded from the store / rows
served), time to the first batch (the view's fill included), peak RSS of a worker and the node's proportional memory
(PSS of the main process and its workers). Slow paths are timed on their first `--batches` batches; the others on a
whole epoch. Then an extrapolation to ImageNet-21k from the measured decode rate.

Object store: the same read paths against a real S3 server (moto on loopback), counting the GET requests and bytes
one epoch sends; a small chunk LRU stands in for a view larger than memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import torch
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from _common import OUT, console, record, show
from logitcache import CachedKDDataset, ReplayDataset, build_cache, open_cache
from logitcache.sampler import ChunkShuffleSampler


class TinyImages(Dataset):
    """N synthetic 1x4x4 images (uint8), labels = index % C: the cheapest possible images."""

    def __init__(self, n: int, classes: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)
        self.targets = (torch.arange(n) % classes).tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


def teacher(classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, classes))


def memory(pids: list[int]) -> tuple[float, float]:
    """(largest peak RSS among ``pids[1:]`` (the workers), sum of PSS over all ``pids``), in MiB."""
    peak, pss = 0.0, 0.0
    for k, pid in enumerate(pids):
        try:
            status = open(f"/proc/{pid}/status").read()
            rollup = open(f"/proc/{pid}/smaps_rollup").read()
        except OSError:
            continue
        hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
        pss += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")) / 1024
        if k:
            peak = max(peak, hwm / 1024)
    return peak, pss


def run_loader(ds, sampler, epoch: int, max_batches: int | None, workers: int) -> dict:
    loader = DataLoader(ds, batch_size=256, sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
    start = time.perf_counter()
    ds.set_epoch(epoch)  # the shared view's fill happens here
    fill = time.perf_counter() - start
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    it = iter(loader)
    served = len(next(it)[0])
    first = time.perf_counter() - start
    for b, batch in enumerate(it, start=1):
        served += len(batch[0])
        if max_batches and b + 1 >= max_batches:
            break
    seconds = time.perf_counter() - start
    pids = [os.getpid()] + [w.pid for w in getattr(it, "_workers", [])]
    peak, pss = memory(pids)
    del it, loader
    return {"rate": served / seconds, "first": first, "fill": fill, "served": served, "peak": peak, "pss": pss}


S3_BUCKET = "logitcache-bench"


def s3_child(args) -> None:
    """In a child process whose environment points fsspec at the server: build the store, or read one epoch."""
    url = f"s3://{S3_BUCKET}/scale-{args.s3_child}"
    ds = TinyImages(args.samples, args.classes)
    if args.s3_child == "build":
        build_cache(teacher(args.classes), ds, url, augment=to_float, views=1, encoding="topk", k=10,
                    batch_size=4096, chunk_rows=1024, workers=0, progress=False)  # fmt: skip
        return
    cache = open_cache(f"s3://{S3_BUCKET}/scale-build")
    kw = {"shared view": {}, "shuffled + chunk LRU": dict(memory_mb=0),
          "shuffled + small LRU": dict(memory_mb=0, max_cache_mb=1)}[args.s3_path]  # fmt: skip
    kd = CachedKDDataset(ds, cache, augment=to_float, **kw)
    limit = 20 if "small" in args.s3_path else None  # thrashing: about one download per sample, so a sample of it
    r = run_loader(kd, RandomSampler(range(len(ds)), generator=torch.Generator().manual_seed(0)), 0, limit, 2)
    print(json.dumps({"rate": r["rate"], "rows_read": int(kd.rows_read.sum()), "served": r["served"]}))


def s3_requests(args) -> str:
    """GET requests and bytes per epoch per read path, against moto in server mode on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = OUT / "scale" / "moto.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # fmt: skip
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
        for _ in range(100):
            try:
                client.create_bucket(Bucket=S3_BUCKET)
                break
            except Exception:
                time.sleep(0.1)
        base = [sys.executable, __file__, "--samples", str(args.samples), "--classes", str(args.classes)]
        subprocess.run(base + ["--s3-child", "build"], env=env, check=True)
        objects = client.list_objects_v2(Bucket=S3_BUCKET, Prefix="scale-build/")
        stored = sum(o["Size"] for o in objects.get("Contents", []))
        table = Table(title=f"object store (moto S3 on loopback), SYNTHETIC {args.samples:,} x {args.classes}, topk "
                      f"k=10, one view: {objects.get('KeyCount', 0)} objects, {stored / 2**20:.1f} MiB")  # fmt: skip
        for col in ("path", "GET requests / epoch", "per chunk of the view", "read ampl.", "rate /s"):
            table.add_column(col, justify="right")
        chunks = -(-args.samples // 1024)
        for path in ("shuffled + chunk LRU", "shuffled + small LRU", "shared view"):
            before = open(log).read().count('"GET /')
            out = subprocess.run(base + ["--s3-child", "read", "--s3-path", path], env=env, check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
            result = json.loads(out.strip().splitlines()[-1])
            per_epoch = args.samples / result["served"]  # the small-LRU path is timed on its first 20 batches
            gets = (open(log).read().count('"GET /') - before) * per_epoch
            label = path + (
                " (1 MB: a view larger than memory; 20 batches, scaled to an epoch)" if per_epoch > 1 else ""
            )
            amplification = result["rows_read"] / result["served"]
            table.add_row(label, f"{gets:,.0f}", f"{gets / chunks:.1f}", f"{amplification:.2f}",
                          f"{result['rate']:,.0f}")  # fmt: skip
        return show(table)
    finally:
        server.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1_281_167, help="ImageNet-1k's training set")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=60, help="batches timed on the slow (shuffled LRU) path")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--variants", default="topk:1,quantized:1,full:1,full:2")
    ap.add_argument("--s3-samples", type=int, default=100_000, help="samples of the object-store measurement")
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run, not recorded")
    ap.add_argument("--s3-child", help=argparse.SUPPRESS)
    ap.add_argument("--s3-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.s3_child:
        return s3_child(args)
    if args.quick:
        args.samples, args.classes, args.batches, args.variants = 20_000, 100, 10, "topk:1,full:2"
        args.s3_samples = 5_000
    out = OUT / "scale"
    ds = TinyImages(args.samples, args.classes)
    net = teacher(args.classes)
    plain = ReplayDataset(ds, to_float)
    table = Table(title=f"read path, SYNTHETIC {args.samples:,} x {args.classes} classes, {args.workers} workers")
    for col in ("store", "on disk", "path", "rate /s", "ratio", "read ampl.", "1st batch s", "worker MiB", "node MiB"):
        table.add_column(col, justify="right")
    decode = []  # (decoded bytes, seconds) of the shared view's fills: the per-byte cost of the extrapolation
    for variant in args.variants.split(","):
        encoding, views = variant.split(":")
        path = out / f"{encoding}-{views}"
        t0 = time.perf_counter()
        existing = open_cache(path) if (path / "zarr.json").is_file() else None
        same = existing is not None and (existing.num_samples, existing.num_classes) == (args.samples, args.classes)
        if not same or not existing.is_complete:
            shutil.rmtree(path, ignore_errors=True)
            build_cache(
                net, ds, path, augment=to_float, views=int(views), encoding=encoding, k=10, batch_size=4096,
                chunk_rows=1024, workers=args.workers, progress=False,
            )  # fmt: skip
            console.print(f"[dim]built {variant} in {time.perf_counter() - t0:.0f} s")
        cache = open_cache(path)
        on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        label = f"{encoding} x{views} view{'s' if int(views) > 1 else ''}"
        epoch = int(views) - 1  # the last view: with several views the fill happens at each epoch's start
        images = run_loader(plain, RandomSampler(range(len(ds)), generator=torch.Generator().manual_seed(0)),
                            epoch, None, args.workers)  # fmt: skip
        paths = {
            "shuffled + chunk LRU": (dict(memory_mb=0), "random", args.batches),
            "shared view": (dict(), "random", None),
            "chunk shuffle": (dict(memory_mb=0), "chunks", None),
        }
        for name, (kw, order, limit) in paths.items():
            kd = CachedKDDataset(ds, cache, augment=to_float, **kw)
            sampler = (
                RandomSampler(range(len(ds)), generator=torch.Generator().manual_seed(0))
                if order == "random"
                else ChunkShuffleSampler(len(ds), cache.chunk_rows, window=8, seed=0)
            )
            r = run_loader(kd, sampler, epoch, limit, args.workers)
            if name == "shared view":
                decode.append((cache.view_nbytes(), r["fill"]))
            amplification = int(kd.rows_read.sum()) / r["served"]
            table.add_row(
                label, f"{on_disk / 2**20:,.0f} MiB", name + ("" if limit is None else f" (first {limit} batches)"),
                f"{r['rate']:,.0f}", f"{r['rate'] / images['rate']:.2f}", f"{amplification:.2f}", f"{r['first']:.2f}",
                f"{r['peak']:,.0f}", f"{r['pss']:,.0f}",
            )  # fmt: skip
            del kd
        table.add_row(label, "", "images only (no targets)", f"{images['rate']:,.0f}", "1.00", "-",
                      f"{images['first']:.2f}", f"{images['peak']:,.0f}", f"{images['pss']:,.0f}")  # fmt: skip
    text = show(table)
    nbytes, seconds = map(sum, zip(*decode))
    rate = nbytes / seconds  # decoded bytes per second of a sequential fill (read, decompress, digest check, copy)
    extra = Table(title=f"extrapolation to ImageNet-21k (14.2 M images, 21,841 classes) at {rate / 2**30:.2f} GiB/s")
    for col in ("encoding", "view (decoded)", "fits 4 GiB/rank?", "path", "fill per epoch"):
        extra.add_column(col, justify="right")
    n21, c21 = 14_197_122, 21_841
    for enc, per_sample in (("topk k=10", 10 * 2 + 10 * 2 + 4 + 6), ("quantized", c21 + 4), ("full", 2 * c21)):
        view = n21 * per_sample
        fits = view <= 4 * 2**30
        extra.add_row(
            enc, f"{view / 2**30:,.1f} GiB", "yes" if fits else "no", "shared view" if fits else "chunk shuffle",
            f"{view / rate:,.0f} s" if fits else "-",
        )  # fmt: skip
    text += "\n" + show(extra)
    record("Read path at scale, synthetic (bench_scale.py)", text, args.quick)
    try:
        import moto.server  # noqa: F401  (the test extra installs it)
    except ImportError:
        console.print("object store: not measured (moto is not installed)")
        return
    text = s3_requests(argparse.Namespace(samples=args.s3_samples, classes=args.classes))
    record("Read path at scale: object store requests, synthetic (bench_scale.py)", text, args.quick)


if __name__ == "__main__":
    main()
