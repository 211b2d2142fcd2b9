"""Unusual subjects: no events, static events only, labels before the first event, huge records, unseen codes."""

from __future__ import annotations

import json
import logging
import re
import tracemalloc
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from seqsetvae.batch import N_SPECIAL_CODES, UNK_CODE
from seqsetvae.cache import SplitCache
from seqsetvae.cli import main
from seqsetvae.config import DataConfig
from seqsetvae.data import SetSequenceDataset

from .meds_data import (
    TASK,
    TINY_DATA,
    all_finite,
    logged_metrics,
    build_cache,
    copy_dataset,
    events_table,
    pretrain_steps,
    read_labels,
    read_split,
    read_subject_splits,
    write_events,
    write_labels,
    write_subject_splits,
)

NO_EVENTS, STATIC_ONLY = 1, 999_999_999


def add_subjects(root, split: str, events: pd.DataFrame, labels: pd.DataFrame) -> None:
    """Add the subjects of `labels` to `split`, with `events`, keeping the data sorted by subject and time."""
    splits = read_subject_splits(root)
    new = pd.DataFrame({"subject_id": labels["subject_id"].unique(), "split": split})
    write_subject_splits(root, pd.concat([splits, new], ignore_index=True))
    merged = pd.concat([read_split(root, split), events], ignore_index=True)
    write_events(root, split, events_table(merged.sort_values(["subject_id", "time"], kind="stable", na_position="first")))
    write_labels(root, pd.concat([read_labels(root), labels], ignore_index=True))


def sets_of(events: pd.DataFrame, vocabulary: list[str], max_events: int) -> dict[int, list[Counter]]:
    """Return each subject's sets as code counters in time order, as the cache keeps them.

    Static events join the first set, and a set keeps its first `max_events` events in vocabulary order.
    """
    events = events.drop_duplicates(["subject_id", "time", "code", "numeric_value"]).copy()
    first = events.groupby("subject_id")["time"].transform("min")
    events["time"] = events["time"].fillna(first).fillna(pd.Timestamp(0))
    index = {code: i for i, code in enumerate(vocabulary)}
    events["index"] = events["code"].map(index).fillna(1)
    events = events.sort_values(["subject_id", "time", "index", "code", "numeric_value"])
    return {
        int(subject): [Counter(group["code"].iloc[:max_events]) for _, group in by_subject.groupby("time")]
        for subject, by_subject in events.groupby("subject_id")
    }


def test_empty_static_and_early_subjects(small_meds, tiny_export, tmp_path):
    root = copy_dataset(small_meds, tmp_path / "meds")
    held_out = read_split(root, "held_out")
    early_subject = int(held_out["subject_id"].iloc[0])
    first_event = held_out.loc[held_out["subject_id"] == early_subject, "time"].min()
    static = pd.DataFrame(
        {
            "subject_id": [STATIC_ONLY] * 3,
            "time": [pd.NaT] * 3,
            "code": ["STATIC//Age", "STATIC//Gender//1", "STATIC//ICUType//2"],
            "numeric_value": [71.0, np.nan, np.nan],
        }
    )
    labels = pd.DataFrame(
        {
            "subject_id": [NO_EVENTS, STATIC_ONLY],
            "prediction_time": [pd.Timestamp("2012-01-03")] * 2,
            "boolean_value": [True, False],
        }
    )
    add_subjects(root, "held_out", static, labels)
    all_labels = read_labels(root)
    # This subject's label requests a prediction an hour before the first event.
    all_labels.loc[all_labels["subject_id"] == early_subject, "prediction_time"] = first_event - pd.Timedelta(hours=1)
    write_labels(root, all_labels)

    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_export), "--data", str(root), "--out", str(out)]) == 0

    report = json.loads((out / "cache" / "held_out" / "report.json").read_text())
    assert report["n_subjects_without_events"] == 1
    assert report["n_subjects_static_only"] == 1
    assert report["n_labels_without_sets"] == 2

    predictions = pq.read_table(out / "predictions.parquet").to_pandas()
    held_out_ids = read_subject_splits(root).query("split == 'held_out'")["subject_id"]
    assert len(predictions) == all_labels["subject_id"].isin(held_out_ids).sum()
    for subject in (NO_EVENTS, STATIC_ONLY, early_subject):
        row = predictions[predictions["subject_id"] == subject]
        assert len(row) == 1
        assert np.isfinite(row["predicted_boolean_probability"].iloc[0])

    # Every subject's cached sets hold its own events, whatever the order of subjects in the cache.
    cache = SplitCache(out / "cache", "held_out", task=TASK)
    preprocessing = json.loads((tiny_export / "preprocessing.json").read_text())
    vocabulary = ["<pad>", "<unk>", *preprocessing["codes"]]
    expected = sets_of(read_split(root, "held_out"), vocabulary, TINY_DATA.max_events_per_set)
    assert sorted(np.asarray(cache.subject_ids).tolist()) == sorted(held_out_ids.tolist())
    for position, subject in enumerate(np.asarray(cache.subject_ids).tolist()):
        first, end = cache.subject_offsets[position], cache.subject_offsets[position + 1]
        got = [
            Counter(vocabulary[c] for c in cache.codes[cache.set_offsets[k] : cache.set_offsets[k + 1]])
            for k in range(first, end)
        ]
        assert got == expected.get(subject, []), subject

    label_subjects = np.asarray(cache.subject_ids)[cache.labels["subject_pos"]]
    assert sorted(label_subjects.tolist()) == sorted(predictions["subject_id"].tolist())
    early = int(np.flatnonzero(label_subjects == early_subject)[0])
    assert cache.labels["n_sets"][early] == 0
    static_label = int(np.flatnonzero(label_subjects == STATIC_ONLY)[0])
    assert cache.labels["n_sets"][static_label] == 1


