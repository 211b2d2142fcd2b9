"""Report figures, drawn with matplotlib's Agg renderer and no pyplot state.

Every figure has a fixed size in inches and is saved at `DPI` without tight
cropping, so its PNG has exactly `figure_pixels(name)` pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from seqsetvae.report.metrics import reliability_bins

DPI = 120
# Width and height in inches of every figure the report writes, by file name.
FIGURE_INCHES = {
    "roc.png": (6.0, 6.0),
    "precision_recall.png": (6.0, 6.0),
    "calibration.png": (6.0, 7.5),
    "sweep_importance.png": (7.0, 4.0),
    "sweep_history.png": (7.0, 4.5),
    "pretraining_curves.png": (11.0, 8.0),
}
COLORS = {"model": "tab:blue", "baseline": "tab:orange"}


def figure_pixels(name: str) -> tuple[int, int]:
    """Return (height, width) in pixels of the PNG written for figure `name`."""
    width, height = FIGURE_INCHES[name]
    return round(height * DPI), round(width * DPI)


def new_figure(name: str) -> Figure:
    figure = Figure(figsize=FIGURE_INCHES[name], dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, out_dir: Path, name: str) -> Path:
    path = out_dir / name
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _interval_text(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "undefined"
    if interval is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _title(split: str, labels: np.ndarray) -> str:
    return f"{split} split: {len(labels)} labels, {int(labels.sum())} positive"


def wilson_interval(rate: np.ndarray, count: np.ndarray, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    """Return the Wilson score interval of binomial proportions `rate` over `count` trials (95% for the default z)."""
    denominator = 1 + z**2 / count
    centre = (rate + z**2 / (2 * count)) / denominator
    half = z * np.sqrt(rate * (1 - rate) / count + z**2 / (4 * count**2)) / denominator
    # The interval contains the rate in exact arithmetic. At a rate of 0 or 1, rounding can put a bound
    # just past it, and matplotlib rejects the negative error bar that follows.
    return np.minimum(centre - half, rate), np.maximum(centre + half, rate)


def _finish_unit_square(axes, xlabel: str, ylabel: str, title: str, legend_location: str) -> None:
    """Label square axes over [0, 1] x [0, 1], the frame of the ROC and precision-recall curves."""
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_aspect("equal")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc=legend_location, fontsize=8)


def plot_roc(curves: dict[str, dict], labels: np.ndarray, split: str, out_dir: Path) -> Path:
    """Draw the ROC curve of every model, with its AUROC, interval and operating point.

    `curves` maps a model name to a dict with `probabilities`, `label` (legend
    text) and `metrics` (from `score_models`, with intervals).
    """
    figure = new_figure("roc.png")
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance (AUROC 0.5)")
    for name, curve in curves.items():
        metrics = curve["metrics"]
        if metrics["auroc"] is None:
            continue
        fpr, tpr, _ = roc_curve(labels, curve["probabilities"])
        text = _interval_text(metrics["auroc"], metrics["auroc_ci"])
        axes.plot(fpr, tpr, color=COLORS[name], linewidth=1.8, label=f"{curve['label']}: AUROC {text}")
        if metrics["sensitivity"] is not None and metrics["specificity"] is not None:
            axes.plot(
                1 - metrics["specificity"], metrics["sensitivity"], marker="o", markersize=7,
                color=COLORS[name], markeredgecolor="black", linestyle="none",
                label=f"{curve['label']}: threshold {metrics['threshold']:.3f}",
            )  # fmt: skip
    _finish_unit_square(
        axes, "False positive rate (1 − specificity)", "True positive rate (sensitivity)",
        f"ROC curve\n{_title(split, labels)}", "lower right",
    )  # fmt: skip
    return save_figure(figure, out_dir, "roc.png")


def plot_precision_recall(curves: dict[str, dict], labels: np.ndarray, split: str, out_dir: Path) -> Path:
    """Draw the precision-recall curve of every model, the positive rate, and the operating points."""
    figure = new_figure("precision_recall.png")
    axes = figure.add_subplot()
    positive_rate = float(np.mean(labels))
    axes.axhline(positive_rate, linestyle="--", color="grey", linewidth=1, label=f"chance (positive rate {positive_rate:.3f})")
    for name, curve in curves.items():
        metrics = curve["metrics"]
        if metrics["auprc"] is None:
            continue
        precision, recall, _ = precision_recall_curve(labels, curve["probabilities"])
        text = _interval_text(metrics["auprc"], metrics["auprc_ci"])
        axes.plot(
            recall, precision, drawstyle="steps-post", color=COLORS[name], linewidth=1.8,
            label=f"{curve['label']}: AUPRC {text}",
        )  # fmt: skip
        if metrics["sensitivity"] is not None and metrics["ppv"] is not None:
            axes.plot(
                metrics["sensitivity"], metrics["ppv"], marker="o", markersize=7, color=COLORS[name],
                markeredgecolor="black", linestyle="none",
                label=f"{curve['label']}: threshold {metrics['threshold']:.3f}, "
                f"min(Se, PPV) {metrics['challenge_score']:.3f}",
            )  # fmt: skip
    _finish_unit_square(
        axes, "Recall (sensitivity)", "Precision (positive predictive value)",
        f"Precision-recall curve\n{_title(split, labels)}", "upper right",
    )  # fmt: skip
    return save_figure(figure, out_dir, "precision_recall.png")


def plot_calibration(curves: dict[str, dict], labels: np.ndarray, split: str, n_bins: int, out_dir: Path) -> Path:
    """Draw the reliability diagram over equal-width bins, with the Brier score, and a histogram of predictions."""
    figure = new_figure("calibration.png")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for name, curve in curves.items():
        bins = reliability_bins(curve["probabilities"], labels, n_bins)
        filled = bins["count"] > 0
        low, high = wilson_interval(bins["observed"][filled], bins["count"][filled])
        observed = bins["observed"][filled]
        top.errorbar(
            bins["mean_predicted"][filled], observed, yerr=[observed - low, high - observed], marker="o",
            color=COLORS[name], linewidth=1.5, capsize=3, elinewidth=1, alpha=0.9,
            label=f"{curve['label']}: Brier {curve['metrics']['brier']:.4f}",
        )  # fmt: skip
        bottom.hist(
            curve["probabilities"], bins=edges, histtype="step", linewidth=1.5, color=COLORS[name], label=curve["label"]
        )
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.01)
    top.set_ylabel("Observed positive rate in bin (95% Wilson interval)")
    top.set_title(f"Calibration ({n_bins} equal-width bins)\n{_title(split, labels)}")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("Predicted probability of a positive label")
    bottom.set_ylabel("Labels per bin")
    bottom.grid(alpha=0.3)
    return save_figure(figure, out_dir, "calibration.png")
