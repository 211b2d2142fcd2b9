"""Length-grouped training batches: coverage, order, padding and the DataLoader batches they give."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

from seqsetvae.sampling import LengthGroupedSampler


def stay_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Return set counts shaped like ICU stays: most near 70, a long tail up to 200."""
    return np.clip(np.random.default_rng(seed).gamma(4.0, 18.0, size=n).astype(int), 1, 200)


def loader_batches(sampler: LengthGroupedSampler, batch_size: int) -> list[list[int]]:
    loader = DataLoader(range(len(sampler.lengths)), batch_size=batch_size, sampler=sampler, collate_fn=list)
    return list(loader)


def padded_sets(batches: list[list[int]], lengths: np.ndarray) -> int:
    """Return the number of sets a model computes on when every batch is padded to its longest stay."""
    return sum(len(batch) * int(lengths[batch].max()) for batch in batches)


@pytest.mark.parametrize("n_samples, batch_size, world_size", [(70, 32, 1), (7, 3, 2), (1000, 16, 3), (2, 4, 3)])
def test_ranks_cover_samples_equally(n_samples, batch_size, world_size):
    lengths = stay_lengths(n_samples)
    samplers = [LengthGroupedSampler(lengths, batch_size, world_size, rank, window=4) for rank in range(world_size)]
    orders = [list(sampler) for sampler in samplers]
    assert {len(order) for order in orders} == {len(samplers[0])}
    counts = Counter(index for order in orders for index in order)
    assert set(counts) == set(range(n_samples))
    # Like DistributedSampler, only the few samples that fill the last share repeat.
    assert sum(counts.values()) - n_samples < world_size
    if world_size == 1:
        assert sorted(orders[0]) == list(range(n_samples))


def test_only_the_last_batch_is_short():
    lengths = stay_lengths(200)
    batches = loader_batches(LengthGroupedSampler(lengths, 32, window=2), 32)
    assert [len(batch) for batch in batches] == [32] * 6 + [8]


def test_batches_contain_similar_lengths():
    lengths = stay_lengths(6400)
    batch_size = 32
    grouped = loader_batches(LengthGroupedSampler(lengths, batch_size, seed=3), batch_size)
    shuffled = np.random.default_rng(3).permutation(len(lengths))
    random = [shuffled[start : start + batch_size].tolist() for start in range(0, len(lengths), batch_size)]
    real_sets = int(lengths.sum())
    assert padded_sets(grouped, lengths) < 1.1 * real_sets
    assert padded_sets(random, lengths) > 1.4 * real_sets
    # Batch order is random, not sorted by length.
    longest = [int(lengths[batch].max()) for batch in grouped]
    assert longest != sorted(longest)
    assert longest != sorted(longest, reverse=True)


def test_epoch_and_seed_set_the_order():
    lengths = stay_lengths(300)
    sampler = LengthGroupedSampler(lengths, 16, seed=1)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    assert sorted(second) == sorted(first)
    assert list(LengthGroupedSampler(lengths, 16, seed=2)) != first


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": 4, "window": 0}, {"batch_size": 4, "rank": 2}])
def test_invalid_arguments_are_rejected(kwargs):
    arguments = {"num_replicas": 2, **kwargs}
    with pytest.raises(ValueError):
        LengthGroupedSampler(stay_lengths(10), **arguments)
