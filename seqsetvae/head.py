"""Train the linear head on precomputed `[mu, std]` features with a Lightning Trainer."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from seqsetvae.config import FinetuneConfig
from seqsetvae.lit import FinetuneModule

logger = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"


class FeatureDataset(Dataset):
    """Rows of a feature matrix with their labels, batched as dicts."""

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        if len(features) != len(labels):
            raise ValueError(f"features and labels differ in length: expected {len(features)}, got {len(labels)}")
        # Arrays from Ray's object store are read-only; torch needs writable memory.
        self.features = torch.tensor(np.asarray(features), dtype=torch.float32)
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        return {"features": self.features[idx], "label": self.labels[idx]}


def feature_loader(features: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    dataset = FeatureDataset(features, labels)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=dataset.collate, generator=generator)


def train_head(
    train: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    config: FinetuneConfig,
    model_config: dict,
    preprocessing: dict,
    callbacks: list[pl.Callback] | None = None,
) -> FinetuneModule:
    """Fit one head on cached features; validation runs after every epoch."""
    pl.seed_everything(config.seed, verbose=False)
    prevalence = float(np.mean(train["label"]))
    module = FinetuneModule(model_config, asdict(config), preprocessing, prevalence=prevalence, with_encoder=False)
    if config.standardize:
        module.set_feature_scaling(train["features"])
    trainer = pl.Trainer(
        max_epochs=config.max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks or [],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        module,
        train_dataloaders=feature_loader(train["features"], train["label"], config.batch_size, True, config.seed),
        val_dataloaders=feature_loader(val["features"], val["label"], 4096, False, config.seed),
    )
    return module


def save_head(module: FinetuneModule, directory: str | Path) -> Path:
    path = Path(directory) / HEAD_FILE
    save_file({key: value.contiguous() for key, value in module.head_state().items()}, str(path))
    return path


def load_head_state(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
