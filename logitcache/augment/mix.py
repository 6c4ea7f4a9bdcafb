"""Mixup and CutMix as per-sample replayable functions, so that the teacher labels exactly the mixed image the
student later sees, whatever the sampler, batch size, number of workers or world size.

Sample ``i`` in view ``v`` is mixed with a partner ``j``; ``j``, the mixing weight ``lam`` (Beta(alpha, alpha)) and
CutMix's box are pure functions of ``(seed, v, i)``, and the mixed image is ``mix(view v of i, view v of j)``. Why
per sample rather than timm's per batch (pairs within a batch): a batch's composition depends on the sampler, the
batch size and the ranks, so a batch-level mix could not be replayed from a cache by another run. The partner is
drawn from the whole dataset, which is what batch-level mixing approximates. The options mean what timm's ``Mixup``
options mean (``mixup_alpha``, ``cutmix_alpha``, ``prob``, ``switch_prob``).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from logitcache.datasets import dataset_len
from logitcache.errors import LogitcacheError
from logitcache.augment.seeds import replay_view, sample_seed

MIX_MODES = ("none", "mixup", "cutmix", "both")
_MIX_SALT = 0x4D1C_5EED


@dataclass(frozen=True)
class Mix:
    """How samples are mixed. ``mode``: none, mixup, cutmix, or both (one of the two per sample, CutMix with
    probability ``switch_prob``); ``prob``: the probability that a sample is mixed at all."""

    mode: str = "none"
    alpha: float = 0.8  # mixup's Beta(alpha, alpha)
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in MIX_MODES:
            raise LogitcacheError(f"Mix mode (--mix) must be one of {', '.join(MIX_MODES)}, got {self.mode!r}")
        # only the alphas the mode draws from must be valid: Mix("cutmix", alpha=0) leaves mixup's unused
        used = {"mixup": ("alpha",), "cutmix": ("cutmix_alpha",), "both": ("alpha", "cutmix_alpha")}.get(self.mode, ())
        flags = {"alpha": "--mix-alpha", "cutmix_alpha": "--cutmix-alpha"}
        for name in used:
            if getattr(self, name) <= 0:
                raise LogitcacheError(
                    f"Mix {name} ({flags[name]}) must be > 0 for mode {self.mode}, got {getattr(self, name):g}"
                )
        for name, flag in (("prob", "--mix-prob"), ("switch_prob", "--switch-prob")):
            if not 0 <= getattr(self, name) <= 1:
                raise LogitcacheError(f"Mix {name} ({flag}) must be in [0, 1], got {getattr(self, name):g}")

    @property
    def active(self) -> bool:
        return self.mode != "none" and self.prob > 0

    def to_meta(self) -> dict[str, Any] | None:
        """What a store records (nothing without mixing, so stores without it are as before)."""
        return asdict(self) if self.active else None

    @classmethod
    def from_meta(cls, recorded: dict[str, Any] | None) -> "Mix":
        return cls(**recorded) if recorded else cls()

    def describe(self) -> str:
        if not self.active:
            return "no mixing"
        parts = {
            "mixup": f"mixup alpha {self.alpha:g}",
            "cutmix": f"cutmix alpha {self.cutmix_alpha:g}",
            "both": f"mixup alpha {self.alpha:g} or cutmix alpha {self.cutmix_alpha:g} (switch prob "
            f"{self.switch_prob:g})",
        }
        return f"{parts[self.mode]}, prob {self.prob:g}"


@dataclass(frozen=True)
class Draw:
    """One sample's mixing: its partner, the weight of its own image, and CutMix's box (rows y0:y1, columns x0:x1)."""

    partner: int
    lam: float
    box: tuple[int, int, int, int] | None = None


def draw(mix: Mix, seed: int, view: int, index: int, n: int, height: int, width: int) -> Draw:
    """Sample ``index``'s mixing in ``view``: a pure function of its arguments."""
    rng = random.Random(sample_seed(seed ^ _MIX_SALT, view, index))
    if not mix.active or rng.random() >= mix.prob:
        return Draw(index, 1.0)
    partner = rng.randrange(n)
    cutmix = mix.mode == "cutmix" or (mix.mode == "both" and rng.random() < mix.switch_prob)
    if not cutmix:
        return Draw(partner, rng.betavariate(mix.alpha, mix.alpha))
    lam = rng.betavariate(mix.cutmix_alpha, mix.cutmix_alpha)
    # timm's rand_bbox: a box of (1 - lam) of the area around a uniform centre, clipped; lam then is the kept area
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = rng.randrange(height), rng.randrange(width)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return Draw(partner, 1.0 - (y1 - y0) * (x1 - x0) / (height * width), (y0, y1, x0, x1))


def mixed_view(
    transform: Callable[[Any], Any], dataset: Dataset, seed: int, view: int, index: int, mix: Mix
) -> tuple[torch.Tensor, Draw]:
    """View ``view`` of sample ``index``, mixed with view ``view`` of its partner as ``mix`` draws; and the draw."""
    image = replay_view(transform, dataset[index][0], seed, view, index)
    if not mix.active:
        return image, Draw(index, 1.0)
    d = draw(mix, seed, view, index, dataset_len(dataset), *image.shape[-2:])
    if d.lam == 1.0 and d.box is None:
        return image, d
    other = replay_view(transform, dataset[d.partner][0], seed, view, d.partner)
    if other.shape != image.shape:
        raise LogitcacheError(
            f"mixing needs views of one shape; sample {index} gives {tuple(image.shape)}, its partner "
            f"{d.partner} {tuple(other.shape)} (use an augmentation that ends in a fixed size)"
        )
    if d.box is not None:
        y0, y1, x0, x1 = d.box
        out = image.clone()
        out[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        return out, d
    return d.lam * image + (1.0 - d.lam) * other, d


def soft_label(label: int, partner_label: int, lam: float, num_classes: int) -> torch.Tensor:
    """The mixed label ``lam * onehot(label) + (1 - lam) * onehot(partner_label)`` (float32, ``[num_classes]``)."""
    y = torch.zeros(num_classes)
    y[label] += lam
    y[partner_label] += 1.0 - lam
    return y
