"""Small synthetic data and models for unit tests (the demo and benchmarks use real Fashion-MNIST)."""

from __future__ import annotations

import os
import random
import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

import logitcache as lc
from logitcache.models import SmallResNet

NUM_CLASSES = 10


class TinyImages(torch.utils.data.Dataset):
    """Grayscale 16x16 PIL images whose class is a bright horizontal band position, plus noise."""

    def __init__(self, n: int = 300, seed: int = 0, size: int = 16):
        g = np.random.default_rng(seed)
        self.targets = g.integers(0, NUM_CLASSES, n).astype(np.int64)
        self.images = []
        for label in self.targets:
            img = g.integers(0, 60, (size, size)).astype(np.uint8)
            row = int(label) * (size - 2) // (NUM_CLASSES - 1)
            img[row : row + 2] = 220
            self.images.append(img)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return Image.fromarray(self.images[i], mode="L"), int(self.targets[i])


def tiny_dataset(train: bool = True) -> TinyImages:
    return TinyImages(240 if train else 100, seed=0 if train else 1)


def tiny_teacher() -> nn.Module:
    torch.manual_seed(0)
    return SmallResNet(8, 4, 1, NUM_CLASSES).eval()


def nan_teacher() -> nn.Module:
    class NaNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.zeros(len(x), NUM_CLASSES)
            out[-1, 0] = float("nan")
            return out

    return NaNNet()


def not_a_module():
    return "hello"


class _PythonAndNumpyNoise:
    """Draws from Python `random` and NumPy, as some user transforms do."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + random.random() * 0.1 + float(np.random.rand()) * 0.1


def heavy_augment() -> v2.Compose:
    """Every kind of randomness a user pipeline may have: crops, flips, colour jitter, erasing, Python, NumPy."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomCrop(16, padding=3),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.4, 0.4),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomErasing(p=0.5),
            _PythonAndNumpyNoise(),
        ]
    )


def other_augment() -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.RandomCrop(16, padding=5), v2.ToDtype(torch.float32, scale=True)])


class DyingTeacher(nn.Module):
    """Wraps the tiny teacher and kills its own process (SIGKILL, no cleanup) after N forward calls; under torchrun
    only on rank DIE_RANK when that is set. With DIE_ONCE_WRITTEN (a store's path) it first waits, up to 60 s, until
    the store holds a finished unit, so that a killed job has always left work to resume, however the ranks ran."""

    def __init__(self, calls_before_death: int):
        super().__init__()
        self.net, self.left = tiny_teacher(), calls_before_death
        self.mortal = os.environ.get("DIE_RANK") in (None, os.environ.get("RANK"))

    def forward(self, x):
        self.left -= 1
        if self.left < 0 and self.mortal:
            _wait_for_a_finished_unit(os.environ.get("DIE_ONCE_WRITTEN"))
            os.kill(os.getpid(), 9)
        return self.net(x)


def stop_workers(batches) -> None:
    """Stop a DataLoader iterator's workers now. An iterator that a test leaves behind in a reference cycle (an error's
    traceback holds it) is freed by the cyclic garbage collector, and then PyTorch stops each worker only after its 5 s
    join timeout, in whichever later test the collector runs."""
    if hasattr(batches, "_shutdown_workers"):  # an iterator with workers (PyTorch's own shutdown)
        batches._shutdown_workers()


def _wait_for_a_finished_unit(store: str | None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while store is not None and time.monotonic() < deadline:
        try:
            if lc.open_cache(store).completion().any():
                return
        except (lc.LogitcacheError, OSError, ValueError):  # rank 0 is still creating the store
            pass
        time.sleep(0.05)


def dying_teacher() -> nn.Module:
    return DyingTeacher(int(os.environ["DIE_AFTER"]))


def light_augment():
    """A (training, evaluation) pair: flips keep the class (a horizontal band), so tiny models learn it fast."""
    evaluation = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.5])])
    return v2.Compose([v2.RandomHorizontalFlip(), evaluation]), evaluation


class _NaNOnRank1(nn.Module):
    """The tiny teacher, except that under torchrun rank 1 returns NaN from its third batch on."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = tiny_teacher(), 0

    def forward(self, x):
        self.calls += 1
        out = self.net(x)
        return out * float("nan") if os.environ.get("RANK") == "1" and self.calls > 2 else out


def nan_on_rank1_teacher() -> nn.Module:
    return _NaNOnRank1()


def store_contents(path) -> tuple[dict[str, np.ndarray], dict]:
    """Every array of a store and its metadata, less what differs between two builds of the same cache: the creation
    time, the digest over the metadata, and object addresses in the augmentation's repr."""
    import json
    import re

    import zarr

    g = zarr.open_group(str(path), mode="r")
    arrays = {name: a[...] for name, a in g.arrays()}
    meta = json.loads(json.dumps(dict(g.attrs)))["logitcache"]
    meta.pop("created")
    meta.pop("metadata_sha256")
    meta["augment"]["repr"] = re.sub(r" at 0x[0-9a-f]+", "", meta["augment"]["repr"])
    return arrays, meta


def assert_same_store(a, b, ignore: tuple[str, ...] = ()) -> None:
    """Two stores hold the same arrays, bit for bit and dtype for dtype, and the same metadata (but ``ignore``'s
    top-level keys)."""
    (arrays_a, meta_a), (arrays_b, meta_b) = store_contents(a), store_contents(b)
    for key in ignore:
        meta_a.pop(key), meta_b.pop(key)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        x, y = arrays_a[name], arrays_b[name]
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
    assert meta_a == meta_b, [k for k in {*meta_a, *meta_b} if meta_a.get(k) != meta_b.get(k)]
