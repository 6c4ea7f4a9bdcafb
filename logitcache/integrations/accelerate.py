"""Hugging Face Accelerate: the training loader of a ``CachedKDDataset`` for one process of an ``Accelerator``.

``accelerator.prepare(loader)`` re-shards a loader's batches over the processes with a sampler of its own, which
does not know the dataset's read path (``CachedKDDataset.sampler``). Prepare the model and the optimizer only, and
build the loader with ``kd_dataloader``: the dataset's own sampler for this process's rank. Move each batch with
``accelerate.utils.send_to_device(batch, accelerator.device)`` (a ``BatchMixing`` moves with it), and call
``ds.set_epoch(epoch)`` before each epoch.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from logitcache.read.dataset import CachedKDDataset


def kd_dataloader(
    dataset: CachedKDDataset, accelerator: Any, *, batch_size: int, seed: int = 0, **loader_options: Any
) -> DataLoader:
    """A DataLoader over this process's share of ``dataset``: ``dataset.sampler(num_replicas=
    accelerator.num_processes, rank=accelerator.process_index, seed=seed)``; ``batch_size`` is per process,
    ``pin_memory`` defaults to whether the accelerator's device is a GPU. Every process must call it (the sampler's
    placement is collective). Do not pass the result to ``accelerator.prepare``."""
    sampler = dataset.sampler(num_replicas=accelerator.num_processes, rank=accelerator.process_index, seed=seed)
    loader_options.setdefault("pin_memory", getattr(accelerator.device, "type", "cpu") == "cuda")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **loader_options)
