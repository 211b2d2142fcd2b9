"""Report metrics: bootstrap intervals, the challenge score and its threshold, calibration bins."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from seqsetvae.config import ReportConfig
from seqsetvae.report.build import score_models
from seqsetvae.report.figures import plot_calibration, wilson_interval
from seqsetvae.report.metrics import (
    BOOTSTRAP_BLOCK,
    _auroc_auprc,
    _cumulative_counts,
    bootstrap_metrics,
    choose_threshold,
    percentile_interval,
    point_metrics,
    reliability_bins,
)


def random_case(seed: int, n: int = 200, rate: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < rate
    # Rounded scores give ties; shifted positives give a useful model.
    probabilities = np.clip(np.round(rng.random(n) * 0.7 + 0.3 * labels, 2), 0, 1)
    return probabilities, labels


@pytest.mark.parametrize("seed", range(5))
def test_weighted_curves_match_sklearn(seed):
    probabilities, labels = random_case(seed)
    weights = np.random.default_rng(seed + 100).integers(0, 3, size=(4, len(labels))).astype(float)
    tp, fp, _ = _cumulative_counts(probabilities, labels, weights)
    auroc, auprc = _auroc_auprc(tp, fp)
    for row in range(4):
        assert auroc[row] == pytest.approx(roc_auc_score(labels, probabilities, sample_weight=weights[row]), abs=1e-12)
        assert auprc[row] == pytest.approx(
            average_precision_score(labels, probabilities, sample_weight=weights[row]), abs=1e-12
        )


def test_bootstrap_equals_explicit_resampling():
    probabilities, labels = random_case(7, n=60)
    resamples = BOOTSTRAP_BLOCK + 20
    values = bootstrap_metrics({"m": probabilities}, labels, {"m": 0.5}, resamples, seed=3)["m"]
    rng = np.random.default_rng(3)
    indices = np.concatenate(
        [rng.integers(0, 60, size=(BOOTSTRAP_BLOCK, 60)), rng.integers(0, 60, size=(20, 60))]
    )
    for row in (0, 57, BOOTSTRAP_BLOCK + 5):
        sample_labels, sample_probabilities = labels[indices[row]], probabilities[indices[row]]
        assert values["auroc"][row] == pytest.approx(roc_auc_score(sample_labels, sample_probabilities), abs=1e-12)
        assert values["auprc"][row] == pytest.approx(
            average_precision_score(sample_labels, sample_probabilities), abs=1e-12
        )
        predicted = sample_probabilities >= 0.5
        tp = np.sum(predicted & sample_labels)
        expected = min(tp / sample_labels.sum(), tp / predicted.sum())
        assert values["challenge_score"][row] == pytest.approx(expected, abs=1e-12)


def test_bootstrap_is_seeded():
    probabilities, labels = random_case(1)
    first = bootstrap_metrics({"m": probabilities}, labels, {"m": None}, 50, seed=0)["m"]["auroc"]
    again = bootstrap_metrics({"m": probabilities}, labels, {"m": None}, 50, seed=0)["m"]["auroc"]
    other = bootstrap_metrics({"m": probabilities}, labels, {"m": None}, 50, seed=1)["m"]["auroc"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_perfect_predictions_give_interval_of_one():
    labels = np.array([0, 1] * 20, dtype=bool)
    probabilities = np.where(labels, 0.9, 0.1)
    values = bootstrap_metrics({"m": probabilities}, labels, {"m": 0.5}, 200, seed=0)["m"]
    assert percentile_interval(values["auroc"], 0.95, "auroc") == [1.0, 1.0]
    assert percentile_interval(values["auprc"], 0.95, "auprc") == [1.0, 1.0]
    assert percentile_interval(values["challenge_score"], 0.95, "challenge score") == [1.0, 1.0]


def test_interval_contains_point_estimate():
    probabilities, labels = random_case(2, n=300)
    point = point_metrics(probabilities, labels, 0.5)
    values = bootstrap_metrics({"m": probabilities}, labels, {"m": 0.5}, 400, seed=0)["m"]
    for metric in ("auroc", "auprc", "challenge_score"):
        low, high = percentile_interval(values[metric], 0.95, metric)
        assert low <= point[metric] <= high
        assert low < high


def test_one_class_resamples_are_left_out(caplog):
    labels = np.zeros(30, dtype=bool)
    labels[0] = True
    probabilities = np.linspace(0, 1, 30)
    values = bootstrap_metrics({"m": probabilities}, labels, {"m": None}, 100, seed=0)["m"]
    # About (29/30)^30 = 36% of resamples miss the only positive.
    n_undefined = int(np.isnan(values["auroc"]).sum())
    assert 10 < n_undefined < 70
    with caplog.at_level(logging.WARNING, logger="seqsetvae.report.metrics"):
        interval = percentile_interval(values["auroc"], 0.95, "auroc")
    assert interval is not None
    assert f"{n_undefined} of 100 bootstrap resamples" in caplog.text


def test_one_class_metrics_are_none(caplog):
    labels = np.zeros(10, dtype=bool)
    probabilities = np.linspace(0, 1, 10)
    with caplog.at_level(logging.WARNING, logger="seqsetvae.report.metrics"):
        metrics = point_metrics(probabilities, labels, 0.5)
        threshold = choose_threshold(probabilities, labels, "tuning")
    assert metrics["auroc"] is None
    assert metrics["auprc"] is None
    assert metrics["challenge_score"] is None
    assert metrics["sensitivity"] is None
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert threshold.value is None
    assert "undefined" in caplog.text
    values = bootstrap_metrics({"m": probabilities}, labels, {"m": None}, 20, seed=0)["m"]
    assert percentile_interval(values["auroc"], 0.95, "auroc") is None


# Five labels scored by hand: positives at 0.9 and 0.4, negatives at 0.6, 0.2 and 0.1.
HAND_LABELS = np.array([1, 1, 0, 0, 0], dtype=bool)
HAND_PROBABILITIES = np.array([0.9, 0.4, 0.6, 0.2, 0.1])


@pytest.mark.parametrize(
    ("threshold", "sensitivity", "ppv", "score"),
    [
        (0.5, 1 / 2, 1 / 2, 1 / 2),  # flags 0.9 and 0.6: one of two positives, one of two flagged
        (0.3, 2 / 2, 2 / 3, 2 / 3),  # flags 0.9, 0.6 and 0.4
        (0.95, 0.0, None, 0.0),  # flags nothing: PPV undefined, sensitivity 0
    ],
)
def test_challenge_score_by_hand(threshold, sensitivity, ppv, score):
    metrics = point_metrics(HAND_PROBABILITIES, HAND_LABELS, threshold)
    assert metrics["sensitivity"] == pytest.approx(sensitivity)
    assert metrics["ppv"] == (None if ppv is None else pytest.approx(ppv))
    assert metrics["challenge_score"] == pytest.approx(score)


def test_threshold_maximises_challenge_score():
    # min(Se, PPV) at each candidate: 0.9 -> 0.5, 0.6 -> 0.5, 0.4 -> 2/3, 0.2 -> 0.5, 0.1 -> 0.4.
    chosen = choose_threshold(HAND_PROBABILITIES, HAND_LABELS, "tuning")
    assert chosen.value == pytest.approx(0.4)
    assert chosen.score == pytest.approx(2 / 3)
    assert chosen.split == "tuning"


def test_threshold_ties_go_to_highest():
    labels = np.array([1, 0, 1, 0], dtype=bool)
    probabilities = np.array([0.8, 0.6, 0.4, 0.2])
    # 0.8 -> min(0.5, 1) = 0.5; 0.6 -> min(0.5, 0.5) = 0.5; 0.4 -> min(1, 2/3); so 0.4 wins here.
    assert choose_threshold(probabilities, labels, "tuning").value == pytest.approx(0.4)
    labels = np.array([1, 0, 0, 1], dtype=bool)
    # 0.8 -> 0.5; 0.6 -> 0.5; 0.4 -> min(0.5, 1/3); 0.2 -> min(1, 0.5) = 0.5: the highest of the ties.
    assert choose_threshold(probabilities, labels, "tuning").value == pytest.approx(0.8)


def test_threshold_comes_from_tuning_not_test():
    tuning_labels = np.array([1, 1, 0, 0, 0, 0], dtype=bool)
    tuning = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])  # best on tuning: threshold 0.8, score 1
    test_labels = np.array([1, 1, 0, 0, 0, 0], dtype=bool)
    test = np.array([0.9, 0.5, 0.4, 0.3, 0.2, 0.1])  # best on test would be 0.5, score 1
    scored = score_models(
        {"model": test, "baseline": test}, test_labels, {"model": tuning, "baseline": tuning}, tuning_labels,
        ReportConfig(bootstrap_resamples=20),
    )  # fmt: skip
    assert scored["model"]["threshold"] == pytest.approx(0.8)
    assert scored["model"]["tuning_challenge_score"] == pytest.approx(1.0)
    # At 0.8 the test split flags only 0.9: sensitivity 1/2, PPV 1.
    assert scored["model"]["challenge_score"] == pytest.approx(0.5)
    assert choose_threshold(test, test_labels, "held_out").score == pytest.approx(1.0)


def test_difference_of_identical_models_is_zero():
    probabilities, labels = random_case(4)
    scored = score_models(
        {"model": probabilities, "baseline": probabilities}, labels,
        {"model": probabilities, "baseline": probabilities}, labels, ReportConfig(bootstrap_resamples=50),
    )  # fmt: skip
    assert scored["difference"]["auroc"] == 0.0
    assert scored["difference"]["auroc_ci"] == [0.0, 0.0]
    assert scored["model"]["auroc_ci"] == scored["baseline"]["auroc_ci"]


def test_point_metrics_match_sklearn():
    probabilities, labels = random_case(5)
    metrics = point_metrics(probabilities, labels, 0.5)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, probabilities), abs=1e-12)
    assert metrics["auprc"] == pytest.approx(average_precision_score(labels, probabilities), abs=1e-12)
    assert metrics["brier"] == pytest.approx(np.mean((probabilities - labels) ** 2))
    assert metrics["accuracy"] == pytest.approx(np.mean((probabilities >= 0.5) == labels))


def test_reliability_bins_count_every_label():
    probabilities = np.array([0.0, 0.05, 0.1, 0.55, 0.999, 1.0])
    labels = np.array([0, 0, 1, 1, 1, 0], dtype=bool)
    bins = reliability_bins(probabilities, labels, 10)
    assert bins["count"].sum() == 6
    assert bins["count"][0] == 2
    assert bins["count"][1] == 1
    assert bins["count"][9] == 2  # 1.0 joins the last bin
    assert bins["observed"][9] == pytest.approx(0.5)
    assert np.isnan(bins["observed"][3])


def test_wilson_interval_known_values():
    low, high = wilson_interval(np.array([0.0, 0.5]), np.array([10, 100]))
    # Worked by hand from the Wilson score formula with z = 1.96: 0 of 10 gives [0, 0.2775], 50 of 100 [0.4038, 0.5962].
    assert low[0] == pytest.approx(0.0, abs=1e-12)
    assert high[0] == pytest.approx(0.2775, abs=1e-4)
    assert low[1] == pytest.approx(0.4038, abs=1e-4)
    assert high[1] == pytest.approx(0.5962, abs=1e-4)


def test_wilson_interval_contains_rates_of_zero_and_one():
    # At these counts the formula's bounds land a rounding error past a rate of 0 or 1.
    count = np.arange(1, 400, dtype=np.float64)
    for rate in (0.0, 1.0):
        low, high = wilson_interval(np.full_like(count, rate), count)
        assert (low <= rate).all()
        assert (high >= rate).all()


def test_calibration_figure_with_an_all_negative_bin(tmp_path):
    # 69 negatives in the lowest bin and 4 positives in the highest: bins at rates 0 and 1.
    probabilities = np.r_[np.full(69, 0.05), np.full(4, 0.95), np.full(20, 0.5)]
    labels = np.r_[np.zeros(69), np.ones(4), np.arange(20) % 2].astype(bool)
    curves = {"model": {"probabilities": probabilities, "label": "model", "metrics": {"brier": 0.1}}}
    path = plot_calibration(curves, labels, "held_out", 10, tmp_path)
    assert path.stat().st_size > 0