def test_huge_set_and_long_record_are_capped(small_meds, tmp_path):
    config = DataConfig(max_sets=16, max_events_per_set=24)
    root = copy_dataset(small_meds, tmp_path / "meds")
    start = pd.Timestamp("2012-01-01")
    n = 30_000
    long_record = pd.DataFrame(
        {
            "subject_id": 5_000_001,
            "time": start + pd.to_timedelta(np.arange(n), unit="min"),
            "code": "HR",
            "numeric_value": np.linspace(60, 120, n).astype(np.float32),
        }
    )
    huge_set = pd.DataFrame(
        {"subject_id": 5_000_002, "time": start, "code": "HR", "numeric_value": np.linspace(40, 160, n).astype(np.float32)}
    )
    labels = pd.DataFrame(
        {"subject_id": [5_000_001, 5_000_002], "prediction_time": [start + pd.Timedelta(days=30)] * 2, "boolean_value": [True, False]}
    )
    add_subjects(root, "tuning", pd.concat([long_record, huge_set]), labels)

    preprocessor, reports = build_cache(root, tmp_path / "cache", config, splits=("train", "tuning"))
    report = reports["tuning"]
    events = read_split(root, "tuning").drop_duplicates(["subject_id", "time", "code", "numeric_value"])
    per_set = events.groupby(["subject_id", "time"]).size()
    per_subject = per_set.groupby(level="subject_id").size()
    assert report.n_events_capped == int(np.maximum(per_set - config.max_events_per_set, 0).sum())
    assert report.n_sets_over_cap == int((per_set > config.max_events_per_set).sum())
    assert report.n_subjects_cut_by_max_sets == int((per_subject > config.max_sets).sum())
    assert report.n_sets_cut_by_max_sets == int(np.maximum(per_subject - config.max_sets, 0).sum())
    assert report.n_sets_cut_by_max_sets >= n - config.max_sets
    assert report.n_labels_cut_by_max_sets >= 1

    cache = SplitCache(tmp_path / "cache", "tuning", task=TASK)
    positions = [int(np.flatnonzero(np.asarray(cache.subject_ids) == s)[0]) for s in (5_000_001, 5_000_002)]
    for labelled, samples in ((False, positions), (True, list(range(len(cache.labels["n_sets"]))))):
        dataset = SetSequenceDataset(cache, config.max_sets, labelled=labelled)
        tracemalloc.start()
        batch = dataset.collate(samples)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert batch["codes"].shape[1] <= config.max_sets
        assert batch["codes"].shape[2] <= config.max_events_per_set
        # The packed batch is a few bytes per slot of [B, max_sets, max_events_per_set]; a record of 30,000 sets
        # or events copied whole would need over a megabyte.
        assert peak < 64 * len(samples) * config.max_sets * config.max_events_per_set + 200_000

    metrics = logged_metrics(pretrain_steps(tmp_path / "cache", preprocessor, config))
    assert all_finite(metrics), metrics


def test_unseen_codes_map_to_unknown(small_meds, tiny_export, tmp_path, caplog):
    root = copy_dataset(small_meds, tmp_path / "meds")
    held_out = read_split(root, "held_out")
    renamed = held_out["code"].isin(["HR", "Temp"])
    held_out.loc[renamed, "code"] = held_out.loc[renamed, "code"] + "_v2"
    write_events(root, "held_out", events_table(held_out))

    out = tmp_path / "eval"
    with caplog.at_level(logging.INFO):
        assert main(["evaluate", "--model", str(tiny_export), "--data", str(root), "--out", str(out)]) == 0

    n_renamed = int(held_out[renamed].drop_duplicates(["subject_id", "time", "code", "numeric_value"]).shape[0])
    report = json.loads((out / "cache" / "held_out" / "report.json").read_text())
    assert report["n_unknown_code_events"] == n_renamed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_unknown_code_events"] == n_renamed
    assert f"{n_renamed} events of split 'held_out' have codes unseen in training" in caplog.text

    cache = SplitCache(out / "cache", "held_out")
    codes = np.asarray(cache.codes)
    # The unknown index sorts first in a set, so the cap on events per set keeps unknown codes.
    assert (codes == UNK_CODE).sum() == n_renamed
    assert (codes >= N_SPECIAL_CODES).any()
    predictions = pq.read_table(out / "predictions.parquet").column("predicted_boolean_probability").to_numpy()
    assert np.isfinite(predictions).all()

    # The log names counts and codes, never a subject.
    for subject in held_out["subject_id"].unique():
        assert re.search(rf"\b{subject}\b", caplog.text) is None
