"""Tensor cache and batch packing on real PhysioNet stays, checked against pandas."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from seqsetvae.batch import PAD_CODE, UNK_CODE
from seqsetvae.cache import SplitCache, ensure_cache, fit_preprocessor
from seqsetvae.config import DataConfig
from seqsetvae.config import PretrainConfig
from seqsetvae.data import SetSequenceDataModule, SetSequenceDataset, length_sorted_batches
from seqsetvae.errors import UserInputError
from seqsetvae.meds_write import write_labels
from seqsetvae.preprocess import Preprocessor

TASK = "in_hospital_mortality"


@pytest.fixture(scope="module")
def built(small_meds, tmp_path_factory):
    config = DataConfig(max_sets=16, max_events_per_set=6)
    preprocessor = fit_preprocessor(small_meds, config)
    cache_dir = tmp_path_factory.mktemp("cache")
    reports = ensure_cache(small_meds, cache_dir, config, preprocessor)
    return config, preprocessor, cache_dir, reports


def split_events(meds_root, split) -> pd.DataFrame:
    return pq.read_table(meds_root / "data" / split).to_pandas()


def test_cap_count_matches_pandas(small_meds, built):
    config, _, _, reports = built
    events = split_events(small_meds, "train").drop_duplicates()
    sizes = events.groupby(["subject_id", "time"]).size()
    expected = int(np.maximum(sizes - config.max_events_per_set, 0).sum())
    assert reports["train"].n_events_capped == expected
    assert reports["train"].n_sets == len(sizes)


def test_batch_matches_source_events(small_meds, built):
    config, preprocessor, cache_dir, _ = built
    cache = SplitCache(cache_dir, "tuning")
    dataset = SetSequenceDataset(cache, config.max_sets, labelled=False)
    batch = dataset.collate([0, 3, 5])
    events = split_events(small_meds, "tuning")

    for row, position in enumerate([0, 3, 5]):
        subject = int(cache.subject_ids[position])
        times = np.sort(events.loc[events.subject_id == subject, "time"].unique())[-config.max_sets :]
        n_sets = int(batch["set_mask"][row].sum())
        assert n_sets == len(times)
        last_time = times[-1]
        last = events[(events.subject_id == subject) & (events.time == last_time)]
        expected_codes = preprocessor.code_indices(pa.array(last.code))
        mask = batch["event_mask"][row, n_sets - 1].numpy()
        packed_codes = batch["codes"][row, n_sets - 1].numpy()[mask]
        if len(last) <= config.max_events_per_set:
            assert Counter(packed_codes.tolist()) == Counter(expected_codes.tolist())
        else:
            assert len(packed_codes) == config.max_events_per_set


def test_batch_values_are_normalised(small_meds, built):
    config, preprocessor, cache_dir, _ = built
    cache = SplitCache(cache_dir, "train")
    batch = SetSequenceDataset(cache, config.max_sets, labelled=False).collate(list(range(8)))
    values = batch["values"][batch["has_value"]]
    assert torch_all_finite(values)
    assert float(values.abs().max()) <= 10.0
    assert not bool(batch["has_value"][~batch["event_mask"]].any())


def torch_all_finite(tensor) -> bool:
    return bool(np.isfinite(tensor.numpy()).all())


def test_padding_and_set_times(built):
    config, _, cache_dir, _ = built
    cache = SplitCache(cache_dir, "train")
    batch = SetSequenceDataset(cache, config.max_sets, labelled=False).collate([1, 2])
    set_mask = batch["set_mask"]
    times = batch["set_times"]
    for row in range(2):
        valid = times[row][set_mask[row]]
        assert bool((valid[1:] > valid[:-1]).all())
    assert not bool(batch["event_mask"][~set_mask].any())


def test_joint_splits_pack_like_one_split(built):
    config, _, cache_dir, _ = built
    module = SetSequenceDataModule(cache_dir, config.max_sets, batch_size=4, train_split=("train", "tuning"))
    joint = module.dataset(module.train_split)
    train = SetSequenceDataset(SplitCache(cache_dir, "train"), config.max_sets, labelled=False)
    tuning = SetSequenceDataset(SplitCache(cache_dir, "tuning"), config.max_sets, labelled=False)
    assert len(joint) == len(train) + len(tuning)
    np.testing.assert_array_equal(joint.sample_lengths(), np.concatenate([train.sample_lengths(), tuning.sample_lengths()]))

    # Subjects 2 and 7 of tuning, 5 of train: two splits in one batch.
    first_tuning = len(train)
    batch = joint.collate([first_tuning + 2, 5, first_tuning + 7])
    assert batch["index"].tolist() == [5, first_tuning + 2, first_tuning + 7]
    for row, (dataset, position) in enumerate([(train, 5), (tuning, 2), (tuning, 7)]):
        alone = dataset.collate([position])
        n_sets, n_events = alone["event_mask"].shape[1:]
        for key in ("codes", "values", "has_value", "event_mask", "set_times", "set_mask"):
            got = batch[key][row].clone()
            region = (slice(0, n_sets), slice(0, n_events)) if got.dim() == 2 else (slice(0, n_sets),)
            assert torch.equal(got[region], alone[key][0]), key
            # Everything past this subject's own sets and events is padding.
            padding = PAD_CODE if key == "codes" else 0
            got[region] = padding
            assert bool((got == padding).all()), key

    # An empty shard of a batch, as the sharded samplers can yield.
    empty = joint.collate([])
    assert empty["codes"].shape[0] == 0
    assert empty["index"].tolist() == []


@pytest.mark.parametrize("splits", [("tuning",), ("train", "tuning")])
def test_sorted_batches_map_rows(built, splits):
    _, _, cache_dir, _ = built
    dataset = SetSequenceDataModule(cache_dir, 256, batch_size=16).dataset(splits)

    def fingerprint(batch: dict) -> np.ndarray:
        """Return the set count and summed set times of each row, which tell the stays apart."""
        return np.stack([batch["set_mask"].sum(dim=1).numpy(), batch["set_times"].sum(dim=1).numpy()], axis=1)

    expected = np.concatenate([fingerprint(dataset.collate([position])) for position in range(len(dataset))])
    got = np.full_like(expected, np.nan)
    batch_lengths = []
    for positions, batch in length_sorted_batches(dataset, 16):
        got[positions] = fingerprint(batch)
        batch_lengths.append(int(batch["set_mask"].sum(dim=1).max()))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert batch_lengths == sorted(batch_lengths)
    with pytest.raises(ValueError, match="batch_size"):
        next(length_sorted_batches(dataset, 0))


def test_grouped_batches_pad_less(built):
    _, _, cache_dir, _ = built

    def one_epoch(group_by_length: bool) -> list[dict]:
        # max_sets 256 keeps whole stays, whose lengths vary.
        module = SetSequenceDataModule(cache_dir, 256, batch_size=16, seed=0, group_by_length=group_by_length)
        return list(module.train_dataloader())

    grouped, shuffled = one_epoch(True), one_epoch(False)
    n_train = len(SplitCache(cache_dir, "train").subject_ids)
    for batches in (grouped, shuffled):
        assert sorted(index for batch in batches for index in batch["index"].tolist()) == list(range(n_train))
    assert [len(batch["index"]) for batch in grouped] == [len(batch["index"]) for batch in shuffled]
    real_sets = sum(int(batch["set_mask"].sum()) for batch in grouped)
    assert real_sets == sum(int(batch["set_mask"].sum()) for batch in shuffled)
    padded_grouped = sum(batch["set_mask"].numel() for batch in grouped)
    padded_shuffled = sum(batch["set_mask"].numel() for batch in shuffled)
    assert padded_grouped < 0.8 * padded_shuffled, (padded_grouped, padded_shuffled, real_sets)


@pytest.mark.parametrize("value", ["held_out", "train,held_out", "train,train", "tuning", "", None, ["train"]])
def test_pretraining_never_reads_held_out(value):
    with pytest.raises(UserInputError, match="pretrain_splits: expected train or train,tuning"):
        PretrainConfig(pretrain_splits=value)
    assert PretrainConfig(pretrain_splits="tuning, train").train_splits() == ("train", "tuning")
    assert PretrainConfig().train_splits() == ("train",)


def test_labels_only_see_events_before_prediction_time(small_meds, tmp_path):
    meds_root = tmp_path / "meds"
    shutil.copytree(small_meds, meds_root)
    labels = pq.read_table(meds_root / "labels" / TASK).to_pandas()
    # Predict 10 hours after admission instead of 48.
    labels["prediction_time"] = labels["prediction_time"] - pd.Timedelta(hours=38)
    shutil.rmtree(meds_root / "labels" / TASK)
    write_labels(meds_root, TASK, pa.Table.from_pandas(labels, preserve_index=False))

    config = DataConfig(max_sets=200, max_events_per_set=64)
    cache_dir = tmp_path / "cache"
    ensure_cache(meds_root, cache_dir, config, fit_preprocessor(meds_root, config), splits=("tuning",))
    cache = SplitCache(cache_dir, "tuning", task=TASK)
    dataset = SetSequenceDataset(cache, config.max_sets, labelled=True)
    batch = dataset.collate(list(range(len(dataset))))

    events = split_events(meds_root, "tuning")
    cutoff = labels.set_index("subject_id")["prediction_time"]
    expected_sets = (
        events[events.time <= events.subject_id.map(cutoff)].groupby("subject_id")["time"].nunique()
    )
    subject_ids = np.asarray(cache.subject_ids)[cache.labels["subject_pos"]]
    got = batch["set_mask"].sum(1).numpy()
    assert got.tolist() == [int(expected_sets.get(s, 0)) for s in subject_ids]
    assert float(batch["set_times"][batch["set_mask"]].max()) <= 10.0


def test_constant_code_has_unit_scale():
    events = pa.table(
        {
            "code": ["A", "A", "A", "B", "C"],
            "numeric_value": pa.array([5.0, 5.0, 5.0, 2.0, None], pa.float32()),
        }
    )
    pre = Preprocessor.fit(events, clip_quantile=0.01)
    indices = pre.code_indices(pa.array(["A", "B", "C", "Z"]))
    values, has_value = pre.normalise(indices, np.array([5.0, 7.0, np.nan, 1.0]))
    assert pre.std[pre.codes.index("A")] == 1.0
    assert values[0] == 0.0
    assert np.isfinite(values).all()
    assert has_value.tolist() == [True, True, False, False]
    assert indices[-1] == UNK_CODE


def test_cache_is_reused(small_meds, built):
    config, preprocessor, cache_dir, _ = built
    before = (cache_dir / "train" / "codes.npy").stat().st_mtime_ns
    ensure_cache(small_meds, cache_dir, config, preprocessor)
    assert (cache_dir / "train" / "codes.npy").stat().st_mtime_ns == before


def test_missing_cache_split_is_clear(tmp_path):
    with pytest.raises(UserInputError, match="cached split not found"):
        SplitCache(tmp_path, "train")
