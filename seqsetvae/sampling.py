"""Samplers that split a dataset among data-parallel ranks so every rank runs the same number of batches.

DDP needs every rank to run the same number of steps, or a collective call
waits forever. torch's DistributedSampler gets there by repeating samples,
which is fine for training but counts those samples twice in validation
metrics. `ShardedBatchSampler` gives each sample to exactly one rank and
still yields the same number of batches on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of one rank's share of `n_samples`, each sample on exactly one rank, in order.

    Rank r of W takes the samples r, r + W, r + 2W, ..., so shares differ by
    at most one sample. Every rank yields ceil(ceil(n_samples / W) / batch_size)
    batches, each at most `batch_size` long, and splits its share among them as
    evenly as possible. A rank whose share is smaller than that number of
    batches, which happens only when n_samples < W or batch_size is 1, yields
    some empty batches, so the caller's step must accept a batch of zero samples.
    """

    def __init__(self, n_samples: int, batch_size: int, num_replicas: int, rank: int) -> None:
        if batch_size < 1:
            raise ValueError(f"expected batch_size >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"expected 0 <= rank < num_replicas={num_replicas}, got rank {rank}")
        self.indices = np.arange(rank, n_samples, num_replicas)
        largest_share = math.ceil(n_samples / num_replicas)
        self.n_batches = max(1, math.ceil(largest_share / batch_size))

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in np.array_split(self.indices, self.n_batches):
            yield batch.tolist()
