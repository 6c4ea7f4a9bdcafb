"""The one compatibility check: do this dataset and this augmentation reproduce what a cache was built on?

``build --resume``, ``CachedKDDataset`` (and so ``train``) and ``verify`` all ask it, and all word its answers the
same way. Cheap checks first: a dataset of another length is not replayed at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch.utils.data import Dataset

from .datasets import dataset_len
from .fingerprint import dataset_fingerprint
from .meta import CacheMeta, DatasetRecord, Inputs
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
) -> Inputs:
    """What a cache records about its inputs (the ``dataset``, ``augment.fingerprint`` and ``mix`` attributes)."""
    mix = mix or Mix()
    return Inputs(
        DatasetRecord(**dataset_fingerprint(dataset, labels)),
        replay_fingerprint(augment, dataset, seed, views, mix),
        mix,
    )


def differences(recorded: Inputs, fresh: Inputs, built_with: str = "") -> list[Difference]:
    """Every way ``fresh`` inputs differ from the ``recorded`` ones (a cache's ``CacheMeta.inputs()``);
    ``built_with`` names the cache's augmentation in the message."""
    if fresh.dataset.length != recorded.dataset.length:
        return [
            Difference(
                "length",
                f"the dataset has {fresh.dataset.length} samples but the cache was built on {recorded.dataset.length}",
            )
        ]
    out = []
    built, given = recorded.mix, fresh.mix
    if built != given:
        out.append(
            Difference(
                "mixing",
                f"the cache was built with {built.describe()} but this run asks for {given.describe()}: the teacher "
                "labelled other images (train with the cache's mixing options, or rebuild)",
            )
        )
    if fresh.dataset.labels_sha256 != recorded.dataset.labels_sha256:
        out.append(
            Difference(
                "labels",
                "the dataset's labels differ from the ones the cache was built on (another dataset, split or order)",
            )
        )
    if fresh.dataset.samples_sha256 != recorded.dataset.samples_sha256:
        out.append(
            Difference(
                "images",
                "the dataset's images differ from the ones the cache was built on (another dataset, preprocessing or "
                "order)",
            )
        )
    # The replayed pixels decide, not repr(): a user transform's repr may hold a memory address.
    bad = fingerprint_mismatch(recorded.fingerprint, fresh.fingerprint)
    if bad and built == given:  # with other mixing the images differ anyway; that difference is named above
        message = f"the augmentation does not replay the views the teacher labelled ({bad})"
        if built_with:
            message += f"; the cache was built with {built_with}"
        out.append(Difference("augmentation", message, bad))
    return out


def compatibility(
    meta: CacheMeta, dataset: Dataset, augment: Callable[[Any], Any], mix: Mix | None = None
) -> list[Difference]:
    """Every way ``dataset``, ``augment`` and ``mix`` differ from what the cache was built on; empty when
    compatible. ``mix=None``: the mixing the cache records."""
    mix = meta.mix if mix is None else mix
    if dataset_len(dataset) != meta.dataset.length:  # fingerprints of another length would be meaningless
        return differences(meta.inputs(), Inputs(DatasetRecord(dataset_len(dataset), "", ""), [], mix))
    fresh = inputs_of(dataset, augment, meta.seed, meta.num_views, mix=mix)
    return differences(meta.inputs(), fresh, meta.augment.spec or meta.augment.repr)
