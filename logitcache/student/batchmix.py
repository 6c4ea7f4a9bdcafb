"""Mixup and CutMix over a batch, the torchvision/timm way, with cached targets.

``BatchMix`` pairs the samples of a collated batch (a permutation ``perm``) and mixes each image with its partner's
by a weight ``lam`` (Mixup: a blend; CutMix: a box of the partner pasted in, ``lam`` the area kept). The same ``lam``
and ``perm`` mix the labels (one-hot or soft) and, in the loss, the teacher's distributions: cached targets travel as
their stored fields (top-k ids and values, quantized numbers), which do not mix, so the batch carries the pairing
(``BatchMixing``) and ``MixedKDLoss`` mixes the decoded distributions on the device,
``p_mixed = lam * p_i + (1 - lam) * p_perm(i)``, before the KL against the student.

What the target then is: the teacher labelled the two unmixed images, so a mixed target is the mix of its
distributions on the originals, not its distribution on the mixed image. The exact path is the store's own per-sample
mixing (``logitcache.augment.mix``, ``logitcache build --mix``), where the teacher labels the mixed image itself.

``check_mixing`` refuses the batch of a collate function that mixes images and labels without the targets
(torchvision's ``v2.MixUp`` / ``v2.CutMix`` pass other items through unchanged) wherever the labels show it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import default_collate

from logitcache.encoding import decoder, dense_kl
from logitcache.errors import LogitcacheError
from logitcache.student.losses import KDLoss, check_mixing, replayed_mix
from logitcache.augment.mix import Mix

BATCH_MODES = ("batch", "elem")


@dataclass
class BatchMixing:
    """How a batch was mixed: sample ``i`` is ``lam[i]`` of itself and ``1 - lam[i]`` of sample ``perm[i]``.

    ``perm`` (int64 ``[B]``) and ``lam`` (float32 ``[B]``) live on the images' device. ``to`` moves both (Lightning's
    and Accelerate's batch transfer call it), ``pin_memory`` pins both (the DataLoader's ``pin_memory=True``)."""

    perm: Tensor
    lam: Tensor

    @classmethod
    def identity(cls, batch_size: int, device: torch.device | str | None = None) -> "BatchMixing":
        """No mixing: every sample is its own partner with weight 1."""
        return cls(torch.arange(batch_size, device=device), torch.ones(batch_size, device=device))

    def __len__(self) -> int:
        return len(self.perm)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "BatchMixing":
        perm, lam = self.perm.to(device, non_blocking=non_blocking), self.lam.to(device, non_blocking=non_blocking)
        return BatchMixing(perm, lam)

    def pin_memory(self) -> "BatchMixing":
        return BatchMixing(self.perm.pin_memory(), self.lam.pin_memory())

    def mix(self, values: Tensor) -> Tensor:
        """``lam * values + (1 - lam) * values[perm]`` along the batch dimension (labels, probabilities)."""
        lam = self.lam.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))
        return lam * values + (1 - lam) * values[self.perm]


class BatchMix:
    """Mixup / CutMix of a whole batch, with the options of timm's ``Mixup``: as a DataLoader's ``collate_fn``
    (``DataLoader(ds, collate_fn=BatchMix(num_classes=10))`` yields ``(images, labels, targets, mixing)``) or on the
    device after the batch arrives (``images, labels, mixing = mixer.apply(images, labels)``).

    ``mixup_alpha`` / ``cutmix_alpha``: the Beta(alpha, alpha) each draws ``lam`` from, 0 turning that one off;
    with both on, CutMix is chosen with probability ``switch_prob``. ``prob``: the probability that a batch
    (``mode="batch"``: one ``lam``, one box for the batch) or a sample (``mode="elem"``) is mixed at all.
    ``correct_lam``: CutMix's ``lam`` is the area its box keeps after clipping at the border. Labels: integer class
    ids become one-hot vectors of ``num_classes`` (smoothed by ``label_smoothing``), soft label vectors are mixed as
    they are; either way they come out float ``[B, num_classes]``, which ``F.cross_entropy`` takes.

    The partners are a random permutation of the batch. Draws come from torch's global generator, or ``generator``:
    inside DataLoader workers leave it out: the DataLoader seeds each worker's global generator differently
    while a generator passed here is copied into every worker with the same state.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        *,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        correct_lam: bool = True,
        label_smoothing: float = 0.0,
        num_classes: int | None = None,
        generator: torch.Generator | None = None,
    ):
        if mixup_alpha < 0 or cutmix_alpha < 0 or mixup_alpha == cutmix_alpha == 0:
            raise LogitcacheError("BatchMix: mixup_alpha and cutmix_alpha must be >= 0, and one of them > 0")
        if not (0 <= prob <= 1 and 0 <= switch_prob <= 1 and 0 <= label_smoothing < 1):
            raise LogitcacheError("BatchMix: prob and switch_prob must be in [0, 1], label_smoothing in [0, 1)")
        if mode not in BATCH_MODES:
            raise LogitcacheError(f"BatchMix: mode must be one of {', '.join(BATCH_MODES)}, got {mode!r}")
        if num_classes is not None and num_classes < 1:
            raise LogitcacheError(f"BatchMix: num_classes must be >= 1, got {num_classes}")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob, self.mode = float(prob), float(switch_prob), mode
        self.correct_lam, self.label_smoothing, self.num_classes = correct_lam, float(label_smoothing), num_classes
        self.generator = generator

    def __repr__(self) -> str:
        return (
            f"BatchMix(mixup_alpha={self.mixup_alpha:g}, cutmix_alpha={self.cutmix_alpha:g}, prob={self.prob:g}, "
            f"switch_prob={self.switch_prob:g}, mode={self.mode!r}, label_smoothing={self.label_smoothing:g}, "
            f"num_classes={self.num_classes})"
        )

    def __call__(self, batch: Sequence[Any]) -> tuple[Any, ...]:
        """The collate function: ``default_collate(batch)`` (``(images, labels, *rest)``), mixed; the pairing comes
        last: ``(images, labels, *rest, mixing)``. ``rest`` (the cached targets) passes through unmixed."""
        collated = default_collate(list(batch))
        if not isinstance(collated, (tuple, list)) or len(collated) < 2:
            raise LogitcacheError("BatchMix as a collate_fn needs samples of (image, label, ...)")
        images, labels, *rest = collated
        images, labels, mixing = self.apply(images, labels)
        return (images, labels, *rest, mixing)

    def apply(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, BatchMixing]:
        """Mix a batch of ``images`` ``[B, ..., H, W]`` and its ``labels`` (``[B]`` class ids or ``[B, C]`` soft
        vectors) on their device; returns the mixed images, the mixed labels (float ``[B, C]``) and the pairing.
        The draws are made on the host and copied to the device without waiting for it."""
        if images.dim() < 3:
            raise LogitcacheError(f"BatchMix needs images of shape [B, ..., H, W], got {tuple(images.shape)}")
        n, (height, width), device = images.shape[0], images.shape[-2:], images.device
        if labels.shape[:1] != images.shape[:1]:
            raise LogitcacheError(f"BatchMix: {n} images but {labels.shape[0] if labels.dim() else 0} labels")
        perm, draws = self._draw(n, height, width)
        lam = torch.tensor([d[0] for d in draws], dtype=torch.float32)
        mixing = BatchMixing(_to(perm, device), _to(lam, device))
        other = images[mixing.perm]
        blended = any(box is None and w < 1.0 for w, box in draws)
        boxed = [box if box is not None else (0, 0, 0, 0) for _, box in draws]
        out = images
        if blended:
            if not images.is_floating_point():
                raise LogitcacheError(f"Mixup blends images: convert them to a float dtype first, got {images.dtype}")
            weight = torch.tensor([w if box is None else 1.0 for w, box in draws], dtype=images.dtype)
            weight = _to(weight, device).view(-1, *([1] * (images.dim() - 1)))
            out = weight * images + (1 - weight) * other
        if any(box is not None for _, box in draws):
            y0, y1, x0, x1 = _to(torch.tensor(boxed, dtype=torch.int64), device).unbind(1)
            rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
            inside_rows = (rows >= y0[:, None]) & (rows < y1[:, None])
            inside_cols = (cols >= x0[:, None]) & (cols < x1[:, None])
            mask = inside_rows[:, :, None] & inside_cols[:, None, :]
            mask = mask.view(n, *([1] * (images.dim() - 3)), height, width)
            out = torch.where(mask, other, out)
        return out, mixing.mix(self._soft(labels)), mixing

    def _soft(self, labels: Tensor) -> Tensor:
        if labels.dim() == 2 and labels.is_floating_point():
            return labels
        if labels.dim() != 1 or labels.is_floating_point():
            raise LogitcacheError(f"BatchMix: labels must be class ids [B] or soft vectors [B, C], got {labels.shape}")
        if self.num_classes is None:
            raise LogitcacheError("BatchMix needs num_classes= to turn class ids into one-hot labels")
        off = self.label_smoothing / self.num_classes
        return F.one_hot(labels.long(), self.num_classes).float() * (1.0 - self.label_smoothing) + off

    def _draw(self, n: int, height: int, width: int) -> tuple[Tensor, list[tuple[float, tuple[int, ...] | None]]]:
        """The permutation, and per sample its ``lam`` and CutMix's box (rows y0:y1, columns x0:x1) or None."""
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        rng = random.Random(seed)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        if self.mode == "batch":
            return perm, [self._draw_one(rng, height, width)] * n
        return perm, [self._draw_one(rng, height, width) for _ in range(n)]

    def _draw_one(self, rng: random.Random, height: int, width: int) -> tuple[float, tuple[int, ...] | None]:
        if rng.random() >= self.prob:
            return 1.0, None
        cutmix = self.mixup_alpha == 0 or (self.cutmix_alpha > 0 and rng.random() < self.switch_prob)
        if not cutmix:
            return rng.betavariate(self.mixup_alpha, self.mixup_alpha), None
        lam = rng.betavariate(self.cutmix_alpha, self.cutmix_alpha)
        # timm's rand_bbox: a box of (1 - lam) of the area around a uniform centre, clipped at the border
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = rng.randrange(height), rng.randrange(width)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        if self.correct_lam:
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        return lam, (y0, y1, x0, x1)


