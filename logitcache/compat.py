"""The one compatibility check: do this dataset and this augmentation reproduce what a cache was built on?

``build --resume``, ``CachedKDDataset`` (and so ``train``) and ``verify`` all ask it, and all word its answers the
same way. Cheap checks first: a dataset of another length is not replayed at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch.utils.data import Dataset

from .fingerprint import dataset_fingerprint
from .mix import Mix
from .replay import Mismatch, fingerprint_mismatch, replay_fingerprint


@dataclass(frozen=True)
class Difference:
    """What differs between a cache's recorded inputs and the given ones. ``what``: length, mixing, labels, images or
    augmentation; ``replay``: where the augmentation's replay disagreed (for ``augmentation``)."""

    what: str
    message: str
    replay: Mismatch | None = None

    def __str__(self) -> str:
        return self.message


def inputs_of(
    dataset: Dataset, augment: Callable[[Any], Any], seed: int, views: int, labels=None, mix: Mix | None = None
) -> dict:
    """What a cache records about its inputs (the ``dataset``, ``augment.fingerprint`` and ``mix`` attributes)."""
    mix = mix or Mix()
    return {
        "dataset": dataset_fingerprint(dataset, labels),
        "augment_fingerprint": replay_fingerprint(augment, dataset, seed, views, mix),
        "mix": mix.to_meta(),
    }


def differences(meta: dict, inputs: dict) -> list[Difference]:
    """Every way ``inputs`` (from ``inputs_of``) differ from what the cache's metadata ``meta`` recorded."""
    recorded, fresh = meta["dataset"], inputs["dataset"]
    if fresh["length"] != recorded["length"]:
        return [
            Difference(
                "length", f"the dataset has {fresh['length']} samples but the cache was built on {recorded['length']}"
            )
        ]
    out = []
    built, given = Mix.from_meta(meta.get("mix")), Mix.from_meta(inputs.get("mix"))
    if built != given:
        out.append(
            Difference(
                "mixing",
                f"the cache was built with {built.describe()} but this run asks for {given.describe()}: the teacher "
                "labelled other images (train with the cache's mixing options, or rebuild)",
            )
        )
    if fresh["labels_sha256"] != recorded["labels_sha256"]:
        out.append(
            Difference(
                "labels",
                "the dataset's labels differ from the ones the cache was built on (another dataset, split or order)",
            )
        )
    if fresh["samples_sha256"] != recorded["samples_sha256"]:
        out.append(
            Difference(
                "images",
                "the dataset's images differ from the ones the cache was built on (another dataset, preprocessing or "
                "order)",
            )
        )
    # The replayed pixels decide, not repr(): a user transform's repr may hold a memory address.
    bad = fingerprint_mismatch(meta["augment"]["fingerprint"], inputs["augment_fingerprint"])
    if bad and built == given:  # with other mixing the images differ anyway; that difference is named above
        out.append(
            Difference(
                "augmentation",
                f"the augmentation does not replay the views the teacher labelled ({bad}); the cache was built with "
                f"{meta['augment']['spec'] or meta['augment']['repr']}",
                bad,
            )
        )
    return out


def compatibility(
    meta: dict, dataset: Dataset, augment: Callable[[Any], Any], mix: Mix | None = None
) -> list[Difference]:
    """Every way ``dataset``, ``augment`` and ``mix`` differ from what the cache was built on; empty when
    compatible. ``mix=None``: the mixing the cache records."""
    mix = Mix.from_meta(meta.get("mix")) if mix is None else mix
    if len(dataset) != meta["dataset"]["length"]:  # fingerprints of another length would be meaningless
        return differences(meta, {"dataset": {"length": len(dataset)}, "augment_fingerprint": [], "mix": None})
    return differences(meta, inputs_of(dataset, augment, meta["seed"], meta["num_views"], mix=mix))
