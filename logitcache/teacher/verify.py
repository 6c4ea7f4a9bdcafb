"""``logitcache verify``: re-run the teacher on replayed (view, index) pairs and compare with what is stored.

Catches a different teacher, a different augmentation, a modified chunk (checksum or numbers) and a dataset that
changed order. Every complete unit gets at least one checked pair when ``samples`` >= the number of units, and every
chunk of every field is read once so that checksums are verified everywhere.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from logitcache.teacher.build import teacher_pass
from logitcache.compute import Compute
from logitcache.store.compat import compatibility
from logitcache.datasets import dataset_len
from logitcache.encoding import Encoding
from logitcache.errors import LogitcacheError
from logitcache.augment.mix import mixed_view
from logitcache.specs import recorded_augment, resolve_device
from logitcache.store import Cache, open_cache


@dataclass
class VerifyReport:
    checked: int = 0
    top1_agreement: float = 1.0
    max_abs_diff: float = 0.0
    mean_excess_kl: float = 0.0
    max_excess_kl: float = 0.0
    problems: list[str] = field(default_factory=list)
    first_bad: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)  # what the reader should know, not a failure

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    return (p * (log_p - log_q)).nan_to_num(0.0, posinf=float("inf")).sum(-1)


def _pick_pairs(cache: Cache, samples: int, seed: int) -> list[tuple[int, int]]:
    done = cache.completion()
    units = [(v, c) for v in range(cache.num_views) for c in range(cache.layout.num_chunks) if done[v, c]]
    rng = random.Random(seed)
    rng.shuffle(units)
    pairs = set()
    for i in range(samples if units else 0):
        v, c = units[i % len(units)]
        start, stop = cache.layout.rows(c)
        pairs.add((v, rng.randrange(start, stop)))
    return sorted(pairs)


class _Views(Dataset):
    """The images the teacher labelled for the given (view, sample) pairs, replayed and mixed as at build time."""

    def __init__(self, pairs: list[tuple[int, int]], augment, dataset: Dataset, seed: int, mix) -> None:
        self.pairs, self.augment, self.dataset, self.seed, self.mix = pairs, augment, dataset, seed, mix

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int) -> torch.Tensor:
        v, i = self.pairs[j]
        return mixed_view(self.augment, self.dataset, self.seed, v, i, self.mix)[0]


def verify_cache(
    cache: Cache | str | os.PathLike,
    teacher: nn.Module,
    dataset: Dataset,
    *,
    augment: Callable[[Any], torch.Tensor] | None = None,
    samples: int = 256,
    seed: int = 0,
    atol: float = 0.05,
    kl_tolerance: float = 1e-3,
    device: str = "auto",
    batch_size: int = 64,
    precision: str | None = None,
    channels_last: bool = False,
) -> VerifyReport:
    """Compare stored targets with a fresh teacher pass. ``atol`` bounds the stored numbers' difference,
    ``kl_tolerance`` the extra KL(fresh || stored reconstruction) beyond what the encoding itself loses. The fresh
    pass runs in the precision the store records (a bf16 teacher is compared with itself), unless ``precision``
    names another: the report then notes it, since the two passes differ by that precision's rounding."""
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    meta, report = cache.meta, VerifyReport()
    if dataset_len(dataset) != cache.num_samples:  # nothing can be compared
        raise LogitcacheError(
            f"the dataset has {dataset_len(dataset)} samples but the cache was built on {cache.num_samples}"
        )
    augment = augment if augment is not None else recorded_augment(meta, dataset)
    for mismatch in compatibility(meta, dataset, augment):
        report.problems.append(str(mismatch))
        if mismatch.replay is not None and report.first_bad is None:
            report.first_bad = (mismatch.replay.view, mismatch.replay.index)

    bad_units = _report_storage(cache, report)

    compute = Compute.of(resolve_device(device), precision or meta.precision, channels_last)
    if compute.precision != meta.precision:
        report.notes.append(
            f"the cache was built with a {meta.precision} teacher and this pass runs in {compute.precision}: their "
            f"outputs differ by {compute.precision if meta.precision == 'fp32' else meta.precision} rounding; "
            f"verify with --precision {meta.precision} to compare like with like"
        )
    teacher = compute.model(teacher.eval())
    encoding = cache.encoding
    temperature = encoding.stored_temperature
    mix = cache.mix  # the teacher labelled the mixed images
    pairs = [p for p in _pick_pairs(cache, samples, seed) if (p[0], p[1] // cache.chunk_rows) not in bad_units]
    table = {"table": cache.table()} if encoding.table_shape() is not None else {}
    agree, excess = 0, []
    images = _Views(pairs, augment, dataset, meta.seed, mix)
    fresh_logits = teacher_pass(teacher, images, compute, batch_size=batch_size, host=False)
    for b, logits in zip(range(0, len(pairs), batch_size), fresh_logits):
        batch = pairs[b : b + batch_size]
        stored = {k: t.to(logits.device) for k, t in _gather(cache, batch).items()}
        fresh = cache.wire(encoding.encode(logits, torch.Generator().manual_seed(0), **table))
        on_device = score_batch(encoding, stored, fresh, logits, temperature, cache.decode_table(logits.device))
        scores = {k: t.cpu() for k, t in on_device.items()}  # one copy per batch, after the device's work
        stored, fresh = ({k: t.cpu() for k, t in d.items()} for d in (stored, fresh))
        agree += int(scores["agree"].sum())
        for j, (v, i) in enumerate(batch):
            diff, why = encoding.compare(
                {k: t[j] for k, t in stored.items()}, {k: t[j] for k, t in fresh.items()}, scores["fresh_log_p"][j]
            )
            report.max_abs_diff = max(report.max_abs_diff, diff)
            if not why and diff > atol:
                why = f"stored numbers differ from fresh ones by {diff:.3g} (> {atol})"
            # A deterministic encoding loses the same KL on stored and fresh targets; more means other numbers.
            extra = float(scores["excess"][j]) if encoding.deterministic else 0.0
            excess.append(extra)
            if not why and extra > kl_tolerance:
                why = f"KL(fresh || stored) exceeds the encoding's own loss by {extra:.3g} nats"
            if why:
                report.problems.append(f"view {v}, sample {i}: {why}")
                if report.first_bad is None:
                    report.first_bad = (v, i)
    report.checked = len(pairs)
    report.top1_agreement = agree / len(pairs) if pairs else 0.0
    report.mean_excess_kl = sum(excess) / len(excess) if excess else 0.0
    report.max_excess_kl = max(excess) if excess else 0.0
    return report


def score_batch(
    encoding: Encoding,
    stored: dict[str, torch.Tensor],
    fresh: dict[str, torch.Tensor],
    logits: torch.Tensor,
    temperature: float,
    table: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Stored against fresh targets of one batch, on the logits' device with no host read: whether the top classes
    agree, the excess of KL(fresh || stored) over the encoding's own loss, and the fresh log-probabilities."""
    fresh_log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    stored_log_p = encoding.log_probs(stored, temperature, table)
    fresh_rec = encoding.log_probs(fresh, temperature, table)
    excess = _kl(fresh_log_p, stored_log_p) - _kl(fresh_log_p, fresh_rec)
    return {"agree": fresh_log_p.argmax(1) == stored_log_p.argmax(1), "excess": excess, "fresh_log_p": fresh_log_p}


def verify_storage(cache: Cache | str | os.PathLike) -> VerifyReport:
    """Every chunk of every unit read once and checked (checksums, presence, digests), without the teacher: fast."""
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    report = VerifyReport()
    _report_storage(cache, report)
    report.checked = cache.num_views * cache.layout.num_chunks
    if not cache.has_digests:
        report.problems.append(
            f"format version {cache.meta.format_version} records no per-chunk digests: a missing chunk cannot be "
            "told from zeros; rebuild with --overwrite to get them"
        )
    return report


def _report_storage(cache: Cache, report: VerifyReport) -> set[tuple[int, int]]:
    """Incomplete and damaged units into ``report``; returns them so that no teacher pair is drawn from them."""
    bad = cache.scan()
    report.problems += [f"view {v}, chunk {c}: {why}" if v >= 0 else f"the whole cache: {why}" for v, c, why in bad]
    units = [(v, c) for v, c, _ in bad if v >= 0]
    if units and report.first_bad is None:
        v, c = min(units)
        report.first_bad = (v, cache.layout.rows(c)[0])
    return set(units)


def _gather(cache: Cache, pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The stored targets of ``(view, index)`` pairs, in their order."""
    parts = [(v, cache.take(v, [i for w, i in pairs if w == v])) for v in sorted({v for v, _ in pairs})]
    order = {pair: row for row, pair in enumerate(pairs)}
    out: dict[str, torch.Tensor] = {}
    for v, targets in parts:
        rows = torch.tensor([order[(v, i)] for w, i in pairs if w == v])
        for name, t in targets.items():
            out.setdefault(name, t.new_empty((len(pairs), *t.shape[1:])))[rows] = t
    return out
