"""Discrimination, calibration and threshold metrics, with paired bootstrap confidence intervals.

Every metric that needs both classes (AUROC, AUPRC, sensitivity) is None when
the labels have one class, with a warning, never a misleading 0 or 1.

The bootstrap resamples label indices with replacement. Each resample is kept
as a row of counts (how often each label was drawn), so the AUROC, AUPRC and
challenge score of every resample come from one sort and cumulative sums.
Two models scored on the same resamples give paired differences.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

# Resamples drawn per block; bounds the [block, n] count matrix held in memory.
BOOTSTRAP_BLOCK = 100


@dataclass(frozen=True)
class Threshold:
    """A decision threshold chosen on one split: predict positive when probability >= value.

    Attributes:
        value: The probability threshold, or None when it could not be chosen.
        score: min(sensitivity, PPV) reached on the split it was chosen on.
        split: Name of that split.
    """

    value: float | None
    score: float | None
    split: str


def _tie_group_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """Return the last index of each run of equal scores in a descending array."""
    return np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]


def _cumulative_counts(
    probabilities: np.ndarray, labels: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return true and false positives at each distinct threshold, highest first.

    `weights` is [R, n], one row of draw counts per resample. Returns `tp` and
    `fp` [R, G] for the G distinct probabilities, and those probabilities [G].
    """
    order = np.argsort(-probabilities, kind="mergesort")
    sorted_scores = probabilities[order]
    positive = labels[order].astype(np.float64)
    sorted_weights = weights[:, order]
    ends = _tie_group_ends(sorted_scores)
    tp = np.cumsum(sorted_weights * positive, axis=1)[:, ends]
    fp = np.cumsum(sorted_weights * (1.0 - positive), axis=1)[:, ends]
    return tp, fp, sorted_scores[ends]


def _auroc_auprc(tp: np.ndarray, fp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return AUROC (trapezoidal, ties count half) and average precision per row; NaN without both classes."""
    n_positive = tp[:, -1:]
    n_negative = fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.concatenate([np.zeros_like(n_positive), tp / n_positive], axis=1)
        fpr = np.concatenate([np.zeros_like(n_negative), fp / n_negative], axis=1)
        auroc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2.0, axis=1)

        # Average precision as scikit-learn defines it: sum over thresholds of
        # (recall step) * precision. A threshold where nothing is predicted
        # positive adds no recall, so its undefined precision counts as 0.
        predicted = tp + fp
        precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1.0), 0.0)
        auprc = np.sum(np.diff(tpr, axis=1) * precision, axis=1)
    undefined = (n_positive[:, 0] == 0) | (n_negative[:, 0] == 0)
    auroc[undefined] = np.nan
    auprc[undefined] = np.nan
    return auroc, auprc


def _threshold_counts(
    probabilities: np.ndarray, labels: np.ndarray, threshold: float, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return weighted true positives, false positives and false negatives [R] at `threshold`."""
    predicted = probabilities >= threshold
    positive = labels.astype(bool)
    tp = weights @ (predicted & positive).astype(np.float64)
    fp = weights @ (predicted & ~positive).astype(np.float64)
    fn = weights @ (~predicted & positive).astype(np.float64)
    return tp, fp, fn


def _challenge_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Return min(sensitivity, PPV); NaN without positive labels.

    With no positive prediction PPV is undefined, but sensitivity is 0, so
    the score is 0.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = tp / (tp + fn)
        ppv = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1.0), 0.0)
    score = np.minimum(sensitivity, ppv)
    score[(tp + fn) == 0] = np.nan
    return score


def choose_threshold(probabilities: np.ndarray, labels: np.ndarray, split: str) -> Threshold:
    """Choose the threshold that maximises min(sensitivity, PPV) on one split.

    Candidates are the split's distinct predicted probabilities. Ties go to
    the highest threshold, the one that flags the fewest labels.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if len(labels) == 0 or labels.all() or not labels.any():
        logger.warning(
            "Split '%s' has %d labels of one class: the decision threshold is undefined", split, len(labels)
        )
        return Threshold(None, None, split)
    tp, fp, thresholds = _cumulative_counts(probabilities, labels, np.ones((1, len(labels))))
    fn = tp[0, -1] - tp[0]
    scores = _challenge_from_counts(tp[0], fp[0], fn)
    best = int(np.argmax(scores))
    return Threshold(float(thresholds[best]), float(scores[best]), split)


def bootstrap_weights(n: int, resamples: int, seed: int):
    """Yield blocks of draw counts [block, n]: each row is one resample of n labels with replacement."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, BOOTSTRAP_BLOCK):
        block = min(BOOTSTRAP_BLOCK, resamples - start)
        drawn = rng.integers(0, n, size=(block, n))
        offsets = (np.arange(block) * n)[:, None]
        yield np.bincount((drawn + offsets).ravel(), minlength=block * n).reshape(block, n).astype(np.float64)


