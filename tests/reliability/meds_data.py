"""Read a MEDS dataset into pandas and write altered copies of it, bad files included.

The writers call `pyarrow.parquet.write_table` directly, without the schema
checks of `seqsetvae.meds_write`, so tests can write the faults that real
exports contain: wrong dtypes, missing columns, nulls, timezones.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from seqsetvae.cache import ensure_cache, fit_preprocessor
from seqsetvae.config import DataConfig, ModelConfig, PretrainConfig
from seqsetvae.data import SetSequenceDataModule
from seqsetvae.lit import PretrainModule

TASK = "in_hospital_mortality"
SPLITS = ("train", "tuning", "held_out")
TINY_MODEL = ModelConfig(d_model=16, latent_dim=4, n_inducing=4, n_heads=2, n_set_layers=1, n_seq_layers=1)
TINY_DATA = DataConfig(max_sets=24, max_events_per_set=24)
# Command-line flags of TINY_MODEL and TINY_DATA.
TINY_FLAGS = [
    "--d-model", "16", "--latent-dim", "4", "--n-inducing", "4", "--n-heads", "2",
    "--n-set-layers", "1", "--n-seq-layers", "1", "--max-sets", "24", "--max-events-per-set", "24",
]  # fmt: skip
EVENT_SCHEMA = pa.schema(
    [("subject_id", pa.int64()), ("time", pa.timestamp("us")), ("code", pa.string()), ("numeric_value", pa.float32())]
)


def read_split(root: Path, split: str) -> pd.DataFrame:
    return pq.read_table(root / "data" / split).to_pandas()


def read_labels(root: Path) -> pd.DataFrame:
    return pq.read_table(root / "labels" / TASK).to_pandas()


def read_subject_splits(root: Path) -> pd.DataFrame:
    return pq.read_table(root / "metadata" / "subject_splits.parquet").to_pandas()


def copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def write_events(root: Path, split: str, events: pd.DataFrame | pa.Table, name: str = "0.parquet") -> Path:
    """Replace the shards of `split` with one file holding `events`, written as given."""
    directory = root / "data" / split
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    table = events if isinstance(events, pa.Table) else pa.Table.from_pandas(events, preserve_index=False)
    path = directory / name
    pq.write_table(table, path)
    return path


def write_labels(root: Path, labels: pd.DataFrame | pa.Table) -> Path:
    directory = root / "labels" / TASK
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    table = labels if isinstance(labels, pa.Table) else pa.Table.from_pandas(labels, preserve_index=False)
    pq.write_table(table, directory / "0.parquet")
    return directory / "0.parquet"


def write_subject_splits(root: Path, splits: pd.DataFrame | pa.Table) -> Path:
    path = root / "metadata" / "subject_splits.parquet"
    table = splits if isinstance(splits, pa.Table) else pa.Table.from_pandas(splits, preserve_index=False)
    pq.write_table(table, path)
    return path


def events_table(frame: pd.DataFrame) -> pa.Table:
    """Return `frame` with the MEDS event column types.

    pandas stores a null value as NaN, so NaN becomes null here, except in the
    rows where an optional boolean column `nan_value` is True, which keep a
    real NaN, as a faulty export writes it.
    """
    table = pa.Table.from_pandas(frame[list(EVENT_SCHEMA.names)], schema=EVENT_SCHEMA, preserve_index=False)
    if "nan_value" not in frame:
        return table
    nan = pa.scalar(float("nan"), pa.float32())
    mask = pa.array(frame["nan_value"].fillna(False).to_numpy(dtype=bool))
    values = pc.if_else(mask, nan, table.column("numeric_value"))
    return table.set_column(table.schema.get_field_index("numeric_value"), "numeric_value", values)


def build_cache(root: Path, cache_dir: Path, config: DataConfig, splits=SPLITS):
    """Fit preprocessing on the train split and cache `splits`; return (preprocessor, reports)."""
    preprocessor = fit_preprocessor(root, config)
    reports = ensure_cache(root, cache_dir, config, preprocessor, splits=splits)
    return preprocessor, reports


def pretrain_steps(cache_dir: Path, preprocessor, config: DataConfig, steps: int = 4, val_batches: int = 2):
    """Run `steps` optimiser steps and one validation of real pretraining on the cache without Ray.

    Returns the trainer, whose `callback_metrics` hold the logged metrics.
    """
    pretrain_config = PretrainConfig(max_epochs=1, batch_size=16, beta_warmup_steps=2)
    module = PretrainModule(asdict(TINY_MODEL), asdict(pretrain_config), preprocessor.to_dict())
    datamodule = SetSequenceDataModule(cache_dir, config.max_sets, pretrain_config.batch_size)
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=val_batches,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


def logged_metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


def all_finite(metrics: dict[str, float]) -> bool:
    return bool(metrics) and all(np.isfinite(value) for value in metrics.values())
