"""Built-in augmentation presets (torchvision v2). Each preset has a random training pipeline and the deterministic
evaluation pipeline that matches it; both map a PIL image (or uint8 tensor) to a normalised float tensor."""

from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

MEAN, STD = (0.5,), (0.5,)  # broadcast over any number of channels
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pipeline(*geometry: v2.Transform, mean=MEAN, std=STD) -> v2.Compose:
    """Image -> uint8 tensor -> ``geometry`` -> normalised float: the frame every preset shares."""
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def _imagenet_stats(channels: int) -> dict:
    # ImageNet statistics are per RGB channel; a 1-channel image keeps its one channel (mean/std 0.5).
    return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD} if channels == 3 else {}


def plain(size: int | None = None, channels: int = 3) -> v2.Compose:
    """No randomness: tensor conversion and normalisation only."""
    return _pipeline()


def pad_crop_flip(size: int, channels: int = 3, padding: int = 4) -> v2.Compose:
    """The classic small-image recipe: pad, random crop back to ``size``, horizontal flip."""
    return _pipeline(v2.RandomCrop(size, padding=padding), v2.RandomHorizontalFlip())


def rrc_flip(size: int = 224, channels: int = 3) -> v2.Compose:
    """ImageNet-style: random resized crop to ``size`` and horizontal flip."""
    return _pipeline(v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), **_imagenet_stats(channels))


def center_crop(size: int = 224, channels: int = 3) -> v2.Compose:
    """The evaluation pipeline matching ``rrc_flip``: resize to 8/7 of ``size``, centre crop."""
    return _pipeline(v2.Resize(int(size * 8 / 7), antialias=True), v2.CenterCrop(size), **_imagenet_stats(channels))


# name -> (training pipeline, matching evaluation pipeline); each takes the image size and channel count.
PRESETS: dict[str, tuple[Callable[[int, int], v2.Compose], Callable[[int, int], v2.Compose]]] = {
    "pad-crop-flip": (pad_crop_flip, plain),
    "rrc-flip": (rrc_flip, center_crop),
    "none": (plain, plain),
}
