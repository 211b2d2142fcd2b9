"""Tests for the PhysioNet 2012 to MEDS converter, run on twelve real stays from training set A."""

from __future__ import annotations

import collections
import csv
import json
import re
import shutil
import tarfile
from pathlib import Path

import meds
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import seqsetvae
from seqsetvae import meds_write
from seqsetvae.errors import UserInputError
from seqsetvae.physionet import (
    DEMO_DATA_DIR,
    ConversionReport,
    convert_physionet2012,
    prepare,
)

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "physionet2012"
STAY_DIR = FIXTURE_DIR / "set-a"
OUTCOMES_PATH = FIXTURE_DIR / "Outcomes-a.txt"
SPLITS = ("train", "tuning", "held_out")
ADMISSION = pd.Timestamp("2012-01-01 00:00")
DESCRIPTORS = {"RecordID", "Age", "Gender", "Height", "ICUType", "Weight"}
EXPECTED_DATA_SCHEMA = pa.schema(
    [
        ("subject_id", pa.int64()),
        ("time", pa.timestamp("us")),
        ("code", pa.string()),
        ("numeric_value", pa.float32()),
    ]
)


# ---------------------------------------------------------------------------------------------
# Reference reading of the raw files, written independently of the converter


def reference_events(stay_dir: Path) -> tuple[list[tuple], int]:
    """Return (subject_id, minutes, code, float32 value or None) per expected event, and the -1 count.

    The first row of each descriptor name at 00:00 is a descriptor; RecordID is never an event.
    """
    events = []
    missing = 0
    for path in sorted(stay_dir.glob("*.txt")):
        subject_id = int(path.stem)
        seen_descriptors = set()
        for time_text, name, value_text in list(csv.reader(path.read_text().splitlines()))[1:]:
            hours, minutes = time_text.split(":")
            offset = int(hours) * 60 + int(minutes)
            value = float(value_text)
            if name in DESCRIPTORS and offset == 0 and name not in seen_descriptors:
                seen_descriptors.add(name)
                if name == "RecordID":
                    continue
                if value == -1:
                    missing += 1
                elif name in ("Gender", "ICUType"):
                    events.append((subject_id, 0, f"STATIC//{name}//{int(value)}", None))
                else:
                    events.append((subject_id, 0, f"STATIC//{name}", float(np.float32(value))))
            else:
                events.append((subject_id, offset, name, float(np.float32(value))))
    return events, missing


def reference_outcomes() -> dict[int, bool]:
    with OUTCOMES_PATH.open() as handle:
        return {int(row["RecordID"]): row["In-hospital_death"] == "1" for row in csv.DictReader(handle)}


# ---------------------------------------------------------------------------------------------
# Reading the converted dataset


def read_events(root: Path) -> pd.DataFrame:
    shards = sorted((root / "data").glob("*/*.parquet"))
    return pd.concat([pq.read_table(p).to_pandas() for p in shards], ignore_index=True)


def event_tuples(events: pd.DataFrame) -> list[tuple]:
    minutes = ((events["time"] - ADMISSION) / pd.Timedelta(minutes=1)).astype(int)
    values = [None if pd.isna(v) else float(v) for v in events["numeric_value"]]
    return list(zip(events["subject_id"].tolist(), minutes.tolist(), events["code"].tolist(), values))


def read_splits(root: Path) -> dict[int, str]:
    table = pq.read_table(root / "metadata" / "subject_splits.parquet").to_pandas()
    return dict(zip(table["subject_id"], table["split"]))


def read_labels(root: Path) -> pd.DataFrame:
    return pq.read_table(root / "labels" / "in_hospital_mortality" / "0.parquet").to_pandas()


def copy_fixture(destination: Path) -> Path:
    """Copy the fixture (set-a/ and Outcomes-a.txt) into `destination`; return the set-a copy."""
    shutil.copytree(FIXTURE_DIR / "set-a", destination / "set-a")
    shutil.copy(OUTCOMES_PATH, destination / "Outcomes-a.txt")
    return destination / "set-a"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, ConversionReport]:
    out_dir = tmp_path_factory.mktemp("meds") / "physionet"
    report = convert_physionet2012([STAY_DIR], out_dir, split_seed=0)
    return out_dir, report


