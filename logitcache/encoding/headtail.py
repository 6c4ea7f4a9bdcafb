"""``headtail``: the exact top k (as ``topk8`` stores them) plus S draws from the rest, so the tail keeps its shape."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from logitcache.errors import LogitcacheError
from logitcache.encoding.base import Encoding, Field, Option, inverse_cdf, steps_of, torch_dtype, uniforms
from logitcache.encoding.topk8 import CompactTopKEncoding, check_layout, compact_id_dtype
from logitcache.encoding.registry import register
from logitcache.encoding.sampled import TAU
from logitcache.encoding.topk import TopKEncoding


def multinomial(probs: Tensor, samples: int, generator: torch.Generator | None, support: int) -> Tensor:
    return inverse_cdf(probs, uniforms(generator, (probs.shape[0], samples), probs.device))


def systematic(probs: Tensor, samples: int, generator: torch.Generator | None, support: int) -> Tensor:
    """``samples`` class ids per row whose counts are unbiased (``E[count_c] = samples * p_c``) with far less noise
    than independent draws: one uniform offset ``u`` and the points ``(u + j) / samples`` on the cumulative
    distribution of the classes sorted by probability, so each class gets ``floor`` or ``ceil`` of its expected
    count, and the draws spread over likely and unlikely classes alike (systematic resampling, as particle filters
    use). ``support``: how many classes can have a non-zero probability (the rest sort last and are never drawn)."""
    p, order = probs.sort(dim=-1, descending=True)
    cdf = p.cumsum(-1)
    u = uniforms(generator, (probs.shape[0], 1), probs.device)
    points = (u + torch.arange(samples, device=probs.device)) / samples * cdf[:, -1:]  # the total is 1 up to rounding
    at = torch.searchsorted(cdf, points).clamp(max=support - 1)
    return order.gather(1, at)


DRAWS = {"systematic": systematic, "multinomial": multinomial}


@register
class HeadTailEncoding(Encoding):
    """Top k exactly, and the tail as ``S`` draws from the teacher's distribution restricted to the unstored classes
    (random-sampling KD for the tail only, after Anshumann et al. 2025), each drawn class stored with its count and
    its log-probability (8 bits against a per-sample scale). The draws are systematic (``draws``; independent in
    stores that predate the option): unbiased like independent draws, with each count within 1 of its expectation.
    Layout 3 (``layout``, not a user's choice) keeps the slots in class order and stores their ids as gaps: the same
    numbers in fewer bytes (benchmarks/RESULTS.md).

    The draws follow the tail at temperature ``tau`` (``p_j^(1/tau)``, renormalised; ``tau`` = 1 in stores that
    predate the option). Decoding at any temperature T: the head as ``topk`` decodes it; the tail's total softened
    mass ``sum p_j^(1/T)`` from the stored softened tail masses (as ``topk``); its *shape* from the draws, each drawn
    class weighted by ``count * p_j^(1/T - 1/tau)`` (importance weights: the draws follow ``p_j^(1/tau)``, the target
    is ``p_j^(1/T)``). At T = tau the weights are the counts, RS-KD's unbiased estimate; elsewhere it is the ratio
    estimator (the weights rescaled to the known total), consistent in S but noisier the further T is from tau
    (benchmarks/RESULTS.md: draw at the temperature you train with). Classes never drawn get no mass:
    KL(teacher || decoded) is infinite by construction, as for ``sampled``, but the KD gradient is unbiased at
    T = tau and nearly so elsewhere.
    """

    name = "headtail"
    summary = "the exact top k plus S draws from the other classes, so the tail keeps its shape at any temperature"
    values = "log-probs and tail draws"
    options = {
        "k": Option(10, "topk / topk8 / headtail: entries kept per sample.", low=1),
        "tail_samples": Option(16, "headtail: draws S from the classes outside the top k.", low=1),
        "tau": TAU,
        "draws": Option(
            "systematic",
            "headtail: systematic (unbiased, each count within 1 of its expectation) or multinomial (independent "
            "draws: noisier).",
            absent="multinomial",
        ),
        # 1: the head as topk8's layout 1, tail slots most drawn first; 2: the head's steps (topk8's layout 2);
        # 3: also the tail slots in increasing class order, their ids stored as gaps (the same numbers, smaller)
        "layout": Option(3, "headtail: how the numbers are stored", absent=1, low=1, cli=False),
    }
    field_names = CompactTopKEncoding.field_names | {"tail_ids", "tail_counts", "tail_q", "tail_scale"}
    deterministic = False
    device_side = True
    # the options' values, set by ``Encoding.__init__``
    k: int
    tail_samples: int
    tau: float
    draws: str
    layout: int

    def validate(self) -> None:
        self._head_cache: CompactTopKEncoding | None = None
        check_layout(self.name, self.layout, newest=3)
        if self.tau <= 0:
            raise LogitcacheError(f"headtail: the draws' temperature must be > 0, got {self.tau:g}")
        if not 3 <= self.k < self.num_classes:
            raise LogitcacheError(f"headtail needs 3 <= k < the number of classes ({self.num_classes}), got {self.k}")
        if self.draws not in DRAWS:
            raise LogitcacheError(f"headtail: draws must be one of {', '.join(DRAWS)}, got {self.draws!r}")
        if self.tail_samples > 255:
            raise LogitcacheError(f"headtail: at most 255 tail draws, got {self.tail_samples}")

    def _head(self) -> CompactTopKEncoding:
        return CompactTopKEncoding(self.num_classes, self.k, layout=min(self.layout, 2), tail_shape="flat")

    def wire(self, fields: dict[str, Tensor]) -> dict[str, Tensor]:
        """Layout 3's numbers whatever the store's layout (the head's steps; the slots in increasing class order with
        their ids as gaps), and the draws' temperature per sample (the decode's importance weights use it)."""
        out = dict(fields)
        if self.layout == 1:
            out["q"], out["tail_soft8"] = steps_of(fields["q"]), steps_of(fields["tail_soft8"])
        if self.layout <= 2:  # slots most drawn first, absolute ids, unused ones (count 0, id 0) last
            ids, counts = fields["tail_ids"].long(), fields["tail_counts"]
            order = torch.where(counts > 0, ids, self.num_classes).argsort(dim=-1, stable=True)
            ids, counts = ids.gather(-1, order), counts.gather(-1, order)
            ids = torch.cummax(torch.where(counts > 0, ids, 0), dim=-1).values
            gaps = torch.diff(ids, dim=-1, prepend=torch.zeros_like(ids[..., :1]))
            out["tail_ids"] = gaps.to(fields["tail_ids"].dtype)
            out["tail_counts"], out["tail_q"] = counts, fields["tail_q"].gather(-1, order)
        out["temperature"] = fields["ids"].new_full((len(fields["ids"]),), self.tau, dtype=torch.float32)
        return out

    @classmethod
    def for_targets(cls, targets: dict[str, Tensor], num_classes: int) -> "Encoding":
        # the draws' temperature travels as a tensor and enters the decode as one: nothing to read on the host
        k, slots = targets["ids"].shape[-1], targets["tail_ids"].shape[-1]
        return cls(num_classes, k=k, tail_samples=slots)

    def _head_decoder(self) -> CompactTopKEncoding:
        if self._head_cache is None:
            self._head_cache = CompactTopKEncoding(self.num_classes, self.k, tail_shape="flat")
        return self._head_cache

    def slots(self) -> int:
        return min(self.tail_samples, self.num_classes - self.k)

    def entries(self) -> int:
        return self.k + self.slots()

    def fields(self) -> dict[str, Field]:
        return {
            **self._head().fields(),
            "tail_ids": Field((self.slots(),), compact_id_dtype(self.num_classes)),
            "tail_counts": Field((self.slots(),), np.dtype("uint8")),
            "tail_q": Field((self.slots(),), np.dtype("uint8")),
            "tail_scale": Field((), np.dtype("float16")),
        }

    def encode(self, logits: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        head = self._head().encode(logits)
        logp = torch.log_softmax(logits.float(), dim=-1)
        top, ids = logp.topk(self.k, dim=-1)
        # the teacher at temperature tau, restricted to the tail
        rest = torch.softmax((logp / self.tau).scatter(-1, ids, float("-inf")), dim=-1)
        draws = DRAWS[self.draws](rest, self.tail_samples, generator, self.num_classes - self.k)
        counts = torch.zeros(rest.shape, dtype=torch.int32, device=rest.device).scatter_add_(
            1, draws, torch.ones_like(draws, dtype=torch.int32)
        )
        used, slot_ids = counts.topk(self.slots(), dim=-1)
        if self.layout >= 3:  # slots in increasing class order, unused ones (count 0) last
            order = torch.where(used > 0, slot_ids, self.num_classes).argsort(dim=-1, stable=True)
            used, slot_ids = used.gather(1, order), slot_ids.gather(1, order)
        floor = top[:, -1:]  # every tail class is at most as likely as the k-th
        slot_lp = torch.where(used > 0, logp.gather(1, slot_ids), floor)
        scale = ((floor - slot_lp.min(dim=1, keepdim=True).values) / 255).clamp(min=1e-3).to(torch.float16).float()
        q = torch.round((floor - slot_lp) / scale).clamp(0, 255)
        tail_ids = torch.where(used > 0, slot_ids, 0)
        if self.layout >= 3:  # gaps from the previous id (the first from 0); unused slots repeat the last: gap 0
            tail_ids = torch.cummax(tail_ids, dim=1).values
            tail_ids = torch.diff(tail_ids, dim=1, prepend=torch.zeros_like(tail_ids[:, :1]))
        return {
            **head,
            "tail_ids": tail_ids.to(torch_dtype(compact_id_dtype(self.num_classes))),
            "tail_counts": used.to(torch.uint8),
            "tail_q": q.to(torch.uint8),
            "tail_scale": scale[:, 0].to(torch.float16),
        }

    @staticmethod
    def tail_ids(targets: dict[str, Tensor]) -> Tensor:
        """The drawn classes' ids (int64) from wire targets (which hold them as gaps)."""
        return targets["tail_ids"].long().cumsum(-1)

    def log_probs(self, targets: dict[str, Tensor], temperature: float, table: Tensor | None = None) -> Tensor:
        head = self._head_decoder().as_topk(targets)
        logp_top, ids = head["logprobs"], head["ids"]
        rest = self.num_classes - ids.shape[-1]
        total = TopKEncoding.softened_tail(head, rest, temperature)  # log sum over the tail of p^(1/T)
        counts = targets["tail_counts"].float()
        slot_lp = logp_top[..., -1:] - targets["tail_q"].float() * targets["tail_scale"].float()[..., None]
        # importance weights of the draws, rescaled so that they add up to the known total
        tau = targets["temperature"].float()[..., None] if "temperature" in targets else self.tau
        log_w = torch.log(counts) + (1.0 / temperature - 1.0 / tau) * slot_lp
        log_w = log_w - torch.logsumexp(log_w, dim=-1, keepdim=True) + total[..., None]
        dense = logp_top.new_full((*ids.shape[:-1], self.num_classes), float("-inf"))
        dense = dense.scatter(-1, ids, logp_top / temperature)
        # scatter-add the draws' weights (a class occupies one slot; unused slots have weight 0 = exp(-inf))
        mass = torch.zeros_like(dense).scatter_add_(-1, self.tail_ids(targets), log_w.exp())
        dense = torch.where(mass > 0, mass.log(), dense)
        return torch.log_softmax(dense, dim=-1)

    def flat_tail_share(self, targets: dict[str, Tensor], temperature: float) -> float | None:
        return None  # the draws keep the tail's shape

    def compare(self, stored: dict[str, Tensor], fresh: dict[str, Tensor], fresh_log_p: Tensor) -> tuple[float, str]:
        diff, why = self._head().compare(stored, fresh, fresh_log_p)
        if why:
            return diff, why
        drawn = self.tail_ids(stored)[stored["tail_counts"] > 0]
        worst = float(fresh_log_p[drawn].min()) if len(drawn) else 0.0
        # draws differ from run to run by design; an essentially impossible drawn class means another teacher/image
        # (a draw at temperature tau follows p^(1/tau): what is impossible at 1 is only unlikely at 4)
        impossible = self.tau * (-math.log(1e6) - 2)
        return diff, (f"a stored tail draw has fresh probability e^{worst:.1f}" if worst < impossible else "")
