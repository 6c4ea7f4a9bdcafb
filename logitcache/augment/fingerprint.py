"""The replay fingerprint: coarse checksums of replayed views (mixed ones as the teacher saw them), recorded at
build time and compared whenever a cache is used, and the first disagreement between two of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from logitcache.augment.mix import mixed_view
from logitcache.augment.seeds import replay_view


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
