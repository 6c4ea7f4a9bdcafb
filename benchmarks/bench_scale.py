"""Benchmark 8, the read path at ImageNet scale. A simulation that isolates the read path, and says so.

SYNTHETIC DATA: N tiny 1x4x4 images and a random linear teacher over C classes, so that images cost almost nothing
and the loader's speed is the targets' read path alone. No accuracy is measured here.

For each store variant (encoding, views) four read paths are timed in one DataLoader setting (2 workers, batch 256,
persistent workers) against the same loader without targets (`ReplayDataset`, the "images only" rate):
  - shuffled + chunk LRU: a global shuffle, targets read by whole chunks into each worker's 512 MB LRU (the old read
    path; once a view exceeds the LRU each chunk is decoded again for almost every sample it serves);
  - shared view:  the epoch's view read once, sequentially, into memory shared by the workers (`set_epoch`), then a
    global shuffle (what `train` does when the view fits --target-memory-mb);
  - chunk shuffle, chunks per worker: `ChunkShuffleSampler` (window 8 chunks) with each worker's chunk LRU (the
    old read path of `train` when the view does not fit: each chunk read once per worker);
  - chunk shuffle + ring: the dataset's own `chunk_sampler()` (window 8 chunks): the main process reads each window
    once into a ring of 3 windows the workers share (what `train` does when the view does not fit).
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
import statistics
import subprocess
import sys
import time

import torch
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from _common import OUT, console, record, show
from logitcache import CachedKDDataset, ReplayDataset, build_cache, open_cache
from logitcache.read.dataset import TargetRow
from logitcache.read.sampler import ChunkShuffleSampler


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


def run_epochs(ds, epochs: int, workers: int) -> dict:
    """Consecutive epochs through one loader (persistent workers), as `train` runs them: overall rate, and the time
    from each `set_epoch` to that epoch's first batch."""
    loader = DataLoader(ds, batch_size=256, sampler=RandomSampler(range(len(ds)), generator=torch.Generator()
                        .manual_seed(0)), num_workers=workers, persistent_workers=workers > 0)  # fmt: skip
    firsts, served, start = [], 0, time.perf_counter()
    for epoch in range(epochs):
        t = time.perf_counter()
        ds.set_epoch(epoch)
        for b, batch in enumerate(loader):
            if b == 0:
                firsts.append(time.perf_counter() - t)
            served += len(batch[0])
    seconds = time.perf_counter() - start
    pids = [os.getpid()] + [w.pid for w in getattr(loader._iterator, "_workers", [])]
    peak, pss = memory(pids)
    del loader
    return {"rate": served / seconds, "firsts": firsts, "pss": pss}


def prefetch_table(args, out) -> str:
    """The shared view with and without reading the next epoch's view in the background, over consecutive epochs."""
    ds = TinyImages(args.samples, args.classes)
    table = Table(title=f"next-view prefetch, SYNTHETIC {args.samples:,} x {args.classes} classes, {args.workers} "
                  f"workers, {args.epochs} epochs through one loader, each epoch a different view")  # fmt: skip
    for col in ("store", "path", "rate /s", "ratio", "1st batch s per epoch", "node MiB"):
        table.add_column(col, justify="right")
    for variant in args.prefetch_variants.split(","):
        encoding, views = variant.split(":")
        cache = open_cache(built(args, out, encoding, int(views)))
        memory_mb = 2.2 * cache.view_nbytes() / 2**20  # two views fit: the same budget for both arms
        arms = {
            "images only": lambda: ReplayDataset(ds, to_float, num_views=int(views)),
            "shared view": lambda: CachedKDDataset(ds, cache, augment=to_float, memory_mb=memory_mb, prefetch=False),
            "shared view + prefetch": lambda: CachedKDDataset(ds, cache, augment=to_float, memory_mb=memory_mb),
        }
        results = {name: [] for name in arms}
        for rep in range(args.reps):  # rotating order: the machine's drift spreads over every arm
            names = list(arms)[rep % 3 :] + list(arms)[: rep % 3]
            for name in names:
                results[name].append(run_epochs(arms[name](), args.epochs, args.workers))
        base = statistics.median(r["rate"] for r in results["images only"])
        for name, rs in results.items():
            rate = statistics.median(r["rate"] for r in rs)
            firsts = [statistics.median(r["firsts"][e] for r in rs) for e in range(args.epochs)]
            table.add_row(f"{encoding} x{views} views", name, f"{rate:,.0f}", f"{rate / base:.2f}",
                          " / ".join(f"{f:.2f}" for f in firsts), f"{max(r['pss'] for r in rs):,.0f}")  # fmt: skip
    return show(table)


