"""``topk``: the k largest log-probabilities, their ids, and the leftover mass."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from logitcache.errors import LogitcacheError
from logitcache.encoding.base import MIN_TAIL, Encoding, Field, Option, dense_kl, id_dtype, torch_id_dtype
from logitcache.encoding.registry import register

# Inverse temperatures at which the tail's softened mass is stored (``tail_soft``): T = 8, 4 and 2. With the exact
# ends (beta = 1: ``tail``; beta = 0: log of the number of unstored classes) any training temperature interpolates.
SOFT_TAIL_BETAS = (0.125, 0.25, 0.5)
TAIL_MODES = ("uniform", "bucket")


@register
class TopKEncoding(Encoding):
    """The k largest log-probabilities, their class ids, and the log of the leftover probability mass ("tail").

    The tail keeps the target honest: nothing is renormalised. Softening by a temperature T changes the tail's share
    in a way its total mass alone cannot tell (a flat tail softens to far more mass than a peaked one), so the store
    also keeps ``tail_soft``: ``log sum_j p_j^(1/T)`` over the unstored classes at T = 2, 4, 8. Decoding at T
    interpolates it (exact at T = 1, 2, 4, 8 and as T -> inf) and spreads it equally over the C - k unstored classes.
    Caches written before ``tail_soft`` existed (``soft_tail: false``) use the flat spread of ``tail`` at every T.
    """

    name = "topk"
    summary = "the k largest log-probs, their ids and the leftover mass"
    values = "log-probs"
    options = {
        "k": Option(10, "topk / topk8 / headtail: entries kept per sample.", low=1),
        "soft_tail": Option(
            True,
            "topk: also store the tail's mass at T = 2, 4, 8 (6 B/sample), so training at any temperature weights "
            "the unstored classes right; --flat-tail saves the bytes, exact only at T = 1.",
            absent=False,  # stores written before it existed have the flat tail
            flags="--soft-tail/--flat-tail",
        ),
    }
    field_names = frozenset({"logprobs", "ids", "tail"})
    optional_field_names = frozenset({"tail_soft"})
    device_side = True
    # the options' values, set by ``Encoding.__init__``
    k: int
    soft_tail: bool

    def validate(self) -> None:
        if not 1 <= self.k <= self.num_classes:
            raise LogitcacheError(f"k must be between 1 and the number of classes ({self.num_classes}), got {self.k}")

    def entries(self) -> int:
        return self.k

    def fields(self) -> dict[str, Field]:
        fields = {
            "logprobs": Field((self.k,), np.dtype("float16")),
            "ids": Field((self.k,), id_dtype(self.num_classes)),
            "tail": Field((), np.dtype("float32")),
        }
        if self.soft_tail:
            fields["tail_soft"] = Field((len(SOFT_TAIL_BETAS),), np.dtype("float16"))  # T = 8, 4, 2
        return fields

    def encode(self, logits: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        logp = torch.log_softmax(logits.float(), dim=-1)
        top, ids = logp.topk(self.k, dim=-1)
        # log(1 - sum(top)) computed from the dropped entries directly: no cancellation for confident teachers.
        dropped = logp.scatter(-1, ids, float("-inf"))
        out = {
            "logprobs": top.to(torch.float16),
            "ids": ids.to(torch_id_dtype(self.num_classes)),
            "tail": torch.logsumexp(dropped, dim=-1),
        }
        if self.soft_tail:
            soft = [torch.logsumexp(beta * dropped, dim=-1) for beta in SOFT_TAIL_BETAS]
            out["tail_soft"] = torch.stack(soft, dim=-1).clamp(min=MIN_TAIL).to(torch.float16)
        return out

    @staticmethod
    def softened_tail(targets: dict[str, Tensor], rest: int, temperature: float) -> Tensor:
        """``log sum_j p_j^(1/T)`` over the ``rest`` unstored classes, per sample: the tail's weight next to the
        stored ``logprobs / T`` before normalisation."""
        tail = targets["tail"].float().clamp(min=MIN_TAIL)
        if "tail_soft" not in targets:  # older cache: assume a flat tail (exact at T = 1, too much mass above)
            return tail / temperature + math.log(rest) * (1 - 1 / temperature)
        betas = (0.0, *SOFT_TAIL_BETAS, 1.0)
        points = [torch.full_like(tail, math.log(rest)), *targets["tail_soft"].float().unbind(-1), tail]
        beta = 1.0 / temperature
        # log sum p^beta is convex in beta: the chord between stored points is a close upper bound; beyond
        # beta = 1 (T < 1) the last chord is extended.
        i = len(betas) - 2 if beta >= 1 else max(j for j in range(len(betas) - 1) if betas[j] <= beta)
        w = (beta - betas[i]) / (betas[i + 1] - betas[i])
        return ((1 - w) * points[i] + w * points[i + 1]).clamp(min=MIN_TAIL)

    @classmethod
    def for_targets(cls, targets: dict[str, Tensor], num_classes: int) -> "Encoding":
        return cls(num_classes, k=targets["ids"].shape[-1], soft_tail="tail_soft" in targets)

    def log_probs(self, targets: dict[str, Tensor], temperature: float, table: Tensor | None = None) -> Tensor:
        logp, ids = targets["logprobs"].float(), targets["ids"].long()
        num_classes = self.num_classes
        rest = num_classes - ids.shape[-1]
        if rest == 0:
            fill = torch.full_like(logp[..., 0], float("-inf"))
        elif "tail_shape" in targets:  # a table's row (topk8): the tail's softened mass in the teacher's usual shape
            shape = (targets["tail_shape"].float() / temperature).scatter(-1, ids, float("-inf"))
            total = TopKEncoding.softened_tail(targets, rest, temperature)
            dense = shape - torch.logsumexp(shape, dim=-1, keepdim=True) + total[..., None]
            return torch.log_softmax(dense.scatter(-1, ids, logp / temperature), dim=-1)
        else:
            fill = TopKEncoding.softened_tail(targets, rest, temperature) - math.log(rest)
        dense = fill[..., None].expand(*ids.shape[:-1], num_classes).clone().scatter_(-1, ids, logp / temperature)
        return torch.log_softmax(dense, dim=-1)

    def kl(
        self,
        student_logits: Tensor,
        targets: dict[str, Tensor],
        temperature: float,
        tail: str,
        table: Tensor | None = None,
    ) -> Tensor:
        """From the k stored entries, the tail and two reductions over the student's logits: no dense teacher.

        ``tail``: ``uniform`` spreads the leftover mass over the unstored classes (equally, or in the shape of the
        cache's table when the targets carry a table's row, ``tail_shape``: then the teacher is dense, [B, C]);
        ``bucket`` treats it
        as one "rest" class, matching only the student's total mass outside the teacher's top k.
        """
        if tail not in TAIL_MODES:
            raise LogitcacheError(f"the top-k tail mode must be one of {', '.join(TAIL_MODES)}, got {tail!r}")
        if tail == "uniform" and "tail_shape" in targets:  # every class has its own mass: the base class's dense KL
            return dense_kl(TopKEncoding.log_probs(self, targets, temperature), student_logits, temperature)
        logprobs, ids = targets["logprobs"], targets["ids"]
        s = student_logits.float() / temperature
        log_z = torch.logsumexp(s, dim=1)
        rest = s.shape[1] - ids.shape[1]
        t_top = logprobs.float() / temperature
        s_top = s.gather(1, ids.long())
        if rest == 0:
            lp_top = torch.log_softmax(t_top, dim=1)
            return (lp_top.exp() * (lp_top - s_top)).sum(1) + log_z
        t_tail = TopKEncoding.softened_tail(targets, rest, temperature)
        log_norm = torch.logsumexp(torch.cat([t_top, t_tail[:, None]], dim=1), dim=1)
        lp_top, lp_bucket = t_top - log_norm[:, None], t_tail - log_norm
        lp_rest = lp_bucket - math.log(rest)  # an equal share of the softened leftover mass per unstored class
        if tail == "bucket":
            log_q_top = s_top - log_z[:, None]
            log_q_bucket = torch.log1p(-log_q_top.exp().sum(1).clamp(max=1 - 1e-7))
            return (lp_top.exp() * (lp_top - log_q_top)).sum(1) + lp_bucket.exp() * (lp_bucket - log_q_bucket)
        p_rest = lp_rest.exp()
        s_rest_sum = s.sum(1) - s_top.sum(1)
        return (lp_top.exp() * (lp_top - s_top)).sum(1) + rest * p_rest * lp_rest - p_rest * s_rest_sum + log_z

    def flat_tail_share(self, targets: dict[str, Tensor], temperature: float) -> float | None:
        return 1.0 - topk_kept_mass(self, targets, temperature)

    def compare(self, stored: dict[str, Tensor], fresh: dict[str, Tensor], fresh_log_p: Tensor) -> tuple[float, str]:
        if not torch.equal(stored["ids"], fresh["ids"]):
            return 0.0, f"stored top-k ids {stored['ids'].tolist()} != fresh {fresh['ids'].tolist()}"
        return super().compare(stored, fresh, fresh_log_p)


def topk_kept_mass(decoder: TopKEncoding, targets: dict[str, Tensor], temperature: float) -> float:
    """Mean share of the softened teacher distribution held by a top-k batch's stored entries (the rest is tail);
    a host number, for reports outside the training step."""
    ids = targets["ids"].long()
    return float(TopKEncoding.log_probs(decoder, targets, temperature).exp().gather(-1, ids).sum(-1).mean())