def _resampled_metrics(
    probabilities: np.ndarray, labels: np.ndarray, threshold: float | None, weights: np.ndarray
) -> dict[str, np.ndarray]:
    tp, fp, _ = _cumulative_counts(probabilities, labels, weights)
    auroc, auprc = _auroc_auprc(tp, fp)
    values = {"auroc": auroc, "auprc": auprc}
    if threshold is not None:
        values["challenge_score"] = _challenge_from_counts(*_threshold_counts(probabilities, labels, threshold, weights))
    return values


def bootstrap_metrics(
    predictions: dict[str, np.ndarray],
    labels: np.ndarray,
    thresholds: dict[str, float | None],
    resamples: int,
    seed: int,
) -> dict[str, dict[str, np.ndarray]]:
    """Return AUROC, AUPRC and challenge score of every model on the same resamples.

    `predictions` maps a model name to its probabilities for `labels`. The
    result maps each model name to metric arrays [resamples], NaN where a
    resample drew one class only.
    """
    labels = np.asarray(labels, dtype=bool)
    blocks: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in predictions}
    for weights in bootstrap_weights(len(labels), resamples, seed):
        for name, probabilities in predictions.items():
            values = _resampled_metrics(np.asarray(probabilities, np.float64), labels, thresholds.get(name), weights)
            for metric, array in values.items():
                blocks[name].setdefault(metric, []).append(array)
    return {name: {metric: np.concatenate(parts) for metric, parts in metrics.items()} for name, metrics in blocks.items()}


def percentile_interval(values: np.ndarray, confidence: float, metric_name: str) -> list[float] | None:
    """Return the percentile interval of the finite `values`, or None when there are none.

    Resamples that drew one class have no value and are left out, with a
    warning, so the interval describes resamples with both classes.
    """
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        logger.warning("No bootstrap resample has both classes: the confidence interval of %s is undefined", metric_name)
        return None
    if len(finite) < len(values):
        logger.warning(
            "%d of %d bootstrap resamples drew one class and are left out of the interval of %s",
            len(values) - len(finite),
            len(values),
            metric_name,
        )
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return [float(low), float(high)]


def point_metrics(probabilities: np.ndarray, labels: np.ndarray, threshold: float | None) -> dict:
    """Return AUROC, AUPRC, Brier score, accuracy at 0.5, and the threshold metrics of one model.

    Threshold metrics (challenge score, sensitivity, PPV, specificity,
    accuracy at the threshold, predicted positive rate) are None when
    `threshold` is None.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n = len(labels)
    n_positive = int(labels.sum())
    if n == 0:
        raise ValueError("expected at least one label, got none")
    two_classes = 0 < n_positive < n
    if not two_classes:
        logger.warning("Only one class among %d labels: AUROC, AUPRC and sensitivity are undefined", n)

    tp, fp, _ = _cumulative_counts(probabilities, labels, np.ones((1, n)))
    auroc, auprc = _auroc_auprc(tp, fp)
    metrics = {
        "auroc": float(auroc[0]) if two_classes else None,
        "auprc": float(auprc[0]) if two_classes else None,
        "accuracy": float(np.mean((probabilities >= 0.5) == labels)),
        "brier": float(np.mean((probabilities - labels) ** 2)),
        "threshold": threshold,
    }
    metrics.update(_threshold_metrics(probabilities, labels, threshold))
    return metrics


def _threshold_metrics(probabilities: np.ndarray, labels: np.ndarray, threshold: float | None) -> dict:
    names = ("challenge_score", "sensitivity", "ppv", "specificity", "accuracy_at_threshold", "predicted_positive_rate")
    if threshold is None:
        return dict.fromkeys(names)
    tp, fp, fn = (float(count[0]) for count in _threshold_counts(probabilities, labels, threshold, np.ones((1, len(labels)))))
    tn = len(labels) - tp - fp - fn
    score = _challenge_from_counts(np.array([tp]), np.array([fp]), np.array([fn]))[0]
    return {
        "challenge_score": None if np.isnan(score) else float(score),
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "ppv": tp / (tp + fp) if tp + fp else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "accuracy_at_threshold": (tp + tn) / len(labels),
        "predicted_positive_rate": (tp + fp) / len(labels),
    }


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """Return, per equal-width probability bin, the label count, mean prediction and observed positive rate.

    Empty bins have count 0 and NaN means.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # The last bin is closed on the right so a probability of exactly 1 is counted.
    index = np.clip(np.searchsorted(edges, probabilities, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=probabilities, minlength=n_bins) / count
        observed = np.bincount(index, weights=labels, minlength=n_bins) / count
    return {"edges": edges, "count": count, "mean_predicted": mean_predicted, "observed": observed}
