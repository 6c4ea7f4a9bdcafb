"""Knowledge-distillation losses: ``T^2 * KL(teacher_T || student_T)``, on cached targets or on live teacher logits.

For sparse encodings the KL is computed from the k stored entries, the tail, and two reductions over the student's
logits; no dense ``[B, C]`` teacher tensor is built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .encoding import SampledEncoding, TopKEncoding, encoding_of


def kd_loss_dense(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Batch-mean ``T^2 * KL(softmax(t/T) || softmax(s/T))`` for dense teacher logits (online KD, ``full`` caches)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def _topk_kl(student_logits: Tensor, targets: dict[str, Tensor], temperature: float, tail_mode: str) -> Tensor:
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
    # Each of the `rest` unstored classes gets an equal share of the softened leftover mass (see TopKEncoding).
    lp_rest = lp_bucket - math.log(rest)
    if tail_mode == "bucket":
        # One "rest" category on both sides: only the student's total mass outside the teacher's top k is matched.
        log_q_top = s_top - log_z[:, None]
        log_q_bucket = torch.log1p(-log_q_top.exp().sum(1).clamp(max=1 - 1e-7))
        return (lp_top.exp() * (lp_top - log_q_top)).sum(1) + lp_bucket.exp() * (lp_bucket - log_q_bucket)
    p_rest = lp_rest.exp()
    s_rest_sum = s.sum(1) - s_top.sum(1)
    return (lp_top.exp() * (lp_top - s_top)).sum(1) + rest * p_rest * lp_rest - p_rest * s_rest_sum + log_z


def _sampled_kl(student_logits: Tensor, ids: Tensor, counts: Tensor, temperature: float) -> Tensor:
    counts = counts.float()
    p = counts / counts.sum(1, keepdim=True)
    log_q = student_logits.float() / temperature
    log_q = log_q.gather(1, ids.long()) - torch.logsumexp(log_q, dim=1, keepdim=True)
    # unused slots have p = 0 and contribute nothing; p log p uses xlogy so 0 log 0 = 0
    return (torch.special.xlogy(p, p) - p * log_q).sum(1)


def kd_loss(
    student_logits: Tensor, targets: dict[str, Tensor], temperature: float = 1.0, tail: str = "uniform"
) -> Tensor:
    """Batch-mean KD loss against a collated batch of cached targets, for every encoding the store supports.

    ``tail`` (top-k only): ``uniform`` spreads the leftover mass over the unstored classes (default); ``bucket`` treats
    it as one "rest" class, matching only the student's total mass outside the teacher's top k.
    """
    enc = encoding_of(targets)
    if tail not in ("uniform", "bucket"):
        raise ValueError(f"tail must be 'uniform' or 'bucket', got {tail!r}")
    if enc is TopKEncoding:
        kl = _topk_kl(student_logits, targets, temperature, tail)
    elif enc is SampledEncoding:
        SampledEncoding.check_temperature(targets, temperature)
        kl = _sampled_kl(student_logits, targets["ids"], targets["counts"], temperature)
    else:  # dense encodings: full, quantized
        log_p = enc.log_probs(targets, temperature)
        log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(1)
    return temperature**2 * kl.mean()
