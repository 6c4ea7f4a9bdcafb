"""Fashion-MNIST pairs: a real 100-class task for the many-class benchmarks.

Image = two Fashion-MNIST images side by side (28 x 56), label = 10 * left label + right label. Pairs are fixed by a
seeded permutation, so the dataset is deterministic. Augmentation must not flip (a flip swaps the two halves).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from logitcache import specs


class FashionPairs(Dataset):
    def __init__(self, train: bool = True, size: int | None = None):
        self.base = specs.resolve_dataset("fashion-mnist", train=train)
        n = size or len(self.base)
        rng = np.random.default_rng(1 if train else 2)
        self.left = rng.permutation(len(self.base))[:n]
        self.right = rng.permutation(len(self.base))[:n]
        labels = np.asarray(self.base.targets)
        self.targets = (10 * labels[self.left] + labels[self.right]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        a = np.asarray(self.base[int(self.left[i])][0])
        b = np.asarray(self.base[int(self.right[i])][0])
        return Image.fromarray(np.concatenate([a, b], axis=1), mode="L"), int(self.targets[i])


def fmnist_pairs(train: bool = True) -> FashionPairs:
    return FashionPairs(train, 20000 if train else 5000)


def pairs_augment():
    """(train, eval): pad-and-crop only."""
    evaluation = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.5])])
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomCrop((28, 56), padding=3),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5], [0.5]),
        ]
    ), evaluation
