"""A chunk-aware shuffle for caches whose view does not fit in memory (after mosaicml/streaming's block shuffles).

A fully shuffled order makes every batch touch ~batch-size different chunks, so once a view is larger than a
worker's chunk cache each chunk is decoded again for nearly every sample it serves. ``ChunkShuffleSampler`` shuffles
the order of chunks, deals them to ranks, and shuffles samples only within windows of ``window`` consecutive chunks
of a rank's list: at most ``window`` chunks (plus one at each edge) are needed at a time. Taken from
``CachedKDDataset.chunk_sampler()``, the windows are read once per rank into memory the workers share
(``logitcache.read.ring``); on its own, each worker reads the chunks of the batches it serves (about once per worker).

Randomness window (the trade-off): a sample's neighbours in the order come from the same ``window`` chunks
(``window x chunk_rows`` samples), not from the whole dataset; which chunks share a window changes every epoch. The
order is a pure function of ``(seed, epoch)`` (and the rank), never of the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from logitcache.augment.seeds import sample_seed


class ChunkShuffleSampler(Sampler[int]):
    """Indices of one rank's share of an epoch, chunk-aware. Every rank gets the same number of samples (the few
    that do not divide evenly are left out of that epoch, as ``DistributedSampler(drop_last=True)`` does)."""

    def __init__(
        self,
        num_samples: int,
        chunk_rows: int,
        *,
        window: int = 8,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        if window < 1 or chunk_rows < 1 or num_samples < 1:
            raise ValueError("num_samples, chunk_rows and window must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_samples, self.chunk_rows, self.window = num_samples, chunk_rows, window
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_chunks = -(-num_samples // chunk_rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.num_replicas

    def _order(self, epoch: int) -> tuple[torch.Generator, torch.Tensor]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 0x5A3B))
        return g, torch.randperm(self.num_chunks, generator=g)

    def chunk_starts(self, epoch: int) -> torch.Tensor:
        """Where each chunk's first row falls in this rank's share of ``epoch`` (before the shuffle within windows):
        sample ``i`` is at ``chunk_starts[i // chunk_rows] + i % chunk_rows``, this rank's when in ``[0, len)``."""
        _, order = self._order(epoch)
        sizes = self.chunk_sizes()
        starts = torch.empty(self.num_chunks, dtype=torch.int64)
        starts[order] = torch.cumsum(sizes[order], 0) - sizes[order]
        return starts - self.rank * len(self)

    def __iter__(self) -> Iterator[int]:
        g, order = self._order(self.epoch)
        sizes = self.chunk_sizes()[order]
        # every sample once, chunk by chunk in shuffled chunk order; rank r takes the r-th contiguous share of it
        starts = (order * self.chunk_rows).repeat_interleave(sizes)
        within = torch.arange(self.num_samples) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
        share = len(self)
        mine = (starts + within)[self.rank * share : (self.rank + 1) * share]
        span = self.window * self.chunk_rows
        blocks = [mine[s : s + span] for s in range(0, share, span)]
        return iter(torch.cat([b[torch.randperm(len(b), generator=g)] for b in blocks]).tolist() if blocks else [])

    def chunk_sizes(self) -> torch.Tensor:
        sizes = torch.full((self.num_chunks,), self.chunk_rows, dtype=torch.int64)
        sizes[-1] = self.num_samples - (self.num_chunks - 1) * self.chunk_rows
        return sizes
