"""``build --dry-run``: the store's size and the build's time, estimated from two short probe builds.

Two probes (one and three chunks of view 0) separate fixed costs (worker processes, the first teacher call, the
arrays' metadata documents) from the costs per sample, so a short probe's start-up is not multiplied by the dataset.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from logitcache.teacher.build import build_cache
from logitcache.config import BuildConfig
from logitcache.datasets import Head, dataset_len
from logitcache.store import member_array, open_cache


@dataclass
class BuildEstimate:
    samples: int  # dataset samples x views
    bytes_per_sample: float  # stored target bytes per sample and view, compressed (the probe's)
    seconds_per_sample: float
    startup_seconds: float
    table_bytes: int = 0  # an encoding's per-cache table (topk8's tail table), stored once
    table_probe: int = 0  # teacher passes that fit it, before the build

    @property
    def total_bytes(self) -> float:
        return self.samples * self.bytes_per_sample + self.table_bytes

    @property
    def total_seconds(self) -> float:
        # the table's probe is teacher passes without encoding or writes: a build's per-sample cost bounds it
        return self.startup_seconds + (self.samples + self.table_probe) * self.seconds_per_sample


def estimate_build(
    teacher: nn.Module,
    dataset: Dataset,
    *,
    augment: Callable[[Any], torch.Tensor],
    views: int = BuildConfig.views,
    chunk_rows: int = BuildConfig.chunk_rows,
    **build_kwargs: Any,
) -> BuildEstimate:
    """Estimate what ``build_cache(teacher, dataset, augment=augment, views=views, **build_kwargs)`` will write and
    how long it will take here, from probe builds of the first one and three chunks (nothing is kept)."""
    sizes = sorted({min(dataset_len(dataset), chunk_rows), min(dataset_len(dataset), 3 * chunk_rows)})
    runs = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="logitcache-probe-") as tmp:
            start = time.perf_counter()
            build_cache(
                teacher, Head(dataset, n), f"{tmp}/probe", augment=augment, views=1, chunk_rows=chunk_rows,
                # table_probe: the full build's table probe is counted below, not per sample here
                **{**build_kwargs, "progress": False, "overwrite": False, "resume": False, "repair": False,
                   "table_probe": 1},
            )  # fmt: skip
            seconds = time.perf_counter() - start
            cache = open_cache(f"{tmp}/probe")
            stored = sum(member_array(cache.group, name).nbytes_stored() for name in cache.field_names)
            runs.append((n, seconds, stored))
    enc = cache.encoding
    table = enc.table_shape()
    table_bytes = 2 * math.prod(table) if table else 0  # float16, before compression
    probe = min(dataset_len(dataset), build_kwargs.get("table_probe") or enc.probe_size(dataset_len(dataset)))
    table_probe = probe if table else 0
    (n1, t1, b1), (n2, t2, b2) = runs[0], runs[-1]
    # slopes: the arrays' metadata documents and the start-up are paid once, not per sample
    seconds = max((t2 - t1) / (n2 - n1), 0.0) if n2 > n1 else t1 / n1
    nbytes = max((b2 - b1) / (n2 - n1), 0.0) if n2 > n1 else b1 / n1
    return BuildEstimate(
        dataset_len(dataset) * views, nbytes, seconds, max(0.0, t1 - seconds * n1), table_bytes, table_probe
    )
