"""Replayable augmentation: view ``v`` of sample ``i`` under base seed ``s`` is a pure function of ``(s, v, i)``.

The seed is a fixed integer hash (SplitMix64 mixing), never worker-local RNG state, so worker count, sampler order,
batch size, process and rank cannot change it and nothing per sample needs storing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import get_worker_info

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(base_seed: int, view: int, index: int) -> int:
    """The 63-bit seed of view ``view`` of sample ``index``."""
    h = _splitmix64(base_seed & _MASK64)
    h = _splitmix64(h ^ (view & _MASK64))
    h = _splitmix64(h ^ (index & _MASK64))
    return h >> 1


def replay(transform: Callable[[Any], Any], image: Any, seed: int) -> Any:
    """Apply ``transform`` to ``image`` with torch's CPU generator, Python ``random`` and NumPy seeded from ``seed``.

    The caller's RNG states are restored afterwards, so replaying inside a ``num_workers=0`` loader does not disturb
    the training loop's randomness. torchvision v2 draws from torch's default CPU generator; user code may use the
    other two. Inside a DataLoader worker the Python and NumPy states are not restored: the worker's own randomness
    is not the training loop's, and saving NumPy's state costs as much as a small augmentation (~50 us).
    """
    restore = get_worker_info() is None
    if restore:
        py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # default_generator only: torch.manual_seed would also reseed CUDA, which fork_rng(devices=[]) won't restore.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        try:
            return transform(image)
        finally:
            if restore:
                random.setstate(py_state)
                np.random.set_state(np_state)


def replay_view(transform: Callable[[Any], Any], image: Any, base_seed: int, view: int, index: int) -> Any:
    return replay(transform, image, sample_seed(base_seed, view, index))
