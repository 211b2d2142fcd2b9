"""Datasets, the vectorised batch packer and the Lightning data module.

A sample is an integer: a subject position for pretraining, or a label index
for finetuning. The collate function turns a list of samples into the packed
tensors described in `seqsetvae.batch` with numpy fancy indexing, with no loop
over sets or events.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from seqsetvae.batch import PAD_CODE
from seqsetvae.cache import SplitCache
from seqsetvae.sampling import LengthGroupedSampler, ShardedBatchSampler

logger = logging.getLogger(__name__)


def ragged_ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten the ranges [starts[i], starts[i] + counts[i]).

    Returns (row, slot, index): range number, position inside the range, and the value.
    """
    total = int(counts.sum())
    row = np.repeat(np.arange(len(counts)), counts)
    first_of_row = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    slot = np.arange(total) - first_of_row[row]
    return row, slot, starts[row] + slot


class SetSequenceDataset(Dataset):
    """Samples of one cached split: whole subjects, or labels cut at their prediction time."""

    def __init__(self, cache: SplitCache, max_sets: int, labelled: bool):
        self.cache = cache
        self.max_sets = max_sets
        self.labelled = labelled
        if labelled and cache.labels is None:
            raise ValueError(f"{cache.path}: labelled samples need a task, got none")
        offsets = np.asarray(cache.subject_offsets)
        if labelled:
            pos = cache.labels["subject_pos"]
            self._set_end = offsets[pos] + cache.labels["n_sets"]
            self._subject_start = offsets[pos]
            self._targets = cache.labels["value"].astype(np.float32)
        else:
            self._set_end = offsets[1:].copy()
            self._subject_start = offsets[:-1].copy()
            self._targets = None

    def __len__(self) -> int:
        return len(self._set_end)

    def __getitem__(self, index: int) -> int:
        return index

    def sample_lengths(self) -> np.ndarray:
        """Return the number of sets each sample contributes after the max_sets cut."""
        return np.minimum(self._set_end - self._subject_start, self.max_sets)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Pack samples into [B, S, N] tensors; S and N are the maxima of this batch."""
        idx = np.asarray(indices, dtype=np.int64)
        cache = self.cache
        set_end = self._set_end[idx]
        set_start = np.maximum(self._subject_start[idx], set_end - self.max_sets)
        n_sets = set_end - set_start
        batch_size, max_sets = len(idx), max(int(n_sets.max(initial=0)), 1)

        set_row, set_slot, set_index = ragged_ranges(set_start, n_sets)
        set_offsets = cache.set_offsets
        event_start = np.asarray(set_offsets[set_index])
        n_events = np.asarray(set_offsets[set_index + 1]) - event_start
        max_events = max(int(n_events.max(initial=0)), 1)
        event_set, event_slot, event_index = ragged_ranges(event_start, n_events)

        codes = np.full((batch_size, max_sets, max_events), PAD_CODE, dtype=np.int64)
        values = np.zeros((batch_size, max_sets, max_events), dtype=np.float32)
        has_value = np.zeros((batch_size, max_sets, max_events), dtype=bool)
        event_mask = np.zeros((batch_size, max_sets, max_events), dtype=bool)
        rows, slots = set_row[event_set], set_slot[event_set]
        codes[rows, slots, event_slot] = cache.codes[event_index]
        values[rows, slots, event_slot] = cache.values[event_index]
        has_value[rows, slots, event_slot] = cache.has_value[event_index]
        event_mask[rows, slots, event_slot] = True

        set_times = np.zeros((batch_size, max_sets), dtype=np.float32)
        set_mask = np.zeros((batch_size, max_sets), dtype=bool)
        set_times[set_row, set_slot] = cache.set_hours[set_index]
        set_mask[set_row, set_slot] = True

        batch = {
            "codes": torch.from_numpy(codes),
            "values": torch.from_numpy(values),
            "has_value": torch.from_numpy(has_value),
            "event_mask": torch.from_numpy(event_mask),
            "set_times": torch.from_numpy(set_times),
            "set_mask": torch.from_numpy(set_mask),
            "index": torch.from_numpy(idx),
        }
        if self._targets is not None:
            batch["label"] = torch.from_numpy(self._targets[idx])
        return batch


class ConcatSetDataset(Dataset):
    """Unlabelled subjects of several cached splits as one dataset, for pretraining.

    Sample i is subject i of the splits laid end to end. A batch that mixes
    splits is packed per split and padded to one shape. Its `index` holds
    the positions in the joint dataset.
    """

    def __init__(self, parts: list[SetSequenceDataset]):
        self.parts = parts
        self._starts = np.cumsum([0] + [len(part) for part in parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> int:
        return index

    def sample_lengths(self) -> np.ndarray:
        return np.concatenate([part.sample_lengths() for part in self.parts])

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Pack samples of any splits into [B, S, N] tensors, grouped by split."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range for {len(self)} subjects")
        owner = np.searchsorted(self._starts, idx, side="right") - 1
        batches, order = [], [idx[:0]]
        for number, part in enumerate(self.parts):
            positions = idx[owner == number]
            if len(positions):
                batches.append(part.collate((positions - self._starts[number]).tolist()))
                order.append(positions)
        if not batches:
            batch = self.parts[0].collate([])
        elif len(batches) == 1:
            batch = batches[0]
        else:
            max_sets = max(part_batch["set_mask"].shape[1] for part_batch in batches)
            max_events = max(part_batch["event_mask"].shape[2] for part_batch in batches)
            batch = {
                key: torch.cat([pad_batch_tensor(part_batch[key], key, max_sets, max_events) for part_batch in batches])
                for key in batches[0]
            }
        batch["index"] = torch.from_numpy(np.concatenate(order))
        return batch


def pad_batch_tensor(tensor: torch.Tensor, key: str, max_sets: int, max_events: int) -> torch.Tensor:
    """Pad a packed [B], [B, S] or [B, S, N] tensor to S = max_sets and N = max_events."""
    if tensor.dim() == 1:
        return tensor
    widths = [0, max_sets - tensor.shape[1]]
    if tensor.dim() == 3:
        widths = [0, max_events - tensor.shape[2]] + widths
    return torch.nn.functional.pad(tensor, widths, value=PAD_CODE if key == "codes" else 0)


def make_loader(
    dataset: SetSequenceDataset | ConcatSetDataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Return a DataLoader that packs with the dataset's vectorised collate."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=dataset.collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=generator,
    )


def length_sorted_batches(
    dataset: SetSequenceDataset | ConcatSetDataset, batch_size: int
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Yield (positions, batch) over every sample once, shortest stays first, for inference.

    A batch is padded to its longest stay, so batches of stays of similar length
    carry little padding. `positions` [B] are the dataset positions of the
    batch's rows, in row order, where callers put each batch's outputs back.

    Raises:
        ValueError: batch_size is below 1.
    """
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    order = np.argsort(dataset.sample_lengths(), kind="stable")
    for start in range(0, len(order), batch_size):
        batch = dataset.collate(order[start : start + batch_size].tolist())
        # ConcatSetDataset.collate groups rows by split, so the row order comes from `index`.
        yield batch["index"].numpy(), batch


