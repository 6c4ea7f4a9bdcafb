"""Knowledge-distillation losses: ``T^2 * KL(teacher_T || student_T)``, on cached targets or on live teacher logits.

For sparse encodings the KL is computed from the k stored entries, the tail, and two reductions over the student's
logits; no dense ``[B, C]`` teacher tensor is built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .encoding import MIN_TAIL, FullEncoding, TopKEncoding, encoding_of


def kd_loss_dense(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Batch-mean ``T^2 * KL(softmax(t/T) || softmax(s/T))`` for dense teacher logits (online KD, ``full`` caches)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def _topk_kl(student_logits: Tensor, logprobs: Tensor, ids: Tensor, tail: Tensor, temperature: float) -> Tensor:
    s = student_logits.float() / temperature
    log_z = torch.logsumexp(s, dim=1)
    rest = s.shape[1] - ids.shape[1]
    t_top = logprobs.float() / temperature
    s_top = s.gather(1, ids.long())
    if rest == 0:
        lp_top = torch.log_softmax(t_top, dim=1)
        return (lp_top.exp() * (lp_top - s_top)).sum(1) + log_z
    # Each of the `rest` unstored classes gets an equal share of the leftover mass (see TopKEncoding).
    t_rest = (tail.float().clamp(min=MIN_TAIL) - math.log(rest)) / temperature
    log_norm = torch.logsumexp(torch.cat([t_top, (t_rest + math.log(rest))[:, None]], dim=1), dim=1)
    lp_top, lp_rest = t_top - log_norm[:, None], t_rest - log_norm
    p_rest = lp_rest.exp()
    s_rest_sum = s.sum(1) - s_top.sum(1)
    return (lp_top.exp() * (lp_top - s_top)).sum(1) + rest * p_rest * lp_rest - p_rest * s_rest_sum + log_z


def kd_loss(student_logits: Tensor, targets: dict[str, Tensor], temperature: float = 1.0) -> Tensor:
    """Batch-mean KD loss against a collated batch of cached targets, for every encoding the store supports."""
    enc = encoding_of(targets)
    if enc is FullEncoding:
        return kd_loss_dense(student_logits, targets["logits"], temperature)
    if enc is TopKEncoding:
        kl = _topk_kl(student_logits, targets["logprobs"], targets["ids"], targets["tail"], temperature)
        return temperature**2 * kl.mean()
    raise NotImplementedError(enc.name)
