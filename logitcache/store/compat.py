"""The one compatibility check: do this dataset and this augmentation reproduce what a cache was built on?

``build --resume``, ``CachedKDDataset`` (and so ``train``) and ``verify`` all ask it, and all word its answers the
same way. Cheap checks first: a dataset of another length is not replayed at all.

The augmentation is compared twice. By structure (``fingerprint.augment_structure``: the pipeline as plain data, its
transforms' classes and public parameters), which names what differs: a transform added, removed or replaced, a
parameter changed, however rarely the transform fires. And by replayed pixels, a few views against the thumbnails the
build recorded, which catch what structure cannot see: a changed ``__call__``, another library version or
interpolation backend, a transform that does not replay. A store that records no structure is compared by pixels alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch.utils.data import Dataset

from logitcache.datasets import dataset_len
from logitcache.store.identity import augment_structure, dataset_fingerprint, structure_differences
from logitcache.store.meta import CacheMeta, DatasetRecord, Inputs
from logitcache.augment.mix import Mix
from logitcache.augment.fingerprint import FINGERPRINT_POINTS, Mismatch, fingerprint_mismatch, replay_fingerprint

SHOWN = 3  # structural differences named in a message; the rest are counted


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
    dataset: Dataset,
    augment: Callable[[Any], Any],
    seed: int,
    views: int,
    labels=None,
    mix: Mix | None = None,
    points: int = FINGERPRINT_POINTS,
) -> Inputs:
    """What a cache records about its inputs (the ``dataset``, ``augment.fingerprint``, ``augment.structure`` and
    ``mix`` attributes); ``points``: the replayed views in the fingerprint. The structure is read before any view is
    replayed."""
    mix = mix or Mix()
    structure = augment_structure(augment)
    return Inputs(
        DatasetRecord(**dataset_fingerprint(dataset, labels)),
        replay_fingerprint(augment, dataset, seed, views, mix, points),
        mix,
        structure,
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
    # Structure and replayed pixels, never repr(): a user transform's repr may hold a memory address.
    bad = fingerprint_mismatch(recorded.fingerprint, fresh.fingerprint)
    changed = []
    if recorded.structure is not None and fresh.structure is not None:
        changed = structure_differences(recorded.structure, fresh.structure)
    if changed:
        more = f"; and {len(changed) - SHOWN} more" if len(changed) > SHOWN else ""
        out.append(
            Difference(
                "augmentation",
                f"the augmentation does not replay the views the teacher labelled, it differs from the cache's: "
                f"{'; '.join(changed[:SHOWN])}{more} (pass the cache's augmentation, or rebuild the cache)",
                bad,
            )
        )
    elif bad and built == given:  # with other mixing the images differ anyway; that difference is named above
        message = f"the augmentation does not replay the views the teacher labelled ({bad})"
        if built_with:
            message += f"; the cache was built with {' '.join(built_with.split())[:300]}"
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
    fresh = inputs_of(dataset, augment, meta.seed, meta.num_views, mix=mix, points=len(meta.augment.fingerprint))
    return differences(meta.inputs(), fresh, meta.augment.spec or meta.augment.repr)
