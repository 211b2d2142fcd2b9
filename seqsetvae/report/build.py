"""The evaluation report: the model beside a gradient-boosting baseline on one split.

Writes to the output directory:

    report.md                  the numbers, the figures and what they show
    report.json                the same numbers
    roc.png, precision_recall.png, calibration.png
    sweep_importance.png, sweep_history.png     with a sweep directory
    pretraining_curves.png                      with a pretraining directory

The decision threshold of each model is the one that maximises
min(sensitivity, PPV) on the tuning split; the evaluated split never chooses it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from seqsetvae import meds_io
from seqsetvae.cache import SplitCache, ensure_cache
from seqsetvae.config import ReportConfig
from seqsetvae.evaluate import predict_split
from seqsetvae.export import load_export
from seqsetvae.report import figures
from seqsetvae.report.baseline import LabelRows, fit_baseline, read_split_events
from seqsetvae.report.markdown import render_markdown
from seqsetvae.report.metrics import bootstrap_metrics, choose_threshold, percentile_interval, point_metrics
from seqsetvae.report.sweep_insight import sweep_insight
from seqsetvae.report.training_curves import pretraining_insight

logger = logging.getLogger(__name__)

THRESHOLD_SPLIT = meds_io.meds.tuning_split
MODEL_NAMES = {"model": "seqsetvae", "baseline": "gradient boosting"}


def cache_label_rows(cache: SplitCache) -> LabelRows:
    """Return the labels of a cached split in the order the model predicts them."""
    return LabelRows(
        subject_id=np.asarray(cache.subject_ids)[cache.labels["subject_pos"]].astype(np.int64),
        prediction_time_us=np.asarray(cache.labels["prediction_time_us"], dtype=np.int64),
        label=np.asarray(cache.labels["value"], dtype=bool),
    )


def meds_label_rows(meds_root: Path, task: str, split: str) -> LabelRows:
    """Return the labels of `split` read from the MEDS labels, sorted by subject and prediction time."""
    labels = meds_io.read_labels(meds_root, task, meds_io.split_subject_ids(meds_root, split))
    subject = labels.column("subject_id").to_numpy()
    time_us = pc.cast(labels.column("prediction_time"), "int64").to_numpy()
    order = np.lexsort((time_us, subject))
    value = labels.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool)
    return LabelRows(subject[order].astype(np.int64), time_us[order].astype(np.int64), value[order])


def run_dirs_beside(export_dir: str | Path) -> tuple[Path | None, Path | None]:
    """Return the `sweep/` and `pretrain/` directories next to an export inside a run directory, where they exist."""
    run_dir = Path(export_dir).resolve().parent
    sweep = run_dir / "sweep"
    pretrain = run_dir / "pretrain"
    return (sweep if (sweep / "trials.csv").is_file() else None, pretrain if pretrain.is_dir() else None)


def score_models(
    test: dict[str, np.ndarray],
    test_labels: np.ndarray,
    tuning: dict[str, np.ndarray],
    tuning_labels: np.ndarray,
    config: ReportConfig,
    threshold_split: str = THRESHOLD_SPLIT,
) -> dict[str, dict]:
    """Return the metrics of every model on the test labels, with bootstrap intervals.

    `test` and `tuning` map a model name to its probabilities on the test and
    tuning labels. Each model's threshold comes from its tuning predictions
    only. The result maps each model name to its metrics. With two models,
    `difference` contains the first minus the second, with intervals from the
    same resamples.
    """
    test_labels = np.asarray(test_labels, dtype=bool)
    thresholds = {name: choose_threshold(tuning[name], tuning_labels, threshold_split) for name in test}
    resampled = bootstrap_metrics(
        test, test_labels, {name: choice.value for name, choice in thresholds.items()},
        config.bootstrap_resamples, config.report_seed,
    )  # fmt: skip
    n_positive = int(test_labels.sum())
    scored = {}
    for name, probabilities in test.items():
        metrics = point_metrics(probabilities, test_labels, thresholds[name].value)
        metrics["tuning_challenge_score"] = thresholds[name].score
        metrics["threshold_split"] = threshold_split
        for metric in ("auroc", "auprc", "challenge_score"):
            values = resampled[name].get(metric)
            defined = metrics[metric] is not None and values is not None
            metrics[f"{metric}_ci"] = (
                percentile_interval(values, config.confidence_level, f"{metric} of {name}") if defined else None
            )
        metrics.update({"n": len(test_labels), "n_positive": n_positive, "positive_rate": n_positive / len(test_labels)})
        scored[name] = metrics

    scored["difference"] = {}
    if len(test) == 2:
        first, second = test
        for metric in ("auroc", "auprc"):
            if scored[first][metric] is None or scored[second][metric] is None:
                continue
            scored["difference"][metric] = scored[first][metric] - scored[second][metric]
            scored["difference"][f"{metric}_ci"] = percentile_interval(
                resampled[first][metric] - resampled[second][metric], config.confidence_level, f"{metric} difference"
            )
    return scored


def predict_splits(
    model, root: Path, cache: Path, task: str, splits: tuple[str, ...], config: ReportConfig
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, LabelRows], dict]:
    """Return each model's probabilities per split, the label rows per split, and the baseline's description.

    The model predicts from the tensor cache. The baseline is fitted on the
    train split's MEDS events and predicts the same label rows as the model.
    """
    logger.info("Predicting the labels of splits %s with the exported model", ", ".join(splits))
    caches = {name: SplitCache(cache, name, task=task) for name in splits}
    rows = {name: cache_label_rows(caches[name]) for name in splits}
    predictions = {"model": {name: predict_split(model, caches[name]) for name in splits}}

    logger.info("Fitting the gradient-boosting baseline on the train split")
    baseline = fit_baseline(
        read_split_events(root, meds_io.meds.train_split),
        meds_label_rows(root, task, meds_io.meds.train_split),
        config.baseline_max_codes,
        config.report_seed,
    )
    predictions["baseline"] = {name: baseline.predict(read_split_events(root, name), rows[name]) for name in splits}
    return predictions, rows, baseline.info


def draw_model_figures(
    predictions: dict[str, np.ndarray], scored: dict, labels: np.ndarray, split: str, config: ReportConfig, out: Path
) -> dict[str, str]:
    """Draw the ROC, precision-recall and calibration figures of both models; return their file names."""
    curves = {
        name: {"probabilities": predictions[name], "label": MODEL_NAMES[name], "metrics": scored[name]}
        for name in MODEL_NAMES
    }
    paths = [
        figures.plot_roc(curves, labels, split, out),
        figures.plot_precision_recall(curves, labels, split, out),
        figures.plot_calibration(curves, labels, split, config.calibration_bins, out),
    ]
    return {path.stem: path.name for path in paths}


def write_report(
    export_dir: str | Path,
    meds_root: str | Path,
    split: str,
    out_dir: str | Path,
    config: ReportConfig,
    cache_dir: str | Path | None = None,
    task: str | None = None,
    sweep_dir: str | Path | None = None,
    pretrain_dir: str | Path | None = None,
) -> dict:
    """Evaluate the export and the baseline on `split`, write the report to `out_dir` and return report.json's content."""
    model = load_export(export_dir)
    data_config = model.data_config
    if task:
        data_config.task = task
    root = meds_io.check_meds_root(meds_root)
    if split == THRESHOLD_SPLIT:
        logger.warning("The report evaluates the split that chooses the threshold; its challenge score is optimistic")
    if split == meds_io.meds.train_split:
        logger.warning("The report evaluates the train split, on which the baseline is fitted; its numbers are optimistic")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    evaluated_splits = tuple(dict.fromkeys((THRESHOLD_SPLIT, split)))
    # The baseline reads the train split, so it is checked before any work starts.
    meds_io.split_subject_ids(root, meds_io.meds.train_split)
    ensure_cache(
        root, cache, data_config, model.preprocessor, splits=evaluated_splits, required=evaluated_splits, need_labels=True
    )

    predictions, rows, baseline_info = predict_splits(model, root, cache, data_config.task, evaluated_splits, config)
    scored = score_models(
        {name: predictions[name][split] for name in MODEL_NAMES},
        rows[split].label,
        {name: predictions[name][THRESHOLD_SPLIT] for name in MODEL_NAMES},
        rows[THRESHOLD_SPLIT].label,
        config,
    )
    figure_names = draw_model_figures(
        {name: predictions[name][split] for name in MODEL_NAMES}, scored, rows[split].label, split, config, out
    )
    sweep = sweep_insight(Path(sweep_dir), out, config.report_seed) if sweep_dir else None
    pretraining = pretraining_insight(Path(pretrain_dir), out) if pretrain_dir else None
    for section in (sweep, pretraining):
        for name in (section or {}).get("figures", []):
            figure_names[Path(name).stem] = name

    report = {
        "split": split,
        "task": data_config.task,
        "export_dir": str(Path(export_dir).resolve()),
        "data": str(root.resolve()),
        **scored["model"],
        "baseline": {**scored["baseline"], "info": baseline_info},
        "difference": scored["difference"],
        "bootstrap": {
            "resamples": config.bootstrap_resamples,
            "confidence_level": config.confidence_level,
            "seed": config.report_seed,
            "method": "percentile",
        },
        "config": asdict(config),
        "figures": figure_names,
        "sweep": {key: value for key, value in sweep.items() if key != "table_markdown"} if sweep else None,
        "pretraining": pretraining,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render_markdown(report, sweep))
    logger.info(
        "Report on split '%s' written to %s: AUROC %s (baseline %s)",
        split,
        out / "report.md",
        _fmt(report["auroc"]),
        _fmt(report["baseline"]["auroc"]),
    )
    return report


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"
