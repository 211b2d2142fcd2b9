"""Bad values in real stays: constant and single codes, sentinels and outliers, duplicates, unsorted and zoned times."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from seqsetvae.batch import N_SPECIAL_CODES
from seqsetvae.cache import SplitCache, ensure_cache, load_preprocessor
from seqsetvae.config import DataConfig
from seqsetvae.preprocess import MAX_ABS_NORMALISED

from .meds_data import (
    all_finite,
    logged_metrics,
    build_cache,
    copy_dataset,
    events_table,
    pretrain_steps,
    read_labels,
    read_split,
    write_events,
    write_labels,
)

CONFIG = DataConfig(max_sets=32, max_events_per_set=256)


def code_values(cache: SplitCache, preprocessor, code: str) -> np.ndarray:
    """Return the normalised cached values of `code`."""
    index = preprocessor.codes.index(code) + N_SPECIAL_CODES
    codes = np.asarray(cache.codes)
    return np.asarray(cache.values)[(codes == index) & np.asarray(cache.has_value)]


def add_events(frame: pd.DataFrame, code: str, values, n: int, seed: int) -> pd.DataFrame:
    """Append `n` events of `code` at the times of `n` random existing events, taking values from `values`."""
    rng = np.random.default_rng(seed)
    rows = frame.iloc[rng.choice(len(frame), n, replace=False)][["subject_id", "time"]].copy()
    rows["code"] = code
    rows["numeric_value"] = np.resize(np.asarray(values, dtype=np.float32), n)
    rows["nan_value"] = np.isnan(rows["numeric_value"])
    return pd.concat([frame, rows], ignore_index=True).sort_values(["subject_id", "time"], kind="stable")


def test_constant_and_single_codes_stay_finite(small_meds, tmp_path):
    root = copy_dataset(small_meds, tmp_path / "meds")
    train = read_split(root, "train")
    train = add_events(train, "CONST", [5.0], 300, seed=0)
    train = add_events(train, "ONCE", [3.0], 1, seed=1)
    write_events(root, "train", events_table(train))
    tuning = read_split(root, "tuning")
    tuning = add_events(tuning, "CONST", [5.0, 6.0, -40.0], 60, seed=2)
    tuning = add_events(tuning, "ONCE", [3.0, 1e4], 2, seed=3)
    write_events(root, "tuning", events_table(tuning))

    preprocessor, _ = build_cache(root, tmp_path / "cache", CONFIG, splits=("train", "tuning"))
    for code in ("CONST", "ONCE"):
        position = preprocessor.codes.index(code)
        assert preprocessor.std[position] == 1.0
        assert preprocessor.lower[position] == preprocessor.upper[position]

    cache = SplitCache(tmp_path / "cache", "tuning")
    for code in ("CONST", "ONCE"):
        values = code_values(cache, preprocessor, code)
        assert len(values) > 0
        assert np.isfinite(values).all()
        # Every value is clipped to the single train value, which standardises to 0.
        assert np.all(values == 0.0)

    metrics = logged_metrics(pretrain_steps(tmp_path / "cache", preprocessor, CONFIG))
    assert all_finite(metrics), metrics


SENTINELS = {
    # code: planted values, as recorded by a faulty export
    "HR": [-1.0, 1e6, -1.0, 1e6],
    "pH": [735.0, 740.0, 729.0],
    "SysABP": [-80.0, -120.0, -1.0],
}
NONFINITE = [np.nan, np.inf, -np.inf, np.nan]


def plant_bad_values(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    for offset, (code, values) in enumerate(SENTINELS.items()):
        frame = add_events(frame, code, values, len(values), seed=seed + offset)
    return add_events(frame, "Temp", NONFINITE, len(NONFINITE), seed=seed + 10)


def expected_clip_counts(train: pd.DataFrame, split: pd.DataFrame, quantile: float) -> dict[str, int]:
    """Count per code the finite, deduplicated values of `split` outside the train-split quantiles."""
    finite_train = train[np.isfinite(train["numeric_value"])]
    bounds = finite_train.groupby("code")["numeric_value"].quantile([quantile, 1 - quantile]).unstack()
    events = split.drop_duplicates(["subject_id", "time", "code", "numeric_value"])
    events = events[np.isfinite(events["numeric_value"]) & events["code"].isin(bounds.index)]
    low = events["code"].map(bounds[quantile])
    high = events["code"].map(bounds[1 - quantile])
    values = events["numeric_value"].astype(np.float64)
    outside = events[(values < low) | (values > high)]
    return outside.groupby("code").size().astype(int).to_dict()


def test_sentinels_are_clipped_and_counted(small_meds, tmp_path, caplog):
    root = copy_dataset(small_meds, tmp_path / "meds")
    for seed, split in enumerate(("train", "tuning")):
        write_events(root, split, events_table(plant_bad_values(read_split(root, split), seed=10 * seed)))

    with caplog.at_level(logging.INFO, logger="seqsetvae"):
        preprocessor, reports = build_cache(root, tmp_path / "cache", CONFIG, splits=("train", "tuning"))

    train = read_split(root, "train")
    for split in ("train", "tuning"):
        report = reports[split]
        assert report.n_nonfinite_dropped == len(NONFINITE)
        expected = expected_clip_counts(train.astype({"numeric_value": np.float64}), read_split(root, split), 0.005)
        assert report.values_clipped_per_code == expected
        assert report.n_values_clipped == sum(expected.values())
        for code in SENTINELS:
            # Each planted value lies outside the train-split quantiles of its code.
            assert expected[code] >= len(SENTINELS[code])
        stored = json.loads((tmp_path / "cache" / split / "report.json").read_text())
        assert stored["values_clipped_per_code"] == expected

        cache = SplitCache(tmp_path / "cache", split)
        values = np.asarray(cache.values)
        assert np.isfinite(values).all()
        assert np.abs(values).max() <= MAX_ABS_NORMALISED

    assert f"{reports['train'].n_values_clipped} values clipped" in caplog.text
    assert "1000000" not in caplog.text
    assert "735" not in caplog.text
    metrics = logged_metrics(pretrain_steps(tmp_path / "cache", preprocessor, CONFIG))
    assert all_finite(metrics), metrics


def test_duplicates_dropped_and_repeats_kept(small_meds, tmp_path):
    root = copy_dataset(small_meds, tmp_path / "meds")
    tuning = read_split(root, "tuning")
    rng = np.random.default_rng(0)
    once = ~tuning.duplicated(["subject_id", "time", "code"], keep=False)
    valued = tuning[tuning["numeric_value"].notna() & once]
    copies = tuning.iloc[rng.choice(len(tuning), 50, replace=False)]
    repeats = valued.iloc[rng.choice(len(valued), 10, replace=False)].copy()
    repeats["numeric_value"] = repeats["numeric_value"] + 1.5
    altered = pd.concat([tuning, copies, repeats], ignore_index=True).sort_values(["subject_id", "time"], kind="stable")
    write_events(root, "tuning", events_table(altered))

    preprocessor, reports = build_cache(root, tmp_path / "cache", CONFIG, splits=("train", "tuning"))
    report = reports["tuning"]
    assert report.n_duplicates_dropped == 50
    assert report.n_events == len(tuning) + 10
    assert report.n_events_capped == 0

    # A code measured twice at one time with different values is two events of the same set.
    cache = SplitCache(tmp_path / "cache", "tuning")
    row = repeats.iloc[0]
    position = int(np.flatnonzero(np.asarray(cache.subject_ids) == row["subject_id"])[0])
    first_set, end_set = cache.subject_offsets[position], cache.subject_offsets[position + 1]
    set_times = np.asarray(cache.set_time_us[first_set:end_set])
    set_index = first_set + int(np.flatnonzero(set_times == pd.Timestamp(row["time"]).value // 1000)[0])
    codes = np.asarray(cache.codes[cache.set_offsets[set_index] : cache.set_offsets[set_index + 1]])
    code_index = preprocessor.codes.index(row["code"]) + N_SPECIAL_CODES
    assert (codes == code_index).sum() == 2


def test_unsorted_zoned_times_match_sorted(small_meds, tmp_path):
    sorted_root = copy_dataset(small_meds, tmp_path / "sorted")
    zoned_root = copy_dataset(small_meds, tmp_path / "zoned")
    tuning = read_split(sorted_root, "tuning")
    shuffled = tuning.sample(frac=1.0, random_state=0).reset_index(drop=True)
    # The same instants, stored with a zone and in nanoseconds, as pandas writes them.
    shuffled["time"] = shuffled["time"].dt.tz_localize("UTC").dt.tz_convert("America/New_York").astype(
        "datetime64[ns, America/New_York]"
    )
    write_events(zoned_root, "tuning", shuffled)
    labels = read_labels(zoned_root).sample(frac=1.0, random_state=1)
    labels["prediction_time"] = labels["prediction_time"].dt.tz_localize("UTC").dt.tz_convert("Asia/Tokyo")
    write_labels(zoned_root, labels)

    preprocessor, _ = build_cache(sorted_root, tmp_path / "sorted-cache", CONFIG, splits=("train",))
    ensure_cache(sorted_root, tmp_path / "sorted-cache", CONFIG, preprocessor, splits=("tuning",))
    ensure_cache(zoned_root, tmp_path / "zoned-cache", CONFIG, preprocessor, splits=("tuning",))
    assert load_preprocessor(tmp_path / "zoned-cache").fingerprint() == preprocessor.fingerprint()

    expected = SplitCache(tmp_path / "sorted-cache", "tuning", task="in_hospital_mortality")
    got = SplitCache(tmp_path / "zoned-cache", "tuning", task="in_hospital_mortality")
    for name in ("codes", "values", "has_value", "set_offsets", "set_time_us", "set_hours", "subject_offsets", "subject_ids"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(expected, name)), err_msg=name)
    for name, array in expected.labels.items():
        np.testing.assert_array_equal(got.labels[name], array, err_msg=name)


@pytest.mark.parametrize("unit", ["s", "ms", "ns"])
def test_time_units_are_normalised(small_meds, tmp_path, unit):
    root = copy_dataset(small_meds, tmp_path / "meds")
    tuning = read_split(root, "tuning")
    tuning["time"] = tuning["time"].astype(f"datetime64[{unit}]")
    write_events(root, "tuning", tuning)
    build_cache(root, tmp_path / "cache", CONFIG, splits=("train", "tuning"))
    cache = SplitCache(tmp_path / "cache", "tuning")
    expected = np.sort(tuning.drop_duplicates(["subject_id", "time"])["time"].astype("datetime64[us]").astype(np.int64))
    np.testing.assert_array_equal(np.sort(np.asarray(cache.set_time_us)), expected)
