"""Which trial's head the sweep keeps, on Ray Tune results built from real checkpoint directories."""

from __future__ import annotations

import pandas as pd
import pytest
from ray.train import Checkpoint, Result

from tune.sweep import _best_checkpoint, _kept_value

METRIC = "val/auprc"


def trial(tmp_path, name: str, history: list[float], failed: bool = False) -> Result:
    """Return the result of a trial that reported `history` of METRIC, one value per epoch, keeping a checkpoint."""
    directory = tmp_path / name
    directory.mkdir()
    checkpoint = Checkpoint.from_directory(str(directory))
    frame = pd.DataFrame({METRIC: history, "training_iteration": range(1, len(history) + 1)})
    error = RuntimeError("worker died") if failed else None
    best = [(checkpoint, {METRIC: max(history)})] if history else []
    return Result(
        metrics={METRIC: history[-1]} if history else {},
        checkpoint=checkpoint,
        error=error,
        path=str(directory),
        metrics_dataframe=frame,
        best_checkpoints=best,
    )


def test_last_epoch_skips_a_failed_trial(tmp_path):
    results = [
        trial(tmp_path, "steady", [0.30, 0.40]),
        trial(tmp_path, "failed", [0.90], failed=True),
        trial(tmp_path, "empty", []),
    ]
    assert _best_checkpoint(results, METRIC, "max", "last").path.endswith("steady")


def test_best_epoch_skips_checkpointless_trial(tmp_path):
    results = [trial(tmp_path, "steady", [0.30, 0.40]), trial(tmp_path, "empty", [])]
    assert _best_checkpoint(results, METRIC, "max", "best").path.endswith("steady")


def test_last_and_best_epoch_rank_differently(tmp_path):
    results = [trial(tmp_path, "peaked", [0.60, 0.20]), trial(tmp_path, "rising", [0.30, 0.50])]
    assert _best_checkpoint(results, METRIC, "max", "last").path.endswith("rising")
    assert _best_checkpoint(results, METRIC, "max", "best").path.endswith("peaked")


def test_no_kept_head_gives_none(tmp_path):
    assert _best_checkpoint([trial(tmp_path, "failed", [0.9], failed=True)], METRIC, "max", "last") is None


@pytest.mark.parametrize(("trial_epoch", "mode", "expected"), [("last", "max", 0.2), ("best", "max", 0.6), ("best", "min", 0.2)])
def test_kept_value(trial_epoch, mode, expected):
    history = pd.DataFrame({METRIC: [0.6, 0.2]})
    assert _kept_value(history, METRIC, mode, trial_epoch) == pytest.approx(expected)
    assert pd.isna(_kept_value(None, METRIC, mode, trial_epoch))