class LabelsApart(CachedKDDataset):
    """The old batched fetch: integer labels as plain ints, a segment of their own from each worker."""

    def __getitems__(self, indices):
        view = self.view_of(self.epoch)
        batch = self.cached_targets(indices, view)
        return [(*self.image(i, view), TargetRow(batch, row)) for row, i in enumerate(indices)]


def labels_table(args, out) -> str:
    """Labels folded into the targets' buffer or apart, side by side: steady-state loader rates (after the view's
    fill and the first batch), 400 batches, rotating order, medians."""
    cache = open_cache(built(args, out, "topk", 1))
    ds = TinyImages(args.samples, args.classes)
    arms = {
        "images only": lambda: ReplayDataset(ds, to_float),
        "labels folded (now)": lambda: CachedKDDataset(ds, cache, augment=to_float),
        "labels apart (before)": lambda: LabelsApart(ds, cache, augment=to_float),
    }
    rates = {name: [] for name in arms}
    for rep in range(args.reps):
        for name in list(arms)[rep % 3 :] + list(arms)[: rep % 3]:
            d = arms[name]()
            d.set_epoch(0)
            loader = DataLoader(d, batch_size=256, sampler=RandomSampler(range(len(ds)), generator=torch.Generator()
                                .manual_seed(0)), num_workers=args.workers)  # fmt: skip
            it = iter(loader)
            next(it)
            start, served = time.perf_counter(), 0
            for b, batch in enumerate(it):
                served += len(batch[0])
                if b + 1 == (20 if args.quick else 400):
                    break
            rates[name].append(served / (time.perf_counter() - start))
    table = Table(title=f"labels in the targets' buffer, SYNTHETIC {args.samples:,} x {args.classes}, topk k=10, "
                  f"shared view, {args.workers} workers")  # fmt: skip
    for col in ("path", "rate /s (median)", "ratio", "all runs"):
        table.add_column(col, justify="right")
    base = statistics.median(rates["images only"])
    for name, rs in rates.items():
        rate = statistics.median(rs)
        table.add_row(name, f"{rate:,.0f}", f"{rate / base:.3f}", ", ".join(f"{r:,.0f}" for r in rs))
    return show(table)


def built(args, out, encoding: str, views: int):
    """The synthetic store of (encoding, views), built once and reused while its size matches."""
    path = out / f"{encoding}-{views}"
    existing = open_cache(path) if (path / "zarr.json").is_file() else None
    same = existing is not None and (existing.num_samples, existing.num_classes) == (args.samples, args.classes)
    if not same or not existing.is_complete:
        t0 = time.perf_counter()
        shutil.rmtree(path, ignore_errors=True)
        build_cache(
            teacher(args.classes), TinyImages(args.samples, args.classes), path, augment=to_float, views=views,
            encoding=encoding, k=10, batch_size=4096, chunk_rows=1024, workers=args.workers, progress=False,
        )  # fmt: skip
        console.print(f"[dim]built {encoding}:{views} in {time.perf_counter() - t0:.0f} s")
    return path


S3_BUCKET = "logitcache-bench"


def s3_child(args) -> None:
    """In a child process whose environment points fsspec at the server: build a store, or read one epoch of it."""
    layout = args.s3_layout  # "ROWS" (units of ROWS rows, one object each) or "ROWS/INNER" (each unit a shard)
    url = f"s3://{S3_BUCKET}/scale-{layout.replace('/', '-')}"
    ds = TinyImages(args.samples, args.classes)
    rows, _, inner = layout.partition("/")
    if args.s3_child == "build":
        build_cache(teacher(args.classes), ds, url, augment=to_float, views=1, encoding="topk", k=10,
                    batch_size=4096, chunk_rows=int(rows), inner_chunk_rows=int(inner) if inner else None, workers=0,
                    progress=False)  # fmt: skip
        return
    cache = open_cache(url)
    kw = {"shared view": {}, "shuffled + chunk LRU": dict(memory_mb=0),
          "shuffled + small LRU": dict(memory_mb=0, max_cache_mb=1)}[args.s3_path]  # fmt: skip
    kd = CachedKDDataset(ds, cache, augment=to_float, **kw)
    limit = 20 if "small" in args.s3_path else None  # thrashing: about one download per sample, so a sample of it
    r = run_loader(kd, RandomSampler(range(len(ds)), generator=torch.Generator().manual_seed(0)), 0, limit, 2)
    print(json.dumps({"rate": r["rate"], "rows_read": int(kd.rows_read.sum()), "served": r["served"]}))


