"""Samplers that split a dataset among data-parallel ranks so every rank runs the same number of batches.

DDP needs every rank to run the same number of steps, or a collective call
waits forever. torch's DistributedSampler gets there by repeating samples,
which is fine for training but counts those samples twice in validation
metrics. `ShardedBatchSampler` gives each sample to exactly one rank and
still yields the same number of batches on every rank.
`LengthGroupedSampler` deals training samples to ranks the way
DistributedSampler does, and orders each rank's share so that consecutive
batches contain stays of similar length, which cuts the padding of a batch.
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


class LengthGroupedSampler(Sampler[int]):
    """Training order of one rank's share in which every batch contains stays of similar length.

    A batch is padded to its longest stay, so a batch of random stays costs
    about as much as one of long stays. Each epoch this sampler shuffles all
    samples with (seed, epoch), deals them to ranks as torch's
    DistributedSampler does (the first few samples repeat so that every share
    has the same size), and cuts each share into windows of `window` batches.
    It sorts every window by length, cuts it into batches of `batch_size` and
    shuffles the order of the full batches. The one short batch, if any, comes
    last. A DataLoader with the same `batch_size` then draws exactly these
    batches. Lightning calls `set_epoch` before every epoch.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        window: int = 50,
    ) -> None:
        if batch_size < 1 or window < 1:
            raise ValueError(f"expected batch_size >= 1 and window >= 1, got {batch_size} and {window}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"expected 0 <= rank < num_replicas={num_replicas}, got rank {rank}")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.window = window
        self.epoch = 0
        self.share = math.ceil(len(self.lengths) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.share

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order = np.resize(rng.permutation(len(self.lengths)), self.share * self.num_replicas)
        mine = order[self.rank :: self.num_replicas]
        window = self.batch_size * self.window
        batches = []
        for start in range(0, len(mine), window):
            chunk = mine[start : start + window]
            # A stable sort keeps the random order among stays of equal length.
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[offset : offset + self.batch_size] for offset in range(0, len(chunk), self.batch_size))
        n_full = len(mine) // self.batch_size
        for position in [*rng.permutation(n_full), *range(n_full, len(batches))]:
            yield from batches[position].tolist()