@pytest.fixture(scope="module")
def archive_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("raw")
    archive = folder / "set-a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(STAY_DIR, arcname="set-a")
    shutil.copy(OUTCOMES_PATH, folder / "Outcomes-a.txt")
    return archive


# ---------------------------------------------------------------------------------------------
# Input forms


def test_archive_matches_directory(converted, archive_path, tmp_path):
    out_dir, _ = converted
    from_archive = tmp_path / "from_archive"
    convert_physionet2012([archive_path], from_archive, split_seed=0)
    for relative in [
        "data/train/0.parquet",
        "data/tuning/0.parquet",
        "data/held_out/0.parquet",
        "metadata/subject_splits.parquet",
        "labels/in_hospital_mortality/0.parquet",
        "metadata/codes.parquet",
    ]:
        assert pq.read_table(from_archive / relative).equals(pq.read_table(out_dir / relative)), relative


def test_parent_directory_finds_set_subdirectory(converted, tmp_path):
    out_dir, _ = converted
    from_parent = tmp_path / "from_parent"
    convert_physionet2012([FIXTURE_DIR], from_parent, split_seed=0)
    assert read_events(from_parent).equals(read_events(out_dir))


def test_explicit_outcomes_path_gives_labels(tmp_path):
    stays = tmp_path / "raw" / "set-a"
    shutil.copytree(STAY_DIR, stays)
    outcomes = tmp_path / "elsewhere" / "Outcomes-a.txt"
    outcomes.parent.mkdir()
    shutil.copy(OUTCOMES_PATH, outcomes)
    report = convert_physionet2012([stays, outcomes], tmp_path / "out")
    assert report.n_labels == 12


# ---------------------------------------------------------------------------------------------
# Schemas and layout


def test_data_shards_match_meds_schema(converted):
    out_dir, _ = converted
    for split in SPLITS:
        table = pq.read_table(out_dir / "data" / split / "0.parquet")
        assert meds.DataSchema.align(table).equals(table), split
        assert table.schema.equals(EXPECTED_DATA_SCHEMA), split


def test_label_table_matches_meds_schema(converted):
    out_dir, _ = converted
    table = pq.read_table(out_dir / "labels" / "in_hospital_mortality" / "0.parquet")
    assert meds.LabelSchema.align(table).column_names == ["subject_id", "prediction_time", "boolean_value"]


def test_split_table_matches_meds_schema(converted):
    out_dir, _ = converted
    table = pq.read_table(out_dir / "metadata" / "subject_splits.parquet")
    assert meds.SubjectSplitSchema.align(table).column_names == ["subject_id", "split"]


def test_codes_table_lists_every_code(converted):
    out_dir, _ = converted
    codes = meds.CodeMetadataSchema.align(pq.read_table(out_dir / "metadata" / "codes.parquet"))
    assert set(codes["code"].to_pylist()) == set(read_events(out_dir)["code"])


def test_dataset_metadata_names_etl(converted):
    out_dir, _ = converted
    metadata = json.loads((out_dir / "metadata" / "dataset.json").read_text())
    meds.DatasetMetadataSchema.validate(metadata)
    assert metadata["etl_name"] == "seqsetvae.physionet"
    assert metadata["etl_version"] == seqsetvae.__version__
    assert metadata["meds_version"] == "0.4"


def test_events_sorted_by_subject_then_time(converted):
    out_dir, _ = converted
    for split in SPLITS:
        events = pq.read_table(out_dir / "data" / split / "0.parquet").to_pandas()
        ordered = events.sort_values(["subject_id", "time"], kind="stable", ignore_index=True)
        assert events[["subject_id", "time"]].equals(ordered[["subject_id", "time"]]), split


