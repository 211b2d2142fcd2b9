"""Streaming preparation: chunked fitting and tensorising give the same results as one pass over a split."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from seqsetvae import cache as cache_module
from seqsetvae.cache import ARRAY_NAMES, LABEL_ARRAY_NAMES, SplitCache, ensure_cache, fit_preprocessor
from seqsetvae.config import DataConfig
from seqsetvae.errors import UserInputError
from seqsetvae.preprocess import fit_streaming

TASK = "in_hospital_mortality"
CONFIG = DataConfig(max_sets=16, max_events_per_set=6)


def reshard(meds_root, out, n_shards: int, overlap: bool = False):
    """Copy a MEDS dataset with each split's events cut into `n_shards` files by subject.

    With `overlap`, the last subject of each shard also gets one event in the next shard.
    """
    shutil.copytree(meds_root, out)
    for split_dir in (out / "data").iterdir():
        events = pq.read_table(split_dir).sort_by([("subject_id", "ascending"), ("time", "ascending")])
        shutil.rmtree(split_dir)
        split_dir.mkdir()
        subjects = np.unique(events.column("subject_id").to_numpy())
        for number, part in enumerate(np.array_split(subjects, n_shards)):
            shard = events.filter(pc.is_in(events.column("subject_id"), value_set=pa.array(part)))
            if overlap and number > 0:
                previous = events.filter(pc.equal(events.column("subject_id"), int(last)))
                shard = pa.concat_tables([shard, previous.slice(0, 1)])
            pq.write_table(shard, split_dir / f"{number}.parquet")
            last = part[-1]
    return out


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(cache_module, "PREPARE_CHUNK_ROWS", 3000)
    monkeypatch.setattr(cache_module, "READ_BATCH_ROWS", 700)


def test_sharded_cache_matches_single_shard(small_meds, tmp_path, small_chunks):
    sharded = reshard(small_meds, tmp_path / "sharded", n_shards=3)
    preprocessor = fit_preprocessor(small_meds, CONFIG)
    chunked = fit_preprocessor(sharded, CONFIG)
    assert chunked.codes == preprocessor.codes
    np.testing.assert_array_equal(chunked.lower, preprocessor.lower)
    np.testing.assert_array_equal(chunked.upper, preprocessor.upper)
    # Merging chunk moments changes only the last bits of the mean and the standard deviation.
    np.testing.assert_allclose(chunked.mean, preprocessor.mean, rtol=1e-12)
    np.testing.assert_allclose(chunked.std, preprocessor.std, rtol=1e-12)

    ensure_cache(small_meds, tmp_path / "one", CONFIG, preprocessor)
    ensure_cache(sharded, tmp_path / "three", CONFIG, preprocessor)
    for split in ("train", "tuning", "held_out"):
        one = SplitCache(tmp_path / "one", split, task=TASK)
        three = SplitCache(tmp_path / "three", split, task=TASK)
        assert one.report() == three.report()
        for name in ARRAY_NAMES:
            assert np.array_equal(getattr(one, name), getattr(three, name)), name
        for name in LABEL_ARRAY_NAMES:
            assert np.array_equal(one.labels[name], three.labels[name]), name


def test_subject_in_two_shards_is_rejected(small_meds, tmp_path):
    sharded = reshard(small_meds, tmp_path / "sharded", n_shards=2, overlap=True)
    preprocessor = fit_preprocessor(small_meds, CONFIG)
    with pytest.raises(UserInputError, match="not contiguous"):
        ensure_cache(sharded, tmp_path / "cache", CONFIG, preprocessor, splits=("train",))


def test_subject_without_events_comes_last(small_meds, tmp_path):
    meds_root = tmp_path / "meds"
    shutil.copytree(small_meds, meds_root)
    splits = pq.read_table(meds_root / "metadata" / "subject_splits.parquet")
    extra = pa.table({"subject_id": pa.array([-5], pa.int64()), "split": ["tuning"]})
    pq.write_table(pa.concat_tables([splits, extra.cast(splits.schema)]), meds_root / "metadata" / "subject_splits.parquet")

    ensure_cache(meds_root, tmp_path / "cache", CONFIG, fit_preprocessor(meds_root, CONFIG), splits=("tuning",))
    cache = SplitCache(tmp_path / "cache", "tuning", task=TASK)
    assert int(cache.subject_ids[-1]) == -5
    assert cache.subject_offsets[-1] == cache.subject_offsets[-2]
    assert cache.report()["n_subjects_without_events"] == 1


def test_label_positions_follow_cache_order(small_meds, tmp_path, small_chunks):
    sharded = reshard(small_meds, tmp_path / "sharded", n_shards=3)
    ensure_cache(sharded, tmp_path / "cache", CONFIG, fit_preprocessor(sharded, CONFIG), splits=("train",))
    cache = SplitCache(tmp_path / "cache", "train", task=TASK)
    labels = pq.read_table(small_meds / "labels" / TASK).to_pandas().set_index("subject_id")
    subject_ids = np.asarray(cache.subject_ids)[cache.labels["subject_pos"]]
    expected = labels.loc[subject_ids, "boolean_value"].to_numpy()
    assert np.array_equal(cache.labels["value"], expected)


def test_sampled_codes_get_exact_quantiles():
    rng = np.random.default_rng(3)
    n = 20_000
    codes = rng.choice(["A", "B", "C"], size=n, p=[0.6, 0.3, 0.1])
    values = np.round(rng.standard_t(3, size=n), 2)  # heavy tails and many ties
    values[::97] = np.nan
    table = pa.table({"code": codes, "numeric_value": pa.array(values, pa.float32())})
    chunks = [table.slice(start, 1500) for start in range(0, n, 1500)]

    fitted = fit_streaming(lambda: chunks, clip_quantile=0.01, sample_size=200)

    frame = pd.DataFrame({"code": codes, "value": table.column("numeric_value").to_numpy(zero_copy_only=False)})
    frame = frame.dropna()
    grouped = frame.groupby("code")["value"]
    assert fitted.lower == grouped.quantile(0.01).reindex(fitted.codes).tolist()
    assert fitted.upper == grouped.quantile(0.99).reindex(fitted.codes).tolist()
    lower, upper = frame["code"].map(grouped.quantile(0.01)), frame["code"].map(grouped.quantile(0.99))
    clipped = frame.assign(value=frame["value"].clip(lower, upper))
    np.testing.assert_allclose(fitted.mean, clipped.groupby("code")["value"].mean().reindex(fitted.codes), rtol=1e-12)
    np.testing.assert_allclose(fitted.std, clipped.groupby("code")["value"].std().reindex(fitted.codes), rtol=1e-12)
