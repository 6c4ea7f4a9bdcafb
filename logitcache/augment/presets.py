"""Built-in augmentation presets (torchvision v2). Each preset has a random training pipeline and the deterministic
evaluation pipeline that matches it; both map a PIL image (or uint8 tensor) to a normalised float tensor."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from logitcache.errors import LogitcacheError

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


def own_transform(dataset: Dataset) -> Callable[[Any], Any] | None:
    """The dataset's own ``transform`` (torchvision's datasets keep it there), or, for a ``Subset`` (a train/val
    split), the transform of the dataset it selects from; None without one."""
    transform = getattr(dataset, "transform", None)
    if not callable(transform) and isinstance(dataset, Subset):
        return own_transform(dataset.dataset)
    return transform if callable(transform) else None


def without_transform(dataset: Dataset) -> Dataset:
    """A shallow copy of ``dataset`` whose ``transform`` is set aside (None; torchvision's ``transforms``, which
    wraps it with the target transform, likewise), so that its images come out untransformed; ``dataset`` itself is
    left as it is. The copy shares the dataset's data and keeps every other attribute. A ``Subset`` is copied with
    its dataset's transform set aside the same way."""
    if not callable(getattr(dataset, "transform", None)) and isinstance(dataset, Subset):
        subset = copy.copy(dataset)
        subset.dataset = without_transform(dataset.dataset)
        return subset
    bare = copy.copy(dataset)
    try:
        bare.transform = None  # type: ignore[attr-defined]
        joint: Any = getattr(bare, "transforms", None)
        if type(joint).__name__ == "StandardTransform":  # torchvision's VisionDataset: (transform, target_transform)
            bare.transforms = type(joint)(None, getattr(joint, "target_transform", None))  # type: ignore[attr-defined]
    except AttributeError as e:
        raise LogitcacheError(
            f"cannot set aside the transform of {type(dataset).__name__} ({e}); pass a dataset without a transform "
            "and the augmentation as augment="
        ) from None
    return bare


def dataset_and_augment(
    dataset: Dataset, augment: Callable[[Any], Any] | None, who: str
) -> tuple[Dataset, Callable[[Any], Any]]:
    """The dataset to replay on and the augmentation to replay: ``augment`` when given, else the dataset's own
    ``transform``; the dataset's own transform, when it is the one replayed, is taken over (set aside on a copy of
    the dataset), so no image is transformed twice."""
    own = own_transform(dataset)
    if augment is None:
        if own is None:
            raise LogitcacheError(
                f"{who}: pass augment= (the transform the images go through); the dataset has no transform of its own"
            )
        augment = own
    if own is not None and augment is own:
        return without_transform(dataset), augment
    return dataset, augment