class SetSequenceDataModule(pl.LightningDataModule):
    """Train and validation loaders over a tensor cache.

    Pretraining reads whole subjects of the train and tuning splits. Finetuning
    reads labels of the task, each cut at its prediction time.

    Under a data-parallel trainer the module shards the data itself, so the
    trainer needs `use_distributed_sampler=False`. Training repeats a few
    samples so that every rank runs the same number of steps. Validation gives
    each sample to exactly one rank with the same number of batches on every
    rank, some of them possibly empty, so validation metrics that are summed
    across ranks count every sample once.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        max_sets: int,
        batch_size: int,
        task: str | None = None,
        train_split: str | tuple[str, ...] = "train",
        val_split: str = "tuning",
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        group_by_length: bool = False,
    ):
        """`pin_memory` puts batches in page-locked memory, which speeds up their copy to a GPU.

        `train_split` may name several splits, whose unlabelled subjects pretraining reads together.
        `group_by_length` draws training batches of stays of similar length
        (seqsetvae.sampling.LengthGroupedSampler), so that they carry less padding.
        """
        super().__init__()
        self.cache_dir = Path(cache_dir)
        self.max_sets = max_sets
        self.batch_size = batch_size
        self.task = task
        self.train_split = train_split
        self.val_split = val_split
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.group_by_length = group_by_length

    def dataset(self, split: str | tuple[str, ...]) -> SetSequenceDataset | ConcatSetDataset:
        if not isinstance(split, str):
            if len(split) == 1:
                return self.dataset(split[0])
            if self.task is not None:
                raise ValueError(f"invalid train_split for finetuning: expected one split, got {', '.join(split)}")
            return ConcatSetDataset([self.dataset(name) for name in split])
        cache = SplitCache(self.cache_dir, split, task=self.task)
        return SetSequenceDataset(cache, self.max_sets, labelled=self.task is not None)

    def _world(self) -> tuple[int, int]:
        """Return the world size and this process's rank; (1, 0) without a trainer."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset(self.train_split)
        world_size, rank = self._world()
        if self.group_by_length:
            sampler = LengthGroupedSampler(dataset.sample_lengths(), self.batch_size, world_size, rank, self.seed)
        elif world_size == 1:
            return make_loader(dataset, self.batch_size, True, self.num_workers, self.seed, self.pin_memory)
        else:
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=dataset.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def val_dataloader(self) -> DataLoader:
        dataset = self.dataset(self.val_split)
        world_size, rank = self._world()
        if world_size == 1:
            return make_loader(dataset, self.batch_size, False, self.num_workers, self.seed, self.pin_memory)
        return DataLoader(
            dataset,
            batch_sampler=ShardedBatchSampler(len(dataset), self.batch_size, world_size, rank),
            collate_fn=dataset.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )
