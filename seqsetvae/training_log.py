"""TensorBoard event files for the Lightning stages, one directory per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger

# Directory of the event files inside a stage's output directory.
TENSORBOARD_DIR = "tensorboard"
# Hyperparameters left out of TensorBoard: the fitted vocabulary and value statistics
# are large, are saved with every checkpoint and export, and derive from patient data.
EXCLUDED_HYPERPARAMETERS = ("preprocessing",)


class ConfigTensorBoardLogger(TensorBoardLogger):
    """A TensorBoardLogger that records the stage configuration but not the fitted preprocessing."""

    def log_hyperparams(self, params: Any, metrics: dict | None = None) -> None:
        logged = {key: value for key, value in dict(params).items() if key not in EXCLUDED_HYPERPARAMETERS}
        super().log_hyperparams(logged, metrics)


def tensorboard_logger(log_dir: str | Path) -> ConfigTensorBoardLogger:
    """Return a logger that writes event files directly into `log_dir`, without version subdirectories."""
    return ConfigTensorBoardLogger(str(log_dir), name="", version="", default_hp_metric=False)
