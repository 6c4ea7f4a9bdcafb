"""PROTOTYPE (benchmarks only, not part of logitcache): ``topk8`` whose unstored classes share the tail's mass in
the shape the teacher usually gives them, instead of equally.

The shape comes from a probe before the build: the teacher's mean log-probability of every class over the probe's
samples whose top-1 class is c (a C x C table; the probe's overall mean for a class never top-1). Decoding at T keeps
the top k and the tail's softened mass exactly as ``topk8`` does and spreads that mass over the C - k unstored
classes in proportion to ``exp(table[top-1] / T)``. A real format would store the table once per cache (C x C float16:
20 KB at 100 classes); this prototype copies each sample's row into a per-sample ``prior`` field so that it runs on the
unchanged read path, so its bytes per sample are NOT the format's: the benchmark reports ``topk8``'s plus the table.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from logitcache.encoding import CompactTopKEncoding, Field, Option, TopKEncoding, register
from logitcache.encoding.base import num_classes_of


def probe_table(log_probs: Tensor) -> Tensor:
    """Mean log-probability of each class given the top-1 class, ``[C, C]``, from a probe's teacher log-probs."""
    num_classes = log_probs.shape[1]
    top1 = log_probs.argmax(1)
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64).index_add_(0, top1, log_probs.double())
    counts = torch.bincount(top1, minlength=num_classes).double()[:, None]
    overall = log_probs.double().mean(0, keepdim=True).expand(num_classes, -1)
    return torch.where(counts > 0, sums / counts.clamp(min=1), overall).float()


@register
class PriorTailPrototype(CompactTopKEncoding):
    name = "topk8prior"
    summary = "PROTOTYPE: topk8 with the tail shaped by a per-class table"
    options = {**CompactTopKEncoding.options, "probe": Option(4096, "samples of view 0 the table is taken from")}
    field_names = CompactTopKEncoding.field_names | {"prior"}
    table: Tensor | None = None  # set by the benchmark before the build

    def fields(self) -> dict[str, Field]:
        return {**super().fields(), "prior": Field((self.num_classes,), np.dtype("float16"))}

    def encode(self, logits: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        top1 = logits.argmax(1)
        return {**super().encode(logits), "prior": type(self).table[top1].to(torch.float16)}

    @staticmethod
    def log_probs(targets: dict[str, Tensor], temperature: float) -> Tensor:
        head = CompactTopKEncoding.as_topk(targets)
        ids = head["ids"]
        rest = num_classes_of(targets) - ids.shape[-1]
        total = TopKEncoding.softened_tail(head, rest, temperature)  # log sum over the tail of p^(1/T)
        shape = (targets["prior"].float() / temperature).scatter(-1, ids, float("-inf"))
        tail = shape - torch.logsumexp(shape, dim=-1, keepdim=True) + total[..., None]
        return torch.log_softmax(tail.scatter(-1, ids, head["logprobs"] / temperature), dim=-1)

    @classmethod
    def kl(cls, student_logits: Tensor, targets: dict[str, Tensor], temperature: float, tail: str) -> Tensor:
        log_p = cls.log_probs(targets, temperature)
        log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(1)

    def flat_tail_share(self, targets: dict[str, Tensor], temperature: float) -> float | None:
        return None
