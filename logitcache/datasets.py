"""Built-in datasets. Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` when installed, else torchvision."""

from __future__ import annotations

import gzip
import os
from collections.abc import Sized
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from logitcache.errors import LogitcacheError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_ROOT = Path(os.environ.get("LOGITCACHE_DATA", Path.home() / ".cache" / "logitcache" / "data"))


def dataset_len(dataset: Dataset) -> int:
    """``len(dataset)``: a map-style dataset has ``__len__``, which ``torch.utils.data.Dataset`` does not declare."""
    return len(cast(Sized, dataset))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class IdxImages(Dataset):
    """An MNIST-style dataset from IDX files: ``(PIL grayscale image, int label)``, no transforms."""

    def __init__(self, images: Path, labels: Path):
        self.data = torch.from_numpy(_read_idx(images).copy())
        self.targets = torch.from_numpy(_read_idx(labels).astype(np.int64))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return Image.fromarray(self.data[index].numpy(), mode="L"), int(self.targets[index])


def fashion_mnist(train: bool = True) -> Dataset:
    prefix = "train" if train else "t10k"
    images = DEBIAN_FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz"
    if images.exists():
        return IdxImages(images, DEBIAN_FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")
    return _torchvision("FashionMNIST", train)


def _torchvision(cls_name: str, train: bool) -> Dataset:
    import torchvision.datasets as tvd

    try:
        return getattr(tvd, cls_name)(root=str(DOWNLOAD_ROOT), train=train, download=True)
    except Exception as e:
        raise LogitcacheError(f"could not load or download {cls_name} into {DOWNLOAD_ROOT}: {e}") from None


BUILTIN = {
    "fashion-mnist": fashion_mnist,
    "mnist": lambda train=True: _torchvision("MNIST", train),
    "cifar10": lambda train=True: _torchvision("CIFAR10", train),
    "cifar100": lambda train=True: _torchvision("CIFAR100", train),
}


def image_folder(path: str, train: bool = True) -> Dataset:
    """``imagefolder:PATH``: uses ``PATH/train`` and ``PATH/val`` when present, else ``PATH`` for both splits."""
    import torchvision.datasets as tvd

    root = Path(path)
    split = root / ("train" if train else "val")
    if split.is_dir():
        root = split
    if not root.is_dir():
        raise LogitcacheError(f"image folder {path} does not exist")
    try:
        return tvd.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as e:
        raise LogitcacheError(f"image folder {root}: {e}") from None


def labels_of(dataset: Dataset) -> np.ndarray:
    """All labels as int64, from ``.targets`` when the dataset has it, else by reading every sample."""
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == dataset_len(dataset):
        return np.asarray(targets, dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(dataset_len(dataset))], dtype=np.int64)


class Head(Dataset):
    """The first ``n`` samples of a dataset, keeping ``.targets`` so labels are not read image by image."""

    def __init__(self, dataset: Dataset, n: int):
        if n < 1:
            raise LogitcacheError(f"the sample limit must be >= 1, got {n}")
        self.dataset, self.n = dataset, min(n, dataset_len(dataset))
        targets = getattr(dataset, "targets", None)
        if targets is not None and len(targets) == dataset_len(dataset):
            self.targets = np.asarray(targets, dtype=np.int64)[: self.n]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.dataset[index]
