"""Knowledge-distillation losses: ``T^2 * KL(teacher_T || student_T)``, on cached targets or on live teacher logits.

The KL against cached targets is the encoding's own (``Encoding.kl``): sparse encodings compute it from their stored
entries and two reductions over the student's logits, with no dense ``[B, C]`` teacher tensor. Batches travel as
their stored fields; a cache's table (``topk8``) is expanded on the device inside the loss. Nothing here reads a
device value on the host, so a step never waits for the GPU.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from logitcache.encoding import TAIL_MODES, decoder
from logitcache.augment.mix import Mix
from logitcache.errors import LogitcacheError


def kd_loss_dense(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Batch-mean ``T^2 * KL(softmax(t/T) || softmax(s/T))`` for dense teacher logits (online KD)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def kd_loss(
    student_logits: Tensor,
    targets: dict[str, Tensor],
    temperature: float = 1.0,
    tail: str = "uniform",
    *,
    cache: Any = None,
) -> Tensor:
    """Batch-mean KD loss against a collated batch of cached targets, for every registered encoding.

    ``cache``: the ``CachedKDDataset`` (or ``Cache``) the batch came from; it decodes with the store's options and
    table (the table is copied to the logits' device once and kept). Without it the batch decodes alone, with its
    encoding's defaults at the student's number of classes; a batch that needs its cache's table is refused in one
    line. ``KDLoss`` is the same loss as a module that holds the table as a buffer.
    ``tail`` (top-k only): ``uniform`` spreads the leftover mass over the unstored classes (default); ``bucket`` treats
    it as one "rest" class, matching only the student's total mass outside the teacher's top k.
    """
    encoding, table = decoder(targets, student_logits.shape[-1], cache)
    return temperature**2 * encoding.kl(student_logits, targets, temperature, tail, table).mean()


class KDLoss(nn.Module):
    """The KD loss against one cache's targets: ``KDLoss(ds, temperature=2.0).to(device)``, then
    ``loss = kd(student_logits, targets)``.

    Holds the store's encoding (its options as host numbers) and its table as a buffer that ``.to(device)`` moves
    (and the first call moves, if it is elsewhere), checks the temperature against the store once, here, and never
    reads a device value: the step stays asynchronous on a GPU. The trainer's loss.
    """

    table: Tensor | None

    def __init__(self, source: Any, temperature: float = 1.0, tail: str = "uniform"):
        super().__init__()
        if tail not in TAIL_MODES:
            raise LogitcacheError(f"the top-k tail mode must be one of {', '.join(TAIL_MODES)}, got {tail!r}")
        store = getattr(source, "cache", source)  # a CachedKDDataset: its store handle
        self.encoding = getattr(store, "encoding", store)
        self.encoding.check_temperature(temperature)
        self.temperature, self.tail = float(temperature), tail
        table_of = getattr(store, "table", None)
        table = table_of() if callable(table_of) else None
        self.register_buffer("table", table, persistent=False)
        self.replayed_mix = getattr(store, "mix", None)  # the store's own per-sample Mixup/CutMix, if any

    def forward(
        self, student_logits: Tensor, targets: dict[str, Tensor], labels: Tensor | None = None
    ) -> Tensor:
        """``labels`` (optional, the batch's): refused when they come mixed by a collate function that left the
        cached targets unmixed (``check_mixing``; shape and dtype only, no device read)."""
        if labels is not None:
            check_mixing(self.replayed_mix, labels)
        if self.table is not None and self.table.device != student_logits.device:
            self.table = self.table.to(student_logits.device)  # once: a module moved with .to() has it there
        t = self.temperature
        return t**2 * self.encoding.kl(student_logits, targets, t, self.tail, self.table).mean()

    def extra_repr(self) -> str:
        return f"{self.encoding!r}, temperature={self.temperature:g}, tail={self.tail!r}"


def replayed_mix(source: Any) -> Mix:
    """The dataset's own (replayed, per-sample) mixing: of a ``CachedKDDataset``, a ``Cache``, a ``Mix``; ``Mix()``
    (none) for a source that does not say, such as an ``Encoding``."""
    if isinstance(source, Mix):
        return source
    for candidate in (source, getattr(source, "cache", None)):
        mix = getattr(candidate, "mix", None)
        if isinstance(mix, Mix):
            return mix
    return Mix()


def check_mixing(source: Any, labels: Tensor, mixing: object | None = None) -> None:
    """Refuse (``LogitcacheError``, one line) a batch whose labels were mixed while its cached targets were not.

    ``source``: the ``CachedKDDataset`` (or its ``Cache``, or its ``Mix``). Soft labels (float ``[B, C]``) come from
    the dataset's own mixing (a cache built with ``--mix``) or from a batch mixer; when neither the dataset mixes nor
    a ``BatchMixing`` comes with the batch, a collate function mixed images and labels and passed the targets
    through (torchvision's ``v2.MixUp`` / ``v2.CutMix``): the student would learn from unmixed teacher targets on
    mixed images. Host-only: reads the labels' shape and dtype, never their values.

    Not detectable: images mixed with integer labels left as they were; a second mixing of a batch whose dataset
    already mixes (its labels are soft either way); targets mixed by hand in a collate function.
    """
    if mixing is not None or labels.dim() != 2 or not labels.is_floating_point():
        return
    if replayed_mix(source).active:
        return
    raise LogitcacheError(
        "the labels arrive mixed (soft [B, C] vectors) but the cached targets are not: a collate_fn mixed images and "
        "labels only (torchvision MixUp/CutMix?); use lc.BatchMix as the collate_fn with lc.MixedKDLoss, or build "
        "the cache with --mix"
    )