def test_shuffled_rows_sorted_by_time(tmp_path):
    stays = copy_fixture(tmp_path / "raw")
    path = stays / "135116.txt"
    header, *rows = path.read_text().splitlines()
    np.random.default_rng(0).shuffle(rows)
    path.write_text("\n".join([header, *rows]) + "\n")
    convert_physionet2012([stays], tmp_path / "out")
    events = read_events(tmp_path / "out")
    stay = events[events["subject_id"] == 135116]
    assert stay["time"].is_monotonic_increasing


def test_each_subject_in_one_shard(converted):
    out_dir, _ = converted
    splits = read_splits(out_dir)
    for split in SPLITS:
        events = pq.read_table(out_dir / "data" / split / "0.parquet").to_pandas()
        assert {splits[s] for s in events["subject_id"]} == {split}


# ---------------------------------------------------------------------------------------------
# Event content


def test_event_count_matches_raw_rows(converted):
    _, report = converted
    expected, _ = reference_events(STAY_DIR)
    assert report.n_events == len(expected)


def test_events_match_raw_rows(converted):
    out_dir, _ = converted
    expected, _ = reference_events(STAY_DIR)
    actual = event_tuples(read_events(out_dir))
    assert collections.Counter(actual) == collections.Counter(expected)


def test_missing_descriptors_counted(converted):
    _, report = converted
    _, expected_missing = reference_events(STAY_DIR)
    assert expected_missing > 0
    assert report.n_missing_descriptors == expected_missing


def test_missing_gender_has_no_event(converted):
    out_dir, _ = converted
    events = read_events(out_dir)
    codes = set(events.loc[events["subject_id"] == 137392, "code"])
    assert not any(code.startswith("STATIC//Gender") for code in codes)


def test_categorical_descriptor_has_no_value(converted):
    out_dir, _ = converted
    events = read_events(out_dir)
    icu_type = events[events["code"].str.startswith("STATIC//ICUType//")]
    assert len(icu_type) == 12
    assert icu_type["numeric_value"].isna().all()


def test_repeated_measurements_stay_separate(converted):
    out_dir, _ = converted
    events = read_events(out_dir)
    stay = events[events["subject_id"] == 135116]
    raw = list(csv.reader((STAY_DIR / "135116.txt").read_text().splitlines()))[1:]
    raw_repeats = sum(n - 1 for n in collections.Counter((t, p) for t, p, _ in raw).values() if n > 1)
    assert raw_repeats > 0
    assert stay.duplicated(["time", "code"]).sum() == raw_repeats


def test_second_weight_at_admission_is_measurement(tmp_path):
    stays = copy_fixture(tmp_path / "raw")
    path = stays / "135270.txt"
    path.write_text(path.read_text() + "00:00,Weight,101.5\n")
    convert_physionet2012([stays], tmp_path / "out")
    events = read_events(tmp_path / "out")
    stay = events[(events["subject_id"] == 135270) & (events["time"] == ADMISSION)]
    assert stay.loc[stay["code"] == "STATIC//Weight", "numeric_value"].tolist() == [100.0]
    assert stay.loc[stay["code"] == "Weight", "numeric_value"].tolist() == [101.5]


def test_descriptor_only_stay_kept(converted):
    out_dir, _ = converted
    events = read_events(out_dir)
    codes = sorted(events.loc[events["subject_id"] == 140501, "code"])
    assert codes == ["STATIC//Age", "STATIC//Gender//1", "STATIC//ICUType//3"]


# ---------------------------------------------------------------------------------------------
# Labels


def test_prediction_time_is_48h_after_admission(converted):
    out_dir, _ = converted
    labels = read_labels(out_dir)
    assert (labels["prediction_time"] == ADMISSION + pd.Timedelta(hours=48)).all()


def test_labels_match_outcomes(converted):
    out_dir, _ = converted
    labels = read_labels(out_dir)
    assert dict(zip(labels["subject_id"], labels["boolean_value"])) == reference_outcomes()


