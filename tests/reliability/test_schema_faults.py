"""Schema faults reach the user as one line through the command line: file, column or subject, expected, found, fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from seqsetvae.cli import main

from .meds_data import (
    EVENT_SCHEMA,
    TINY_FLAGS,
    copy_dataset,
    events_table,
    read_labels,
    read_split,
    read_subject_splits,
    write_events,
    write_labels,
    write_subject_splits,
)

TRAIN_FILE = "data/train/0.parquet"
SPLITS_FILE = "metadata/subject_splits.parquet"
LABEL_FILE = "labels/in_hospital_mortality/0.parquet"


def drop_code_column(root: Path) -> None:
    write_events(root, "train", read_split(root, "train").drop(columns=["code"]))


def text_subject_ids(root: Path) -> None:
    train = read_split(root, "train")
    train["subject_id"] = "S" + train["subject_id"].astype(str)
    write_events(root, "train", train)


def text_values(root: Path) -> None:
    train = read_split(root, "train")
    train["numeric_value"] = train["numeric_value"].astype(str)
    # A value that parses as a number would be cast; an export's "n/a" does not parse.
    train.loc[train.index[:3], "numeric_value"] = "n/a"
    write_events(root, "train", train)


def text_times(root: Path) -> None:
    train = read_split(root, "train")
    train["time"] = train["time"].dt.strftime("%d/%m/%Y %H:%M")
    write_events(root, "train", train)


def null_codes(root: Path) -> None:
    table = events_table(read_split(root, "train"))
    codes = table.column("code").to_pylist()
    codes[5:8] = [None, None, None]
    write_events(root, "train", table.set_column(2, "code", pa.array(codes, pa.string())))


def null_subject_id(root: Path) -> None:
    table = events_table(read_split(root, "train"))
    ids = table.column("subject_id").to_pylist()
    ids[0] = None
    write_events(root, "train", table.set_column(0, "subject_id", pa.array(ids, pa.int64())))


def no_tuning_subjects(root: Path) -> None:
    splits = read_subject_splits(root)
    write_subject_splits(root, splits[splits["split"] != "tuning"])


def tuning_without_events(root: Path) -> None:
    write_events(root, "tuning", EVENT_SCHEMA.empty_table())


def no_subject_splits(root: Path) -> None:
    (root / SPLITS_FILE).unlink()


def truncated_shard(root: Path) -> None:
    path = root / TRAIN_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_shard(root: Path) -> None:
    path = root / TRAIN_FILE
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 512] = bytes(512)
    path.write_bytes(bytes(data))


def labels_of_other_data(root: Path) -> None:
    labels = read_labels(root)
    labels["subject_id"] = labels["subject_id"] + 10**9
    write_labels(root, labels)


def null_label_values(root: Path) -> None:
    labels = pa.Table.from_pandas(read_labels(root), preserve_index=False)
    values = labels.column("boolean_value").to_pylist()
    values[:4] = [None] * 4
    write_labels(root, labels.set_column(2, "boolean_value", pa.array(values, pa.bool_())))


def labels_without_tuning(root: Path) -> None:
    splits = read_subject_splits(root)
    labels = read_labels(root)
    write_labels(root, labels[labels["subject_id"].isin(splits.query("split == 'train'")["subject_id"])])


def split_name_as_number(root: Path) -> None:
    splits = read_subject_splits(root)
    splits["split"] = pd.Series(range(len(splits)), dtype="float64")
    write_subject_splits(root, splits)


# (fault, pieces the error line names: file, column or subject, what was expected or found, and what to do)
DATA_FAULTS = [
    (drop_code_column, [TRAIN_FILE, "Missing required columns: code", "rewrite the file"]),
    (text_subject_ids, [TRAIN_FILE, "subject_id (want int64, got large_string)", "rewrite the file"]),
    (text_values, [TRAIN_FILE, "numeric_value (want float, got large_string)", "rewrite the file"]),
    (text_times, [TRAIN_FILE, "time (want timestamp[us], got large_string)", "rewrite the file"]),
    (null_codes, [TRAIN_FILE, "no nulls but do: code", "code string (not null)", "rewrite the file"]),
    (null_subject_id, [TRAIN_FILE, "no nulls but do: subject_id", "rewrite the file"]),
    (no_tuning_subjects, [SPLITS_FILE, "split 'tuning' has no subjects", "choose another split"]),
    (tuning_without_events, ["data/tuning", "none of the 40 subjects of split 'tuning' has events", "check that"]),
    (no_subject_splits, [SPLITS_FILE, "file not found", "a MEDS root needs subject splits"]),
    (truncated_shard, [TRAIN_FILE, "cannot read parquet", "rewrite or remove the file"]),
    (corrupt_shard, [TRAIN_FILE, "cannot read parquet", "rewrite or remove the file"]),
    (labels_of_other_data, [LABEL_FILE, "first subject_id values: 1000", "pass the labels of this dataset"]),
    (null_label_values, [LABEL_FILE, "no nulls but do: boolean_value", "rewrite the file"]),
    (split_name_as_number, [SPLITS_FILE, "split 'train' has no subjects (splits found: ['0', '1', ", "choose another split"]),
]


def error_lines(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"seqsetvae {command}: error:")]


@pytest.mark.parametrize("fault, pieces", DATA_FAULTS, ids=[fault.__name__ for fault, _ in DATA_FAULTS])
def test_pretrain_names_data_fault(small_meds, tmp_path, capsys, fault, pieces):
    root = copy_dataset(small_meds, tmp_path / "meds")
    fault(root)
    code = main(["pretrain", "--data", str(root), "--out", str(tmp_path / "run"), *TINY_FLAGS])
    stderr = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in stderr
    lines = error_lines(stderr, "pretrain")
    assert len(lines) == 1, stderr
    for piece in pieces:
        assert piece in lines[0]


LABEL_FAULTS = [
    (labels_without_tuning, [LABEL_FILE, "no label of task 'in_hospital_mortality' names a subject of split 'tuning'"]),
    (labels_of_other_data, [LABEL_FILE, "none of the", "pass the labels of this dataset"]),
]


@pytest.mark.parametrize("fault, pieces", LABEL_FAULTS, ids=[fault.__name__ for fault, _ in LABEL_FAULTS])
def test_finetune_names_label_fault(small_meds, tiny_pretrained, tmp_path, capsys, fault, pieces):
    root = copy_dataset(small_meds, tmp_path / "meds")
    fault(root)
    code = main(["finetune", "--data", str(root), "--pretrained-ckpt", str(tiny_pretrained), "--out", str(tmp_path / "ft")])
    stderr = capsys.readouterr().err
    assert code == 2
    lines = error_lines(stderr, "finetune")
    assert len(lines) == 1, stderr
    for piece in pieces:
        assert piece in lines[0]


def test_unknown_task_is_named(small_meds, tiny_pretrained, tmp_path, capsys):
    code = main(
        ["finetune", "--data", str(small_meds), "--pretrained-ckpt", str(tiny_pretrained), "--out", str(tmp_path),
         "--task", "sepsis_onset"]
    )  # fmt: skip
    lines = error_lines(capsys.readouterr().err, "finetune")
    assert code == 2
    assert len(lines) == 1
    assert "no labels for task 'sepsis_onset'" in lines[0]
    assert "pass --task with an existing task name" in lines[0]


def test_truncated_shard_in_a_real_process(small_meds, tmp_path):
    root = copy_dataset(small_meds, tmp_path / "meds")
    truncated_shard(root)
    finished = subprocess.run(
        [sys.executable, "-m", "seqsetvae.cli", "pretrain", "--data", str(root), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 2
    assert "Traceback" not in finished.stderr
    last = finished.stderr.strip().splitlines()[-1]
    assert last.startswith("seqsetvae pretrain: error: ")
    assert str(root / TRAIN_FILE) in last
