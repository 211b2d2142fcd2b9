"""The sweep record: where `seqsetvae best` finds it, the best checkpoint it stores, and one-line errors without it."""

from __future__ import annotations

import json

import pytest

from seqsetvae.cli import main
from seqsetvae.sweep_record import RECORD_FILE, RECORD_FORMAT, finish_record, locate_experiment


def write_record(directory, best=None, record_format=RECORD_FORMAT):
    directory.mkdir(parents=True)
    record = {"format": record_format, "metric": "val/auprc", "pretrained": "pretrained.pt", "best": best}
    (directory / RECORD_FILE).write_text(json.dumps(record))


@pytest.mark.parametrize("layout", ["", "sweep", "sweep/sweep", "ray_results/sweep", "sweep/ray_results/sweep"])
def test_record_found_in_known_layouts(tmp_path, layout):
    storage = tmp_path / "storage"
    write_record(storage / layout)
    expected = f"file://{storage}/{layout}" if layout else f"file://{storage}"
    assert locate_experiment(f"file://{storage}") == expected


def run_best(location, tmp_path, capsys) -> str:
    code = main(["best", "--sweep", location, "--export", str(tmp_path / "export")])
    assert code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert not (tmp_path / "export").exists()
    return error


def test_best_without_record(tmp_path, capsys):
    error = run_best(str(tmp_path), tmp_path, capsys)
    assert error.startswith(f"seqsetvae best: error: --sweep {tmp_path}: no sweep record found")


def test_best_of_unfinished_sweep(tmp_path, capsys):
    write_record(tmp_path / "storage" / "sweep")
    error = run_best(f"file://{tmp_path}/storage", tmp_path, capsys)
    assert "the sweep has no best checkpoint yet, so it did not finish" in error
    assert "seqsetvae tune --resume" in error


def test_best_of_foreign_record(tmp_path, capsys):
    write_record(tmp_path / "storage", record_format="other/9")
    error = run_best(str(tmp_path / "storage"), tmp_path, capsys)
    assert f"expected format {RECORD_FORMAT}, got 'other/9'" in error


def test_best_rejects_unknown_scheme(tmp_path, capsys):
    error = run_best("ftp://host/sweep", tmp_path, capsys)
    assert "unsupported scheme 'ftp'" in error


@pytest.mark.parametrize("reported", ["fs-path", "uri"])
def test_finish_record_stores_relative_checkpoint(tmp_path, reported):
    experiment = f"file://{tmp_path}/storage/sweep"
    write_record(tmp_path / "storage" / "sweep")
    checkpoint = f"{tmp_path}/storage/sweep/head_trial_1/checkpoint_000002"
    saved = {"params": {"head_lr": 0.01}, "metrics": {"val/auprc": 0.5}}
    finish_record(experiment, checkpoint if reported == "fs-path" else f"file://{checkpoint}", saved, 3)
    record = json.loads((tmp_path / "storage" / "sweep" / RECORD_FILE).read_text())
    assert record["best"]["checkpoint"] == "head_trial_1/checkpoint_000002"
    assert record["best"]["n_trials"] == 3
    assert record["best"]["params"] == {"head_lr": 0.01}
