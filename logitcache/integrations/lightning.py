"""Lightning: a ``LightningDataModule`` that builds the ``CachedKDDataset``, hands out its own sampler on every rank,
sets its epoch and closes it at teardown.

Why the epoch is set by the loader and not by a ``Callback``: Lightning makes the first epoch's iterator (and with
``num_workers > 0`` the workers start fetching) before ``on_train_epoch_start``, so a callback would set epoch 0 after
its first batches were read. ``EpochLoader`` sets the dataset's epoch from ``trainer.current_epoch`` each time an
iterator is made, which is before any batch of that epoch, on a resume too.

Under DDP, start the Trainer with ``use_distributed_sampler=False``: Lightning otherwise replaces (or wraps) the
dataset's sampler with one of its own, which does not know the dataset's read path (``CachedKDDataset.sampler``).
The data module refuses a distributed Trainer without it.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Callable

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from logitcache.read.dataset import CachedKDDataset
from logitcache.errors import LogitcacheError
from logitcache.student.losses import KDLoss
from logitcache.store import Cache

try:
    import lightning.pytorch as pl
except ImportError as e:  # an optional extra
    raise ImportError("logitcache.integrations.lightning needs Lightning: pip install 'logitcache[lightning]'") from e


class EpochLoader(DataLoader):
    """A DataLoader that calls ``kd_dataset.set_epoch(epoch())`` each time an epoch's iterator is made, before any
    of the epoch's indices are drawn or its batches fetched. ``dataset`` may wrap ``kd_dataset`` (to add indices,
    say); everything else is ``DataLoader``'s."""

    def __init__(self, dataset: Dataset, *, kd_dataset: CachedKDDataset, epoch: Callable[[], int], **kwargs: Any):
        self.kd_dataset, self.epoch = kd_dataset, epoch
        self._previous: weakref.ref | None = None
        super().__init__(dataset, **kwargs)

    def __iter__(self) -> Any:
        # Lightning stops after len(loader) batches without exhausting the iterator, so the workers of an epoch that
        # are not persistent would still be alive while the next epoch's start: end them first (two sets of workers
        # reading one dataset at once are refused).
        previous = self._previous() if self._previous is not None else None
        shutdown = getattr(previous, "_shutdown_workers", None)
        if not self.persistent_workers and callable(shutdown):
            shutdown()
        self.kd_dataset.set_epoch(self.epoch())
        iterator = super().__iter__()
        self._previous = weakref.ref(iterator)
        return iterator


class CachedKDDataModule(pl.LightningDataModule):
    """The training data of cached KD for a Lightning ``Trainer``: ``CachedKDDataModule(base, "cache",
    batch_size=128)``, then ``trainer.fit(model, datamodule=dm)``.

    ``setup("fit")`` builds the ``CachedKDDataset`` on every rank (collective under DDP, as the dataset requires;
    ``augment`` and ``dataset_options`` are its arguments). ``train_dataloader`` takes ``dataset.sampler(num_replicas=
    trainer.world_size, rank=trainer.global_rank, seed=seed)`` and returns an ``EpochLoader`` that sets the epoch
    from ``trainer.current_epoch``; ``batch_size`` is per rank, ``loader_options`` go to the DataLoader
    (``collate_fn=lc.BatchMix(...)``, ``pin_memory``; ``persistent_workers`` defaults to ``num_workers > 0``).
    ``teardown("fit")`` closes the dataset; a later ``fit`` builds it anew. ``val_dataset``: an optional evaluation
    set, split over the ranks.

    In the ``LightningModule``, take the loss from the data module in ``setup`` (after the data module's):
    ``self.kd = self.trainer.datamodule.kd_loss(temperature=2.0)``; Lightning moves it with the model. Iterate every
    epoch in full (no ``limit_train_batches``) when the dataset reads through its ring (``dataset.ring_serves``).
    """

    def __init__(
        self,
        base: Dataset,
        cache: Cache | str | os.PathLike,
        *,
        batch_size: int,
        augment: Callable[[Any], Any] | None = None,
        num_workers: int = 0,
        seed: int = 0,
        val_dataset: Dataset | None = None,
        val_batch_size: int | None = None,
        dataset_options: dict[str, Any] | None = None,
        loader_options: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.base, self.cache, self.augment = base, cache, augment
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_dataset, self.val_batch_size = val_dataset, val_batch_size or batch_size
        self.dataset_options, self.loader_options = dict(dataset_options or {}), dict(loader_options or {})
        self.dataset: CachedKDDataset | None = None

    def _place(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def setup(self, stage: str) -> None:
        if stage != "fit" or self.dataset is not None:
            return
        trainer = self.trainer
        connector = getattr(trainer, "_accelerator_connector", None)
        if trainer is not None and trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise LogitcacheError(
                "under DDP the cached dataset hands each rank its own sampler: start the Trainer with "
                "use_distributed_sampler=False"
            )
        self.dataset = CachedKDDataset(self.base, self.cache, augment=self.augment, **self.dataset_options)

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset()
        world, rank = self._place()
        sampler = ds.sampler(num_replicas=world, rank=rank, seed=self.seed)  # collective: every rank calls it
        trainer = self.trainer

        def epoch() -> int:
            return trainer.current_epoch if trainer is not None else 0

        options = {"persistent_workers": self.num_workers > 0, **self.loader_options}
        return EpochLoader(
            self.loader_dataset(ds), kd_dataset=ds, epoch=epoch, batch_size=self.batch_size, sampler=sampler,
            num_workers=self.num_workers, **options,
        )  # fmt: skip

    def loader_dataset(self, dataset: CachedKDDataset) -> Dataset:
        """The dataset the training loader iterates: the cached dataset itself; override to wrap it."""
        return dataset

    def val_dataloader(self) -> Any:
        if self.val_dataset is None:
            return []
        world, rank = self._place()
        sampler: DistributedSampler | None = None
        if world > 1:
            sampler = DistributedSampler(self.val_dataset, world, rank, shuffle=False)
        return DataLoader(
            self.val_dataset, batch_size=self.val_batch_size, sampler=sampler, num_workers=self.num_workers
        )

    def kd_loss(self, temperature: float = 1.0, tail: str = "uniform") -> KDLoss:
        """``KDLoss`` for this data module's dataset (after ``setup``)."""
        return KDLoss(self._dataset(), temperature, tail)

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.dataset is not None:
            self.dataset.close()
            self.dataset = None

    def _dataset(self) -> CachedKDDataset:
        if self.dataset is None:
            raise LogitcacheError("the data module has no dataset before setup('fit'): pass it to trainer.fit")
        return self.dataset
