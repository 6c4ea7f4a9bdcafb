"""``logitcache inspect``: what a cache holds, what it costs on disk, and what its teacher looks like."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from logitcache.encoding import dense_log_probs
from logitcache.store import COMPLETE, DIGESTS, LABELS, TABLE, Cache, member_array, open_cache


def inspect_cache(cache: Cache | str | os.PathLike, stats_rows: int = 20000) -> dict:
    """A JSON-ready summary. Teacher statistics use the first ``stats_rows`` samples of each view (whole chunks)."""
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    meta = cache.meta
    recorded = meta.to_json()
    done = cache.completion()
    arrays: dict[str, dict[str, Any]] = {}
    table = [TABLE] if cache.encoding.table_shape() is not None else []
    for name in [*cache.field_names, LABELS, *([DIGESTS] if cache.has_digests else []), COMPLETE, *table]:
        arr = member_array(cache.group, name)
        stored = arr.nbytes_stored()
        arrays[name] = {
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "chunks": list(arr.chunks),
            "bytes": int(arr.nbytes),
            "stored_bytes": int(stored),
            "compression_ratio": round(arr.nbytes / stored, 3) if stored else None,
        }
    field_stored = sum(arrays[n]["stored_bytes"] for n in cache.field_names)
    field_raw = sum(arrays[n]["bytes"] for n in cache.field_names)
    entries = cache.encoding.entries()
    summary = {
        "path": cache.path,
        "format_version": meta.format_version,
        "chunk_digests": cache.has_digests,  # version 3: damage to any chunk is detected on read
        "encoding": cache.encoding.name,
        "encoding_params": cache.encoding.params(),
        "codec": meta.codec,
        "values": meta.values,
        "temperature": meta.temperature,
        "num_views": cache.num_views,
        "num_samples": cache.num_samples,
        "num_classes": cache.num_classes,
        "chunk_rows": cache.chunk_rows,
        "inner_chunk_rows": meta.inner_chunk_rows,  # null: not sharded
        "seed": meta.seed,
        "complete": bool(done.all()),
        "completion_per_view": [round(float(row.mean()), 4) for row in done],
        "bytes_on_disk": sum(a["stored_bytes"] for a in arrays.values()),
        "bytes_per_view": round(field_stored / cache.num_views, 1),
        "bytes_per_sample_view": round(field_stored / (cache.num_views * cache.num_samples), 3),
        "bytes_per_kept_entry": round(field_stored / (cache.num_views * cache.num_samples * entries), 4),
        "compression_ratio": round(field_raw / field_stored, 3) if field_stored else None,
        "arrays": arrays,
        "table": recorded.get("table"),  # an encoding's per-cache table (topk8's tail table): its probe and digest
        "teacher": recorded["teacher"],
        "dataset": recorded["dataset"],
        "augment": {"spec": meta.augment.spec, "repr": meta.augment.repr},
        "versions": meta.versions,
        "created": meta.created,
        "views": _teacher_stats(cache, done, stats_rows),
    }
    return summary


def _teacher_stats(cache: Cache, done: np.ndarray, stats_rows: int) -> list[dict]:
    labels = cache.labels()
    has_tail = "tail" in cache.field_names
    flat = cache.encoding.flat_tail_share(cache.read(0, 0, 1), 4.0) is not None
    temperature = cache.encoding.stored_temperature
    out = []
    for view in range(cache.num_views):
        chunks = [c for c in range(cache.layout.num_chunks) if done[view, c]]
        agree = entropy = tail = tail_t4 = 0.0
        rows = 0
        for c in chunks:
            if rows >= stats_rows:
                break
            start, stop = cache.layout.rows(c)
            targets = cache.read(view, start, stop)
            log_p = dense_log_probs(targets, temperature, cache=cache)
            p = log_p.exp()
            agree += float((p.argmax(1) == labels[start:stop]).sum())
            entropy += float(-torch.special.xlogy(p, p).sum())
            if "tail" in targets:
                tail += float(targets["tail"].double().exp().sum())
            # the evenly spread tail's share of the target at T = 4, where top-k loses most
            tail_t4 += (cache.encoding.flat_tail_share(targets, 4.0) or 0.0) * (stop - start)
            rows += stop - start
        out.append(
            {
                "view": view,
                "rows": rows,
                "top1_agreement_with_labels": round(agree / rows, 4) if rows else None,
                "mean_entropy_nats": round(entropy / rows, 4) if rows else None,
                "mean_tail_mass": round(tail / rows, 5) if rows and has_tail else None,
                "mean_tail_mass_t4": round(tail_t4 / rows, 5) if rows and flat else None,
            }
        )
    return out
