"""Evaluate an exported model on one split: metrics and MEDS-style predictions."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchmetrics.functional.classification import binary_accuracy, binary_auroc, binary_average_precision

from seqsetvae.cache import SplitCache, ensure_cache
from seqsetvae.data import SetSequenceDataset, length_sorted_batches
from seqsetvae.export import load_export

logger = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("prediction_time", pa.timestamp("us"), nullable=False),
        pa.field("boolean_value", pa.bool_()),
        pa.field("predicted_boolean_value", pa.bool_()),
        pa.field("predicted_boolean_probability", pa.float64()),
    ]
)


def binary_metrics(probabilities: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
    """Return AUROC, AUPRC, accuracy, n and n_positive.

    AUROC and AUPRC are undefined when the labels have one class; they are then
    reported as None with a warning instead of a misleading 0 or 1.
    """
    n_positive = int(labels.sum())
    metrics = {"n": int(len(labels)), "n_positive": n_positive}
    preds = torch.as_tensor(probabilities, dtype=torch.float32)
    target = torch.as_tensor(labels.astype(np.int64))
    metrics["accuracy"] = float(binary_accuracy(preds, target, threshold=threshold)) if len(labels) else None
    if 0 < n_positive < len(labels):
        metrics["auroc"] = float(binary_auroc(preds, target))
        metrics["auprc"] = float(binary_average_precision(preds, target))
    else:
        logger.warning("Only one class among %d labels: AUROC and AUPRC are undefined", len(labels))
        metrics["auroc"] = None
        metrics["auprc"] = None
    return metrics


@torch.no_grad()
def predict_split(model, cache: SplitCache, batch_size: int = 256) -> np.ndarray:
    """Return the predicted probability of every label of a cached split."""
    dataset = SetSequenceDataset(cache, model.data_config.max_sets, labelled=True)
    probabilities = np.zeros(len(dataset), dtype=np.float32)
    for positions, batch in length_sorted_batches(dataset, batch_size):
        probabilities[positions] = torch.sigmoid(model.predict_logits(batch)).numpy()
    return probabilities


def evaluate(
    export_dir: str | Path,
    meds_root: str | Path,
    split: str,
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    task: str | None = None,
) -> dict:
    """Predict every label of `split` and write `metrics.json` and `predictions.parquet` to `out_dir`."""
    model = load_export(export_dir)
    data_config = model.data_config
    if task:
        data_config.task = task
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    reports = ensure_cache(
        meds_root, cache, data_config, model.preprocessor, splits=(split,), required=(split,), need_labels=True
    )
    if reports[split].n_unknown_code_events:
        logger.warning("%d events of split '%s' have codes unseen in training", reports[split].n_unknown_code_events, split)

    split_cache = SplitCache(cache, split, task=data_config.task)
    probabilities = predict_split(model, split_cache)
    labels = split_cache.labels["value"].astype(bool)
    metrics = binary_metrics(probabilities, labels)
    metrics["split"] = split
    metrics["n_unknown_code_events"] = reports[split].n_unknown_code_events

    subject_ids = np.asarray(split_cache.subject_ids)[split_cache.labels["subject_pos"]]
    table = pa.table(
        {
            "subject_id": pa.array(subject_ids, pa.int64()),
            "prediction_time": pa.array(split_cache.labels["prediction_time_us"], pa.int64()).cast(pa.timestamp("us")),
            "boolean_value": pa.array(labels),
            "predicted_boolean_value": pa.array(probabilities >= 0.5),
            "predicted_boolean_probability": pa.array(probabilities.astype(np.float64)),
        },
        schema=PREDICTION_SCHEMA,
    )
    pq.write_table(table, out / "predictions.parquet")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info(
        "Evaluated %d labels of split '%s': AUROC %s, AUPRC %s",
        metrics["n"],
        split,
        _fmt(metrics["auroc"]),
        _fmt(metrics["auprc"]),
    )
    return metrics


def _fmt(value: float | None) -> str:
    return "undefined" if value is None or math.isnan(value) else f"{value:.4f}"
