"""A gradient-boosting baseline on per-code summary features of each stay.

For every label, the events of its subject at or before the prediction time
(static events, which have no time, always count) are summarised per code as
the last, minimum, maximum and mean value and the number of events. A
scikit-learn `HistGradientBoostingClassifier`, which handles the missing
values of codes never measured, is fitted on the train split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.ensemble import HistGradientBoostingClassifier

from seqsetvae import meds_io
from seqsetvae.errors import UserInputError

logger = logging.getLogger(__name__)

STATISTICS = ("last", "min", "max", "mean", "count")
# Below this many train labels of either class the baseline trains without early stopping.
MIN_LABELS_FOR_EARLY_STOPPING = 20
ITERATIONS_WITHOUT_EARLY_STOPPING = 100
# Static events have no time; this sentinel sorts them before every prediction time.
STATIC_TIME_US = np.iinfo(np.int64).min


@dataclass
class LabelRows:
    """The labels of one split, in the order every model predicts them.

    Attributes:
        subject_id: Subject of each label [n].
        prediction_time_us: Prediction time in microseconds since the epoch [n].
        label: Boolean label [n].
    """

    subject_id: np.ndarray
    prediction_time_us: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)


def read_split_events(meds_root: str | Path, split: str) -> pd.DataFrame:
    """Read the events of `split` as columns subject_id, time_us, code and value (NaN without a value)."""
    root = meds_io.check_meds_root(meds_root)
    ids = meds_io.split_subject_ids(root, split)
    table = pa.concat_tables([meds_io.read_events(path, ids) for path in meds_io.event_files(root, split)])
    time_us = table.column("time").cast(pa.int64()).fill_null(STATIC_TIME_US)
    return pd.DataFrame(
        {
            "subject_id": table.column("subject_id").to_numpy(),
            "time_us": time_us.to_numpy(),
            "code": table.column("code").to_pandas(),
            "value": table.column("numeric_value").cast(pa.float64()).to_numpy(zero_copy_only=False),
        }
    )


def summary_features(events: pd.DataFrame, labels: LabelRows, codes: list[str]) -> pd.DataFrame:
    """Return one row per label and one column `<code>/<statistic>` per code and statistic.

    Only events at or before each label's prediction time are summarised.
    Value statistics are NaN where the code has no value before that time;
    counts are 0 there.
    """
    rows = pd.DataFrame(
        {
            "label_row": np.arange(len(labels)),
            "subject_id": labels.subject_id,
            "prediction_time_us": labels.prediction_time_us,
        }
    )
    known = events[events["code"].isin(codes)]
    # NOTE: the merge pairs every label with every event of its subject, so a
    # split with many labels per subject needs that many copies in memory.
    merged = rows.merge(known, on="subject_id", how="inner")
    merged = merged[merged["time_us"] <= merged["prediction_time_us"]]
    merged = merged.sort_values(["label_row", "code", "time_us"], kind="stable")
    stats = merged.groupby(["label_row", "code"], sort=False).agg(
        last=("value", "last"),
        min=("value", "min"),
        max=("value", "max"),
        mean=("value", "mean"),
        count=("value", "size"),
    )
    wide = stats.unstack("code")
    columns = pd.MultiIndex.from_product([list(STATISTICS), codes])
    wide = wide.reindex(index=pd.RangeIndex(len(labels)), columns=columns)
    wide["count"] = wide["count"].fillna(0.0)
    wide.columns = [f"{code}/{statistic}" for statistic, code in wide.columns]
    return wide.astype(np.float64)


def most_frequent_codes(events: pd.DataFrame, max_codes: int) -> list[str]:
    """Return up to `max_codes` codes with the most events, ties broken by name."""
    counts = events["code"].value_counts()
    ranked = counts.reset_index().sort_values(["count", "code"], ascending=[False, True], kind="stable")
    if len(ranked) > max_codes:
        logger.info("The baseline keeps the %d most frequent of %d codes", max_codes, len(ranked))
    return ranked["code"].head(max_codes).tolist()


@dataclass
class GradientBoostingBaseline:
    """A fitted baseline: the codes and feature columns chosen on the train split, and the classifier."""

    codes: list[str]
    columns: list[str]
    classifier: HistGradientBoostingClassifier
    info: dict = field(default_factory=dict)

    def predict(self, events: pd.DataFrame, labels: LabelRows) -> np.ndarray:
        """Return the predicted probability of every label."""
        features = summary_features(events, labels, self.codes)[self.columns]
        return self.classifier.predict_proba(features.to_numpy())[:, 1]


def fit_baseline(events: pd.DataFrame, labels: LabelRows, max_codes: int, seed: int) -> GradientBoostingBaseline:
    """Fit the baseline on the events and labels of the train split.

    Raises:
        UserInputError: the train labels have one class.
    """
    if labels.label.all() or not labels.label.any():
        raise UserInputError(
            f"train split: expected labels of both classes to fit the baseline, got {len(labels)} labels of one class"
        )
    codes = most_frequent_codes(events, max_codes)
    features = summary_features(events, labels, codes)
    # A value statistic of a code that never has a value is NaN everywhere and carries nothing.
    columns = [name for name in features.columns if features[name].notna().any()]
    # Early stopping holds out a stratified 10% of the train labels, which needs a few labels of each class.
    smaller_class = int(min(labels.label.sum(), (~labels.label).sum()))
    early_stopping = smaller_class >= MIN_LABELS_FOR_EARLY_STOPPING
    if not early_stopping:
        logger.warning(
            "The train split has %d labels of its smaller class, fewer than %d: the baseline runs %d boosting "
            "iterations without early stopping",
            smaller_class,
            MIN_LABELS_FOR_EARLY_STOPPING,
            ITERATIONS_WITHOUT_EARLY_STOPPING,
        )
    classifier = HistGradientBoostingClassifier(
        learning_rate=0.05,
        max_iter=500 if early_stopping else ITERATIONS_WITHOUT_EARLY_STOPPING,
        early_stopping=early_stopping,
        validation_fraction=0.1,
        n_iter_no_change=20,
        random_state=seed,
    )
    classifier.fit(features[columns].to_numpy(), labels.label.astype(int))
    info = {
        "model": "HistGradientBoostingClassifier",
        "early_stopping": early_stopping,
        "n_codes": len(codes),
        "n_features": len(columns),
        "n_iterations": int(classifier.n_iter_),
        "n_train_labels": len(labels),
    }
    logger.info(
        "Fitted the gradient-boosting baseline on %d train labels: %d features, %d boosting iterations",
        len(labels),
        len(columns),
        classifier.n_iter_,
    )
    return GradientBoostingBaseline(codes, columns, classifier, info)