def s3_build_here(env: dict, args) -> None:
    """``s3_child``'s build in this process: the server's address and keys put into its fsspec settings and
    environment, as a child's ``env`` would give them."""
    import fsspec.config

    os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "FSSPEC_S3_"))})
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = env["FSSPEC_S3_ENDPOINT_URL"]
    s3_child(args)


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
        table = Table(title=f"object store (moto S3 on loopback), SYNTHETIC {args.samples:,} x {args.classes}, topk "
                      "k=10, one view")  # fmt: skip
        for col in ("store layout", "objects", "MiB", "path", "GET requests / epoch", "read ampl.", "rate /s"):
            table.add_column(col, justify="right")
        plain = "1024"
        # quick: every child imports torch, so one read only, the sharded layout's shared view (the LRU paths' reads
        # are the paths part's, on disk), of a store built here: this process forks no loader workers after it
        for layout in args.s3_layouts if args.quick else (plain, *args.s3_layouts):
            if args.quick:
                s3_build_here(env, argparse.Namespace(s3_child="build", s3_layout=layout, samples=args.samples,
                                                      classes=args.classes))  # fmt: skip
            else:
                subprocess.run(base + ["--s3-child", "build", "--s3-layout", layout], env=env, check=True)
            prefix = f"scale-{layout.replace('/', '-')}/"
            objects = client.list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix, MaxKeys=100_000)
            count, stored = objects.get("KeyCount", 0), sum(o["Size"] for o in objects.get("Contents", []))
            rows, _, inner = layout.partition("/")
            name = f"units of {rows} rows" + (f", each a shard of {inner}-row chunks" if inner else "")
            paths = (
                ("shuffled + chunk LRU", "shuffled + small LRU", "shared view") if layout == plain else ("shared view",)
            )
            for path in paths:
                before = open(log).read().count('"GET /')
                out = subprocess.run(base + ["--s3-child", "read", "--s3-path", path, "--s3-layout", layout], env=env,
                                     check=True, capture_output=True, text=True).stdout  # fmt: skip
                result = json.loads(out.strip().splitlines()[-1])
                per_epoch = args.samples / result["served"]  # the small-LRU path is timed on its first 20 batches
                gets = (open(log).read().count('"GET /') - before) * per_epoch
                label = path + (" (1 MB LRU: a view larger than memory; 20 batches, scaled)" if per_epoch > 1 else "")
                amplification = result["rows_read"] / result["served"]
                table.add_row(name, f"{count:,}", f"{stored / 2**20:.1f}", label, f"{gets:,.0f}",
                              f"{amplification:.2f}", f"{result['rate']:,.0f}")  # fmt: skip
        return show(table)
    finally:
        server.terminate()


def read_paths(args, out) -> None:
    ds = TinyImages(args.samples, args.classes)
    plain = ReplayDataset(ds, to_float)
    table = Table(title=f"read path, SYNTHETIC {args.samples:,} x {args.classes} classes, {args.workers} workers")
    for col in ("store", "on disk", "path", "rate /s", "ratio", "read ampl.", "1st batch s", "worker MiB", "node MiB"):
        table.add_column(col, justify="right")
    decode = []  # (decoded bytes, seconds) of the shared view's fills: the per-byte cost of the extrapolation
    for variant in args.variants.split(","):
        encoding, views = variant.split(":")
        path = built(args, out, encoding, int(views))
        cache = open_cache(path)
        on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        label = f"{encoding} x{views} view{'s' if int(views) > 1 else ''}"
        epoch = int(views) - 1  # the last view: with several views the fill happens at each epoch's start
        images = run_loader(plain, RandomSampler(range(len(ds)), generator=torch.Generator().manual_seed(0)),
                            epoch, None, args.workers)  # fmt: skip
        paths = {
            "shuffled + chunk LRU": (dict(memory_mb=0), "random", args.batches),
            "shared view": (dict(), "random", None),
            "chunk shuffle, chunks per worker": (dict(memory_mb=0), "chunks", None),
            "chunk shuffle + ring": (dict(memory_mb=0), "ring", None),
        }
        for name, (kw, order, limit) in paths.items():
            kd = CachedKDDataset(ds, cache, augment=to_float, **kw)
            if order == "random":
                sampler = RandomSampler(range(len(ds)), generator=torch.Generator().manual_seed(0))
            elif order == "chunks":
                sampler = ChunkShuffleSampler(len(ds), cache.chunk_rows, window=8, seed=0)
            else:  # the dataset's own: its windows read once, in the main process, into the ring
                sampler = kd.chunk_sampler(window=8, seed=0)
            r = run_loader(kd, sampler, epoch, limit, args.workers)
            if name == "shared view":
                decode.append((cache.view_nbytes(), r["fill"]))
            if kd._views is not None:  # the next view's read, started during the epoch, counted once it is done
                kd._views.join()
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
    for col in ("encoding", "view (decoded)", "fits 4 GiB/rank?", "path", "read per epoch, one core"):
        extra.add_column(col, justify="right")
    n21, c21 = 14_197_122, 21_841
    for enc, per_sample in (("topk k=10", 10 * 2 + 10 * 2 + 4 + 6), ("quantized", c21 + 4), ("full", 2 * c21)):
        view = n21 * per_sample
        fits = view <= 4 * 2**30
        # either path reads the view once per epoch and rank (the ring spreads it over the epoch, in the background)
        extra.add_row(
            enc, f"{view / 2**30:,.1f} GiB", "yes" if fits else "no", "shared view" if fits else "chunk shuffle + ring",
            f"{view / rate / 3600:,.1f} h" if view / rate > 3600 else f"{view / rate:,.0f} s",
        )  # fmt: skip
    text += "\n" + show(extra)
    record("Read path at scale, synthetic (bench_scale.py)", text, args.quick)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1_281_167, help="ImageNet-1k's training set")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=60, help="batches timed on the slow (shuffled LRU) path")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--variants", default="topk:1,quantized:1,full:1,full:2")
    ap.add_argument("--prefetch-variants", default="topk:2,full:2", help="stores of the prefetch comparison")
    ap.add_argument("--epochs", type=int, default=3, help="consecutive epochs of the prefetch comparison")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the prefetch comparison (medians)")
    ap.add_argument("--parts", default="paths,labels,prefetch,s3", help="which parts to run and record")
    ap.add_argument("--s3-samples", type=int, default=100_000, help="samples of the object-store measurement")
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run, not recorded")
    ap.add_argument(
        "--s3-layouts",
        type=lambda text: text.split(","),
        default="16384,16384/1024",
        help="store layouts compared with units of 1024 rows: ROWS (units of ROWS rows) or ROWS/INNER (sharded)",
    )
    ap.add_argument("--s3-layout", help=argparse.SUPPRESS)
    ap.add_argument("--s3-child", help=argparse.SUPPRESS)
    ap.add_argument("--s3-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.s3_child:
        return s3_child(args)
    if args.quick:  # every part and path once, small: a check that the script runs and reads what each path promises
        args.samples, args.classes, args.batches, args.variants = 4096, 100, 10, "topk:1,full:2"
        args.s3_samples, args.prefetch_variants, args.epochs, args.reps = 4096, "full:2", 2, 1
        args.s3_layouts = ["2048/1024"]
    out = OUT / "scale"
    if "paths" in args.parts:
        read_paths(args, out)
    if "labels" in args.parts:
        record("Read path at scale: labels in the targets' buffer, synthetic (bench_scale.py)", labels_table(args, out),
               args.quick)  # fmt: skip
    if "prefetch" in args.parts:
        record(
            "Read path at scale: next-view prefetch, synthetic (bench_scale.py)", prefetch_table(args, out), args.quick
        )
    if "s3" not in args.parts:
        return
    try:
        import moto.server  # noqa: F401  (the test extra installs it)
    except ImportError:
        console.print("object store: not measured (moto is not installed)")
        return
    text = s3_requests(argparse.Namespace(samples=args.s3_samples, classes=args.classes, s3_layouts=args.s3_layouts,
                                          quick=args.quick))  # fmt: skip
    record("Read path at scale: object store requests, synthetic (bench_scale.py)", text, args.quick)


if __name__ == "__main__":
    main()
