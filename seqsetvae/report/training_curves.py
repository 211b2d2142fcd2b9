"""Pretraining curves: reconstruction, KL, beta and active latent units over optimiser steps.

The curves come from the TensorBoard event files that pretraining writes under
`<pretrain dir>/tensorboard/` (training metrics every few steps, validation
metrics once per epoch). A run without them falls back to the per-epoch
`pretrain_metrics.csv`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from seqsetvae.report.figures import new_figure, save_figure
from seqsetvae.training_log import TENSORBOARD_DIR

logger = logging.getLogger(__name__)

METRICS_FILE = "pretrain_metrics.csv"
# (metric name without the train/ or val/ prefix, panel title, y-axis label)
PANELS = (
    ("recon_loss", "Reconstruction loss", "Negative log-likelihood (nats per set)"),
    ("kl_loss", "KL divergence (before free bits)", "KL summed over latent dimensions (nats per set)"),
    ("beta", "KL weight beta", "beta"),
    ("active_units", "Active latent units", "Fraction of latent dimensions active"),
)


def read_tensorboard_scalars(log_dir: Path) -> pd.DataFrame:
    """Return every scalar of the event files under `log_dir` as columns tag, step, value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The event reader logs each file it finishes at INFO on the "tensorboard" logger.
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    frames = []
    for run_dir in sorted({path.parent for path in log_dir.rglob("events.out.tfevents.*")}):
        # size_guidance 0 keeps every scalar instead of a reservoir sample.
        accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            events = accumulator.Scalars(tag)
            frames.append(
                pd.DataFrame({"tag": tag, "step": [e.step for e in events], "value": [e.value for e in events]})
            )
    if not frames:
        return pd.DataFrame(columns=["tag", "step", "value"])
    # A resumed run logs some steps again; the later value of a step wins.
    return pd.concat(frames, ignore_index=True).drop_duplicates(["tag", "step"], keep="last").sort_values(["tag", "step"])


def read_epoch_metrics(path: Path) -> pd.DataFrame:
    """Return the per-epoch metrics CSV in the same long layout as the TensorBoard scalars."""
    table = pd.read_csv(path)
    value_columns = [column for column in table.columns if column.startswith(("train/", "val/"))]
    long = table.melt(id_vars=["step"], value_vars=value_columns, var_name="tag", value_name="value")
    return long.dropna(subset=["value"]).sort_values(["tag", "step"])


def load_pretraining_scalars(pretrain_dir: Path) -> tuple[pd.DataFrame, str] | None:
    """Return the pretraining scalars and their source, or None when the directory has neither source."""
    log_dir = pretrain_dir / TENSORBOARD_DIR
    if log_dir.is_dir():
        scalars = read_tensorboard_scalars(log_dir)
        if len(scalars):
            return scalars, "tensorboard"
    if (pretrain_dir / METRICS_FILE).is_file():
        logger.warning("%s has no TensorBoard scalars; drawing the per-epoch metrics of %s", pretrain_dir, METRICS_FILE)
        return read_epoch_metrics(pretrain_dir / METRICS_FILE), METRICS_FILE
    logger.warning("%s has neither TensorBoard logs nor %s; no pretraining curves are drawn", pretrain_dir, METRICS_FILE)
    return None


def _series(scalars: pd.DataFrame, tag: str) -> tuple[np.ndarray, np.ndarray]:
    rows = scalars[scalars["tag"] == tag]
    return rows["step"].to_numpy(), rows["value"].to_numpy(dtype=float)


def plot_pretraining_curves(scalars: pd.DataFrame, source: str, out_dir: Path) -> Path:
    """Draw one panel per pretraining metric: training values over steps, validation values at epoch ends."""
    figure = new_figure("pretraining_curves.png")
    grid = figure.subplots(2, 2)
    train_label = "train (logged steps)" if source == "tensorboard" else "train (last step of each epoch)"
    series = (
        ("train", train_label, {"linewidth": 1.2, "color": "tab:blue"}),
        ("val", "validation (end of epoch)", {"marker": "o", "color": "tab:red"}),
    )
    for axes, (metric, title, ylabel) in zip(grid.ravel(), PANELS):
        for stage, label, style in series:
            # Validation always uses the full beta, so only the training schedule is drawn.
            if stage == "val" and metric == "beta":
                continue
            steps, values = _series(scalars, f"{stage}/{metric}")
            if len(steps):
                axes.plot(steps, values, label=label, **style)
        if metric == "active_units":
            axes.set_ylim(-0.02, 1.02)
        axes.set_title(title)
        axes.set_xlabel("Optimiser step")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if axes.has_data():
            axes.legend(fontsize=8)
        else:
            axes.text(0.5, 0.5, "not logged", transform=axes.transAxes, ha="center", va="center", color="grey")
    figure.suptitle(f"Pretraining metrics from {source}")
    return save_figure(figure, out_dir, "pretraining_curves.png")


def pretraining_insight(pretrain_dir: Path, out_dir: Path) -> dict:
    """Write the pretraining figure to `out_dir`; return its source and the last value of each curve."""
    loaded = load_pretraining_scalars(pretrain_dir)
    if loaded is None:
        return {"pretrain_dir": str(pretrain_dir), "source": None, "figures": [], "final": {}}
    scalars, source = loaded
    path = plot_pretraining_curves(scalars, source, out_dir)
    final = {}
    for tag, rows in scalars.groupby("tag"):
        if tag.startswith(("train/", "val/")):
            final[tag] = float(rows.sort_values("step")["value"].iloc[-1])
    return {"pretrain_dir": str(pretrain_dir), "source": source, "figures": [path.name], "final": final}
