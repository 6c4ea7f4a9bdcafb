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


# Replayed views a fingerprint holds. A transform that fires on a fraction p of views changes at least one of them with
# probability 1 - (1 - p)^n: for n = 128 and p = 5%, 99.86%. The structure check (fingerprint.augment_structure)
# names every transform added, removed or re-parametrised whatever p; the views catch what structure cannot see (a
# changed __call__, another library version or interpolation backend, a transform that does not replay). Point j is
# view j % V of sample j * 7919 % N, so the first 4 are those of stores that recorded 4.
FINGERPRINT_POINTS = 128


def replay_fingerprint(
    transform: Callable[[Any], Any],
    dataset: Any,
    base_seed: int,
    num_views: int,
    mix: Any = None,
    points: int = FINGERPRINT_POINTS,
) -> list[dict]:
    """Coarse checksums of ``points`` replayed views: a 4x4 average-pooled thumbnail per channel.

    Stored at build time and recomputed whenever the cache is used, so that a changed transform, torchvision version
    or interpolation backend is detected. Compared with a tolerance: float results may differ slightly across machines.
    """
    n = len(dataset)
    out = []
    for j in range(points):
        view = j % max(num_views, 1)
        index = (j * 7919) % n
        if mix is not None and mix.active:  # the mixed image is what the teacher labels
            from .mix import mixed_view

            x = mixed_view(transform, dataset, base_seed, view, index, mix)[0]
        else:
            x = replay_view(transform, dataset[index][0], base_seed, view, index)
        thumb = torch.nn.functional.adaptive_avg_pool2d(torch.as_tensor(x).float().reshape(-1, *x.shape[-2:])[None], 4)
        out.append(
            {
                "view": view,
                "index": index,
                "shape": list(x.shape),
                "thumb": [round(v, 4) for v in thumb.flatten().tolist()],
            }
        )
    return out


@dataclass(frozen=True)
class Mismatch:
    """A fingerprint disagreement: where it was seen (view, index; -1 when nowhere in particular) and why."""

    view: int
    index: int
    reason: str

    def __str__(self) -> str:
        return f"view {self.view}, sample {self.index}: {self.reason}"


def fingerprint_mismatch(recorded: list[dict], fresh: list[dict], tolerance: float = 2e-2) -> Mismatch | None:
    """The first disagreement between two replay fingerprints, or None when they agree. ``fresh`` may hold more
    points than ``recorded`` (its first points are the same views); fewer cannot be compared."""
    if len(fresh) < len(recorded):
        return Mismatch(-1, -1, "a different number of fingerprint points (another logitcache version?)")
    for r, f in zip(recorded, fresh):
        if r["shape"] != f["shape"]:
            return Mismatch(r["view"], r["index"], f"replayed shape {f['shape']} != recorded {r['shape']}")
        diff = max(abs(a - b) for a, b in zip(r["thumb"], f["thumb"]))
        if diff > tolerance:
            return Mismatch(
                r["view"],
                r["index"],
                f"replayed image differs from the recorded one (max thumbnail difference {diff:.3g})",
            )
    return None
