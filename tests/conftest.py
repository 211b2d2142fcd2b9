"""Shared fixtures: small real MEDS datasets cut from the bundled demo, and a local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from seqsetvae.meds_write import write_data_shard, write_labels, write_subject_splits
from seqsetvae.physionet import DEMO_DATA_DIR

TASK = "in_hospital_mortality"

# Keep torch and Ray from oversubscribing the two CPU cores of CI.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def read_demo_table(relative: str) -> pa.Table:
    return pq.read_table(DEMO_DATA_DIR / relative)


def make_meds_subset(out: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """Write a MEDS dataset of `sizes[split]` demo subjects per split, about a quarter of them positive."""
    labels = read_demo_table(f"labels/{TASK}")
    splits = read_demo_table("metadata/subject_splits.parquet")
    rng = np.random.default_rng(seed)
    chosen_splits = []
    for split, size in sizes.items():
        ids = splits.filter(pc.equal(splits.column("split"), split)).column("subject_id").to_numpy()
        split_labels = labels.filter(pc.is_in(labels.column("subject_id"), value_set=pa.array(ids)))
        positive = split_labels.filter(split_labels.column("boolean_value")).column("subject_id").to_numpy()
        negative = split_labels.filter(pc.invert(split_labels.column("boolean_value"))).column("subject_id").to_numpy()
        n_positive = max(2, size // 4)
        picked = np.concatenate(
            [rng.choice(positive, n_positive, replace=False), rng.choice(negative, size - n_positive, replace=False)]
        )
        chosen_splits.append(pa.table({"subject_id": pa.array(np.sort(picked), pa.int64()), "split": [split] * size}))
    subject_splits = pa.concat_tables(chosen_splits)
    for split in sizes:
        ids = subject_splits.filter(pc.equal(subject_splits.column("split"), split)).column("subject_id")
        events = read_demo_table(f"data/{split}")
        write_data_shard(out, split, events.filter(pc.is_in(events.column("subject_id"), value_set=ids)))
    write_subject_splits(out, subject_splits)
    all_ids = subject_splits.column("subject_id")
    write_labels(out, TASK, labels.filter(pc.is_in(labels.column("subject_id"), value_set=all_ids)))
    return out


@pytest.fixture(scope="session")
def small_meds(tmp_path_factory) -> Path:
    """A MEDS dataset of 160 train, 40 tuning and 40 held-out real PhysioNet stays."""
    return make_meds_subset(tmp_path_factory.mktemp("meds") / "small", {"train": 160, "tuning": 40, "held_out": 40})


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance on 127.0.0.1 shared by the tests of a session."""
    import ray

    from seqsetvae.ray_utils import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def fit_two_batches(module, cache_dir: Path, max_sets: int, batch_size: int, precision: str = "32-true"):
    """Fit a pretraining module on two train batches and one validation batch of a cache; return the Trainer."""
    import lightning.pytorch as pl

    from seqsetvae.data import SetSequenceDataModule

    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        precision=precision,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=SetSequenceDataModule(cache_dir, max_sets=max_sets, batch_size=batch_size))
    return trainer
