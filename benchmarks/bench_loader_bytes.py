"""How many bytes does a batch of cached targets carry from the DataLoader's workers, and what do they cost?

SYNTHETIC DATA, simulating an ImageNet-sized read path: N samples (200,000 by default) at 1000 classes, small
synthetic images (3x32x32 uint8, decoded to float32 by the augmentation) and a random linear teacher over pooled
pixels, cached with the default encoding (``auto``: ``topk8`` with its tail table at 1000 classes), 2 views. No
accuracy is measured here; the images are kept cheap so that the targets' share of the loader's cost shows.

One shuffled epoch at a time through a DataLoader (2 workers, batch 256, a fresh loader per epoch, the dataset's
default read path: the epoch's view in shared memory, the next one read in the background) reports:

(a) bytes per sample sent from the workers for the targets: the nbytes of the target tensors of every batch that
    arrives in the main process, divided by the samples served, against the stored bytes per sample of the
    encoding's fields (uncompressed, from ``cache.encoding.fields()``); target: within 2x of the stored bytes. The
    batch carries the stored fields (plus ``tail_row``, the row of the tail table each sample decodes with); the
    loss expands them on the device (``lc.kd_loss(logits, targets, cache=ds)``), which is checked on one batch.
(b) the throughput of the cached-KD loader against an images-only loader (``ReplayDataset``) over the same images
    and the same shuffled order, side by side: the arms alternate in rotating order, medians of --reps epochs each;
    target >= 0.95.
(c) what a worker spends per batch, in one process with the arms alternating batch by batch (less exposed to a
    shared machine's drift than whole epochs): a batch of images, of images with targets, and the targets alone.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path

import torch
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, default_collate

from _common import OUT, console, interleaved, median, record, show, target_bytes
from logitcache import CachedKDDataset, ReplayDataset, build_cache, kd_loss, open_cache

POOL = 4096  # distinct synthetic images; sample i shows image i % POOL


class SyntheticImages(Dataset):
    """N samples of 3x32x32 uint8 images (a pool of POOL distinct random ones), labels = index % C."""

    def __init__(self, n: int, classes: int):
        g = torch.Generator().manual_seed(0)
        self.pool = torch.randint(0, 256, (min(n, POOL), 3, 32, 32), dtype=torch.uint8, generator=g)
        self.n, self.classes = n, classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.pool[i % len(self.pool)], i % self.classes


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


def teacher(classes: int) -> nn.Module:
    """A random linear teacher over 4x4-pooled, standardised pixels: varied top classes, logits' spread about 3."""
    torch.manual_seed(0)
    linear = nn.Linear(48, classes)
    with torch.no_grad():
        linear.weight.mul_(5.0)
    return nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.LayerNorm(48, elementwise_affine=False), linear).eval()


def built(args, out):
    """The synthetic store, built once and reused while its size matches."""
    path = out / f"auto-{args.samples}x{args.classes}-v{args.views}"
    existing = open_cache(path) if (path / "zarr.json").is_file() else None
    if existing is None or not existing.is_complete or existing.num_samples != args.samples:
        t0 = time.perf_counter()
        shutil.rmtree(path, ignore_errors=True)
        build_cache(
            teacher(args.classes), SyntheticImages(args.samples, args.classes), path, augment=to_float,
            views=args.views, batch_size=1024, chunk_rows=1024, workers=args.workers, progress=False,
        )  # fmt: skip
        console.print(f"[dim]built {path} in {time.perf_counter() - t0:.0f} s")
    return open_cache(path)


def fields_bytes(cache) -> int:
    """Bytes of the chunk files of the encoding's fields alone (``target_bytes`` less the table)."""
    root = Path(cache.path)
    return sum(f.stat().st_size for n in cache.field_names for f in (root / n / "c").rglob("*") if f.is_file())


def worker_cost(kd: CachedKDDataset, images: ReplayDataset, args) -> str:
    """(c) What a worker does per batch, timed in this process with the arms alternating batch by batch (so that
    a shared machine's drift hits both alike): fetch and collate a batch of images, of images with targets, and the
    targets alone."""
    view = kd.view_of(kd.epoch)
    images.set_epoch(kd.epoch)
    order = torch.randperm(len(kd), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[i : i + args.batch] for i in range(0, len(order) - args.batch + 1, args.batch)][: args.batches]
    arms = {
        "images only": lambda b: default_collate([images[i] for i in b]),  # a DataLoader's fetch for a plain dataset
        "cached KD": lambda b: default_collate(kd.__getitems__(b)),  # its batched fetch
        "targets alone": lambda b: kd.cached_targets(b, view),
    }
    seconds = {name: 0.0 for name in arms}
    for k, b in enumerate(batches):
        names = list(arms)[k % 3 :] + list(arms)[: k % 3]
        for name in names:
            t = time.perf_counter()
            arms[name](b)
            seconds[name] += time.perf_counter() - t
    table = Table(title=f"(c) a worker's cost per batch of {args.batch}: {len(batches)} batches in one process, "
                  "arms alternating batch by batch")  # fmt: skip
    for col in ("fetch + collate", "ms / batch", "time / images only"):
        table.add_column(col, justify="right")
    for name, s in seconds.items():
        ratio = f"{s / seconds['images only']:.3f}x" if name != "targets alone" else "-"
        table.add_row(name, f"{1e3 * s / len(batches):.2f}", ratio)
    share = seconds["targets alone"] / seconds["cached KD"]
    line = (
        f"the targets (read from the shared view, completed for the wire, packed) are {100 * share:.1f}% of a "
        "cached-KD worker's time per batch"
    )
    console.print(line)
    return show(table) + "\n" + line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5, help="epochs per arm (medians)")
    ap.add_argument("--batches", type=int, default=200, help="batches of the per-batch cost (c)")
    ap.add_argument("--quick", action="store_true", help="a few seconds' smoke run (2,048 samples), not recorded")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.reps, args.batches = 2048, 1, 8

    cache = built(args, OUT / "loader-bytes")
    load_start = os.getloadavg()[0]
    encoding = cache.encoding
    base = SyntheticImages(args.samples, args.classes)
    images = ReplayDataset(base, to_float, num_views=args.views)
    kd = CachedKDDataset(base, cache, augment=to_float)
    kd.set_epoch(0)  # the first view's fill, once, before any timing (a training run does it before its first step)

    seen: dict[str, int] = {}  # target bytes per field over one KD epoch
    # per epoch: (samples, target bytes, image bytes, bytes of the targets' shared-memory segments)
    totals: dict[str, list[tuple[int, int, int, int]]] = {"kd": [], "images": []}
    first: list = []

    def epoch(ds, arm: str, rep: int) -> float:
        sampler = RandomSampler(range(len(ds)), generator=torch.Generator().manual_seed(rep))
        loader = DataLoader(ds, batch_size=args.batch, sampler=sampler, num_workers=args.workers)
        samples = target = image = buffers = 0
        start = time.perf_counter()
        ds.set_epoch(rep)
        for batch in loader:
            n = len(batch[0])
            samples += n
            image += batch[0].nbytes
            if arm == "kd":
                targets = batch[2]
                target += sum(t.nbytes for t in targets.values())
                # the shared-memory segments the targets arrived in (labels folded in, each field 8-byte aligned)
                storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in targets.values()}
                buffers += sum(storages.values())
                if not seen:
                    seen.update({name: t.nbytes // n for name, t in targets.items()})
                if not first:
                    first.append(batch)
        seconds = time.perf_counter() - start
        totals[arm].append((samples, target, image, buffers))
        return samples / seconds

    order: dict[str, int] = {}  # runs so far per arm: repetition r of either arm is epoch r, the same order and view

    def arm(name: str):
        def run() -> float:
            order[name] = order.get(name, 0) + 1
            return epoch(kd if name == "kd" else images, name, order[name])

        return run

    rates = interleaved({"images": arm("images"), "kd": arm("kd")}, args.reps)

    # (a) bytes
    samples, target, image, buffers = totals["kd"][0]
    assert all(t == totals["kd"][0] for t in totals["kd"]), totals["kd"]
    fields = encoding.fields()
    stored_of = {name: math.prod(f.shape) * f.dtype.itemsize for name, f in fields.items()}
    stored = sum(stored_of.values())
    wire = target / samples
    ratio = wire / stored
    everything = target_bytes(cache)  # the fields' chunks and the tail table's
    table_bytes = everything - fields_bytes(cache)
    on_disk = (everything - table_bytes) / (cache.num_samples * cache.num_views)
    dense = 4 * args.classes

    images_, labels, targets = first[0]
    student = torch.randn(len(labels), args.classes, generator=torch.Generator().manual_seed(0))
    loss = float(kd_loss(student, targets, temperature=2.0, cache=kd))

    title = (
        f"(a) target bytes per sample sent from the workers: SYNTHETIC {args.samples:,} samples x {args.classes} "
        f"classes (an ImageNet-sized read path), encoding auto = {encoding.name}"
        + (" with its tail table" if encoding.table_shape() else "")
        + f" (k={getattr(encoding, 'k', '-')}), one shuffled epoch, {args.workers} workers, batch {args.batch}"
    )
    table = Table(title=title)
    for col in ("field", "dtype x shape", "stored B/sample", "sent B/sample"):
        table.add_column(col, justify="right")
    for name in sorted(set(stored_of) | set(seen), key=lambda n: (n not in stored_of, n)):
        f = fields.get(name)
        spec = f"{f.dtype} x {tuple(f.shape)}" if f is not None else "(per-sample extra)"
        table.add_row(name, spec, str(stored_of.get(name, "-")), str(seen.get(name, "-")))
    table.add_row("total", "", f"{stored}", f"{wire:.1f}")
    text = show(table)
    lines = [
        f"targets sent from the workers: {wire:.1f} B/sample (the nbytes of each batch's target tensors / its samples,"
        f" over {samples:,} samples); stored fields, uncompressed: {stored} B/sample",
        f"sent / stored: {ratio:.3f}x (target <= 2x: {'met' if ratio <= 2 else 'NOT met'})",
        f"shared-memory segments of the targets: {buffers / samples:.1f} B/sample (labels folded in, 8-byte aligned)",
        f"on disk, compressed: {on_disk:.1f} B/sample, and the tail table once per cache ({table_bytes / 2**20:.1f} "
        f"MiB); a dense [{args.classes}] float32 row would be {dense:,} B/sample",
        f"images sent: {image / samples:,.0f} B/sample (3x32x32 float32): the targets are "
        f"{100 * wire / (wire + image / samples):.2f}% of a batch's bytes",
        f"KD loss on one batch (lc.kd_loss(..., cache=ds), T=2, random student): {loss:.4f}",
    ]
    for line in lines:
        console.print(line)
    text += "\n" + "\n".join(lines) + "\n"

    # (b) throughput
    table = Table(
        title=f"(b) loader throughput: SYNTHETIC {args.samples:,} x {args.classes}, {args.workers} workers, batch "
        f"{args.batch}, one shuffled epoch per run, arms alternating, medians of {args.reps}"
    )
    for col in ("loader", "samples/s", "ratio", "all runs (samples/s)"):
        table.add_column(col, justify="right")
    names = {"images": "images only (ReplayDataset)", "kd": "cached KD (CachedKDDataset)"}
    base_rate = median(rates["images"])
    for key, xs in rates.items():
        table.add_row(names[key], f"{median(xs):,.0f}", f"{median(xs) / base_rate:.3f}x",
                      ", ".join(f"{x:,.0f}" for x in xs))  # fmt: skip
    text += "\n" + show(table)
    speed = median(rates["kd"]) / base_rate
    line = f"cached KD / images only: {speed:.3f}x (target >= 0.95x: {'met' if speed >= 0.95 else 'NOT met'})"
    console.print(line)
    text += "\n" + line
    text += "\n\n" + worker_cost(kd, images, args)
    load_end = os.getloadavg()[0]
    load = f"load average (1 min) at the start / end: {load_start:.1f} / {load_end:.1f} on {os.cpu_count()} cores"
    console.print(load)
    text += "\n" + load
    kd.close()
    record("Bytes a batch carries, synthetic (bench_loader_bytes.py)", text, args.quick)


if __name__ == "__main__":
    main()