def _to(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, so that the copy does not wait for the GPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def mixed_probs(
    targets: dict[str, Tensor], mixing: BatchMixing, temperature: float = 1.0, *, cache: Any = None
) -> Tensor:
    """The mixed teacher distributions ``lam * p_i + (1 - lam) * p_perm(i)`` ``[B, C]``, each ``p`` the decoded
    cached target at ``temperature`` (``cache``: as for ``to_probs``)."""
    encoding, table = decoder(targets, None, cache)
    return mixing.mix(encoding.log_probs(targets, temperature, table).exp())


def mixed_kd_loss(
    student_logits: Tensor,
    targets: dict[str, Tensor],
    mixing: BatchMixing | None,
    temperature: float = 1.0,
    *,
    cache: Any = None,
) -> Tensor:
    """Batch-mean ``T^2 * KL(lam * p_i + (1 - lam) * p_perm(i) || softmax(student / T))``: the KD loss of a batch
    mixed with ``BatchMix``, the teacher's distributions mixed as the images were (``mixing``). ``mixing=None``: the
    unmixed loss. ``MixedKDLoss`` is the same loss as a module."""
    encoding, table = decoder(targets, student_logits.shape[-1], cache)
    if mixing is None:
        return temperature**2 * encoding.kl(student_logits, targets, temperature, "uniform", table).mean()
    p = mixing.mix(encoding.log_probs(targets, temperature, table).exp())
    return temperature**2 * dense_kl(p.log(), student_logits, temperature).mean()


class MixedKDLoss(nn.Module):
    """The KD loss of batches mixed with ``BatchMix``: ``MixedKDLoss(ds, temperature=2.0).to(device)``, then
    ``loss = kd(student_logits, targets, mixing)``.

    Decodes the batch's cached targets to dense teacher distributions at the temperature (``[B, C]``, on the device,
    the cache's table a buffer as in ``KDLoss``), mixes them with the batch's pairing and weights, and returns
    ``T^2 * KL(p_mixed || student_T)`` averaged over the batch. ``mixing=None`` is ``KDLoss`` itself (the encoding's
    sparse KL). ``labels=``: the batch's labels, checked with ``check_mixing`` against the pairing and the dataset's
    own mixing. Never reads a device value on the host.
    """

    def __init__(self, source: Any, temperature: float = 1.0, tail: str = "uniform"):
        super().__init__()
        if tail != "uniform":
            raise LogitcacheError(
                f"MixedKDLoss mixes dense teacher distributions; tail={tail!r} has no dense form (use 'uniform')"
            )
        self.kd = KDLoss(source, temperature, tail)
        self.replayed = replayed_mix(source)

    @property
    def temperature(self) -> float:
        return self.kd.temperature

    def forward(
        self,
        student_logits: Tensor,
        targets: dict[str, Tensor],
        mixing: BatchMixing | None = None,
        *,
        labels: Tensor | None = None,
    ) -> Tensor:
        if labels is not None:
            check_mixing(self.replayed, labels, mixing)
        if mixing is None:
            return self.kd(student_logits, targets)
        kd = self.kd
        if kd.table is not None and kd.table.device != student_logits.device:
            kd.table = kd.table.to(student_logits.device)
        t = kd.temperature
        p = mixing.mix(kd.encoding.log_probs(targets, t, kd.table).exp())
        return t**2 * dense_kl(p.log(), student_logits, t).mean()