def test_report_counts_positive_labels(converted):
    _, report = converted
    assert report.n_positive == sum(reference_outcomes().values())


def test_stay_without_outcome_kept_without_label(tmp_path):
    stays = copy_fixture(tmp_path / "raw")
    outcomes = tmp_path / "raw" / "Outcomes-a.txt"
    rows = outcomes.read_text().splitlines()
    outcomes.write_text("\n".join(row for row in rows if not row.startswith("135270,")) + "\n")
    out_dir = tmp_path / "out"
    report = convert_physionet2012([stays], out_dir)
    assert report.n_subjects_without_outcome == 1
    assert 135270 not in set(read_labels(out_dir)["subject_id"])
    assert 135270 in read_splits(out_dir)
    assert 135270 in set(read_events(out_dir)["subject_id"])


def test_conflicting_outcomes_rejected(tmp_path):
    stays = copy_fixture(tmp_path / "raw")
    (tmp_path / "raw" / "Outcomes-x.txt").write_text(
        "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n135270,12,-1,16,-1,1\n"
    )
    with pytest.raises(UserInputError, match="different In-hospital_death"):
        convert_physionet2012([stays], tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Splits


def test_split_bytes_identical_for_same_seed(converted, tmp_path):
    out_dir, _ = converted
    again = tmp_path / "again"
    convert_physionet2012([STAY_DIR], again, split_seed=0)
    relative = Path("metadata") / "subject_splits.parquet"
    assert (again / relative).read_bytes() == (out_dir / relative).read_bytes()


def test_split_differs_for_other_seed(converted, tmp_path):
    out_dir, _ = converted
    other = tmp_path / "other"
    convert_physionet2012([STAY_DIR], other, split_seed=1)
    assert read_splits(other) != read_splits(out_dir)


def test_split_counts_follow_fractions(converted):
    _, report = converted
    # 8 negatives split 6/1/1 and 4 positives 2/1/1, because every split gets one positive.
    assert report.split_counts == {"train": 8, "tuning": 2, "held_out": 2}


def test_every_split_has_positives(converted):
    out_dir, _ = converted
    splits = read_splits(out_dir)
    positives = [s for s, died in reference_outcomes().items() if died]
    assert {splits[s] for s in positives} == set(SPLITS)


def test_all_to_split_puts_all_in_one_split(tmp_path):
    out_dir = tmp_path / "out"
    report = convert_physionet2012([STAY_DIR], out_dir, all_to_split="held_out")
    assert set(read_splits(out_dir).values()) == {"held_out"}
    assert report.split_counts == {"train": 0, "tuning": 0, "held_out": 12}
    assert sorted(p.parent.name for p in (out_dir / "data").glob("*/*.parquet")) == ["held_out"]


def test_all_to_split_rejects_unknown_name(tmp_path):
    with pytest.raises(UserInputError, match="expected one of train, tuning, held_out"):
        convert_physionet2012([STAY_DIR], tmp_path / "out", all_to_split="test")


def test_split_fractions_must_sum_to_one(tmp_path):
    with pytest.raises(UserInputError, match="sum to 1"):
        convert_physionet2012([STAY_DIR], tmp_path / "out", split_fractions=(0.8, 0.1, 0.2))


# ---------------------------------------------------------------------------------------------
# Bad rows and bad inputs


# Bad time, non-numeric value, two fields, empty parameter, four fields, beyond the float32 range.
BAD_ROWS = ["12:3x,HR,80", "12:30,HR,abc", "12:30,HR", "12:30,,80", "12:30,HR,80,1", "12:30,HR,1e39"]


def test_unparseable_rows_counted(converted, tmp_path):
    stays = copy_fixture(tmp_path / "raw")
    with (stays / "133628.txt").open("a") as handle:
        handle.write("\n".join(BAD_ROWS) + "\n")
    report = convert_physionet2012([stays], tmp_path / "out")
    assert report.n_unparseable_rows == len(BAD_ROWS)


def test_unparseable_rows_located(tmp_path):
    stays = copy_fixture(tmp_path / "raw")
    path = stays / "133628.txt"
    n_lines = len(path.read_text().splitlines())
    with path.open("a") as handle:
        handle.write("\n".join(BAD_ROWS) + "\n")
    report = convert_physionet2012([stays], tmp_path / "out")
    # The report keeps the first five locations.
    expected = [f"set-a/133628.txt:{n_lines + i}" for i in range(1, 6)]
    assert report.unparseable_examples == expected


def test_unparseable_rows_leave_other_events(converted, tmp_path):
    _, clean_report = converted
    stays = copy_fixture(tmp_path / "raw")
    with (stays / "133628.txt").open("a") as handle:
        handle.write("\n".join(BAD_ROWS) + "\n")
    report = convert_physionet2012([stays], tmp_path / "out")
    assert report.n_events == clean_report.n_events


def test_non_empty_out_dir_rejected(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("existing")
    with pytest.raises(UserInputError, match="not empty; choose an empty directory or remove it"):
        convert_physionet2012([STAY_DIR], out_dir)


def test_empty_out_dir_accepted(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    report = convert_physionet2012([STAY_DIR], out_dir)
    assert report.n_subjects == 12


def test_missing_raw_path_rejected(tmp_path):
    missing = tmp_path / "set-z.tar.gz"
    with pytest.raises(UserInputError, match=re.escape(f"raw input not found: {missing}")):
        convert_physionet2012([missing], tmp_path / "out")


def test_archive_without_stays_rejected(tmp_path):
    archive = tmp_path / "set-z.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(OUTCOMES_PATH, arcname="set-z/Outcomes-a.txt")
    with pytest.raises(UserInputError, match="contains no stay files"):
        convert_physionet2012([archive], tmp_path / "out")


def test_unreadable_archive_rejected(tmp_path):
    archive = tmp_path / "set-z.tar.gz"
    archive.write_bytes(b"not a gzip file" * 10)
    with pytest.raises(UserInputError, match="cannot read archive"):
        convert_physionet2012([archive], tmp_path / "out")


def test_failed_write_leaves_no_output(tmp_path):
    out_dir = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        with meds_write.staged_output_dir(out_dir) as staging:
            (staging / "data").mkdir()
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_same_stays_twice_rejected(archive_path, tmp_path):
    with pytest.raises(UserInputError, match="same RecordID"):
        convert_physionet2012([archive_path, STAY_DIR], tmp_path / "out")


def test_prepare_rejects_unknown_dataset(tmp_path):
    with pytest.raises(UserInputError, match="unknown dataset 'mimic'"):
        prepare("mimic", [STAY_DIR], tmp_path / "out")


def test_summary_lines_report_counts(converted):
    _, report = converted
    text = "\n".join(report.summary_lines())
    assert f"Events written: {report.n_events:,}" in text
    assert "Splits: train 8, tuning 2, held_out 2" in text


# ---------------------------------------------------------------------------------------------
# Bundled demo dataset


def test_demo_dataset_has_set_a():
    splits = pq.read_table(DEMO_DATA_DIR / "metadata" / "subject_splits.parquet")
    assert splits.num_rows == 4000


def test_demo_dataset_matches_meds_schema():
    for split in SPLITS:
        table = pq.read_table(DEMO_DATA_DIR / "data" / split / "0.parquet")
        assert table.schema.equals(meds.DataSchema.align(table).schema), split


def test_demo_labels_cover_every_subject():
    labels = meds.LabelSchema.align(
        pq.read_table(DEMO_DATA_DIR / "labels" / "in_hospital_mortality" / "0.parquet")
    )
    splits = pq.read_table(DEMO_DATA_DIR / "metadata" / "subject_splits.parquet")
    assert sorted(labels["subject_id"].to_pylist()) == sorted(splits["subject_id"].to_pylist())


def test_demo_ships_data_licence():
    text = (DEMO_DATA_DIR.parent / "LICENSE-DATA.md").read_text()
    assert "Open Data Commons Attribution License v1.0" in text
