"""Knowledge-distillation losses: ``T^2 * KL(teacher_T || student_T)``, on cached targets or on live teacher logits.

The KL against cached targets is the encoding's own (``Encoding.kl``): sparse encodings compute it from their stored
entries and two reductions over the student's logits, with no dense ``[B, C]`` teacher tensor.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .encoding import encoding_of


def kd_loss_dense(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Batch-mean ``T^2 * KL(softmax(t/T) || softmax(s/T))`` for dense teacher logits (online KD)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def kd_loss(
    student_logits: Tensor, targets: dict[str, Tensor], temperature: float = 1.0, tail: str = "uniform"
) -> Tensor:
    """Batch-mean KD loss against a collated batch of cached targets, for every registered encoding.

    ``tail`` (top-k only): ``uniform`` spreads the leftover mass over the unstored classes (default); ``bucket`` treats
    it as one "rest" class, matching only the student's total mass outside the teacher's top k.
    """
    return temperature**2 * encoding_of(targets).kl(student_logits, targets, temperature, tail).mean()
