"""Fingerprints recorded in a cache so that a mismatched teacher, dataset or library is detected, not trusted."""

from __future__ import annotations

import hashlib
import platform

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .datasets import dataset_len, labels_of
from .version import __version__

SAMPLE_POINTS = 8


def teacher_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _image_bytes(image) -> bytes:
    if hasattr(image, "tobytes"):
        return image.tobytes()
    return np.ascontiguousarray(torch.as_tensor(image).numpy()).tobytes()


def dataset_fingerprint(dataset: Dataset, labels: np.ndarray | None = None) -> dict:
    """Length, a hash of all labels, and a hash of a few raw samples spread over the dataset (catches reordering)."""
    labels = labels_of(dataset) if labels is None else labels
    n = dataset_len(dataset)
    samples = hashlib.sha256()
    for j in range(min(SAMPLE_POINTS, n)):
        i = j * (n - 1) // max(SAMPLE_POINTS - 1, 1)
        samples.update(_image_bytes(dataset[i][0]))
    return {
        "length": n,
        "labels_sha256": hashlib.sha256(labels.astype("<i8").tobytes()).hexdigest(),
        "samples_sha256": samples.hexdigest(),
    }


def versions() -> dict:
    import numcodecs
    import torchvision
    import zarr

    return {
        "logitcache": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
