"""Lightning callbacks of distributed pretraining: the per-epoch metric history, and a worker fault for tests."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

logger = logging.getLogger(__name__)

EXIT_AT_STEP_ENV = "SEQSETVAE_TEST_EXIT_AT_STEP"
"""Environment variable that only tests set: the last training worker exits at this optimiser step, once."""


class EpochHistory(pl.Callback):
    """Keeps one row of metrics per completed epoch in the checkpoint itself.

    Ray Train keeps only the best checkpoints and their metrics, so the
    history travels in the Lightning checkpoint: a restarted worker group
    restores it with the weights, and the driver reads it from the latest
    checkpoint. An epoch trained twice would show up as two rows with the
    same `epoch`. List this callback before the one that saves the checkpoint.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row = {"epoch": float(trainer.current_epoch), "step": float(trainer.global_step)}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("train/", "val/")):
                row[key] = float(value)
        self.rows.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(row) for row in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(row) for row in state_dict["rows"]]


def history_of_checkpoint(content: dict[str, Any]) -> list[dict[str, float]]:
    """Return the EpochHistory rows stored in a loaded Lightning checkpoint; empty when it has none."""
    state = (content.get("callbacks") or {}).get(EpochHistory.__qualname__) or {}
    return list(state.get("rows", []))


class ExitAtStep(pl.Callback):
    """Ends this worker process abruptly after optimiser step `step`, like a machine that dies mid-epoch.

    Only the last rank exits, and only while `marker` does not exist; the
    callback creates it first, so the restarted worker group trains on.
    Before exiting it waits `settle_seconds`: Ray Train 2.60's controller
    collects reports every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), and a
    checkpoint reported less than that before a failure is lost, so the
    group would restart from the one before it. Tests turn this on with the
    SEQSETVAE_TEST_EXIT_AT_STEP environment variable.
    """

    def __init__(self, step: int, marker: str | Path, settle_seconds: float = 5.0) -> None:
        self.step = step
        self.marker = Path(marker)
        self.settle_seconds = settle_seconds

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.step or trainer.global_rank != trainer.world_size - 1 or self.marker.exists():
            return
        self.marker.touch()
        time.sleep(self.settle_seconds)
        logger.warning("Worker of rank %d exits at step %d because %s is set", trainer.global_rank, self.step, EXIT_AT_STEP_ENV)
        logging.shutdown()
        os._exit(1)
