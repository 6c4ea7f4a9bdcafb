"""Benchmark 5, scaling: build time, store size and read time against dataset size and number of classes.

Teachers are small-resnet8 networks with 10 or 100 outputs (random weights: cost does not depend on them) over real
Fashion-MNIST images; one view, `full` and `topk` (k=10) encodings.
"""

from __future__ import annotations

import argparse

import torch
from rich.table import Table

from _common import OUT, fashion_mnist, record, show, timed
from logitcache import build_cache, specs, to_probs
from logitcache.models import SmallResNet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="10000,30000,60000")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a few seconds' smoke run (256 and 512 samples), not recorded")
    args = ap.parse_args()
    sizes = [256, 512] if args.quick else [int(s) for s in args.sizes.split(",")]
    table = Table(title="scaling: one view, small-resnet8 teacher, Fashion-MNIST images")
    for col in (
        "samples",
        "classes",
        "encoding",
        "build s",
        "build samples/s",
        "store bytes",
        "bytes/sample",
        "read+decode s",
        "read samples/s",
    ):
        table.add_column(col, justify="right")
    for classes in (10, 100):
        torch.manual_seed(0)
        teacher = SmallResNet(8, 16, 1, classes).eval()
        for n in sizes:
            ds = fashion_mnist(n)
            tf, _ = specs.resolve_augment("pad-crop-flip", ds)
            for enc in ("full", "topk"):
                box = {}
                secs = timed(
                    lambda: box.setdefault(
                        "c",
                        build_cache(
                            teacher,
                            ds,
                            OUT / "scaling" / f"{classes}-{n}-{enc}",
                            augment=tf,
                            views=1,
                            encoding=enc,
                            k=10,
                            workers=args.workers,
                            overwrite=True,
                            progress=False,
                        ),
                    )
                )
                cache = box["c"]
                size = sum(cache.group[f].nbytes_stored() for f in cache.field_names)
                read = timed(lambda: to_probs(cache.read(0), cache=cache))
                table.add_row(
                    f"{n:,}",
                    str(classes),
                    enc,
                    f"{secs:.1f}",
                    f"{n / secs:,.0f}",
                    f"{size:,}",
                    f"{size / n:.1f}",
                    f"{read:.3f}",
                    f"{n / read:,.0f}",
                )
    record("Scaling (bench_scaling.py)", show(table), args.quick)


if __name__ == "__main__":
    main()
