"""A tuning or held-out split with one class: AUROC and AUPRC are undefined, reported as such, and nothing crashes."""

from __future__ import annotations

import json
import logging
import math

from seqsetvae.cli import main

from .meds_data import copy_dataset, read_labels, read_subject_splits, write_labels


def one_class(root, split: str, value: bool) -> None:
    """Give every label of `split` the class `value`."""
    labels = read_labels(root)
    splits = read_subject_splits(root)
    in_split = labels["subject_id"].isin(splits.loc[splits["split"] == split, "subject_id"])
    labels.loc[in_split, "boolean_value"] = value
    write_labels(root, labels)


def test_finetune_on_one_class_tuning(small_meds, tiny_pretrained, tmp_path, caplog, capsys):
    root = copy_dataset(small_meds, tmp_path / "meds")
    one_class(root, "tuning", False)
    with caplog.at_level(logging.WARNING, logger="seqsetvae"):
        code = main(
            ["finetune", "--data", str(root), "--pretrained-ckpt", str(tiny_pretrained), "--out", str(tmp_path / "ft"),
             "--max-epochs", "3"]
        )  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "ft" / "export" / "metrics.json").read_text())
    assert metrics["val/auroc"] is None
    assert metrics["val/auprc"] is None
    assert math.isfinite(metrics["val/loss"])
    assert 0.0 <= metrics["val/accuracy"] <= 1.0
    assert caplog.text.count("All 40 validation labels are negative: val/auroc and val/auprc are undefined") == 1
    assert '"val/auprc": null' in capsys.readouterr().out


def test_evaluate_on_one_class_held_out(small_meds, tiny_export, tmp_path, caplog):
    root = copy_dataset(small_meds, tmp_path / "meds")
    one_class(root, "held_out", True)
    with caplog.at_level(logging.WARNING, logger="seqsetvae"):
        code = main(["evaluate", "--model", str(tiny_export), "--data", str(root), "--out", str(tmp_path / "eval")])
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["auroc"] is None
    assert metrics["auprc"] is None
    assert metrics["n_positive"] == metrics["n"] == 40
    assert "Only one class among 40 labels: AUROC and AUPRC are undefined" in caplog.text


def test_sweep_on_one_class_tuning(small_meds, tiny_pretrained, ray_local, tmp_path, caplog, capsys):
    root = copy_dataset(small_meds, tmp_path / "meds")
    one_class(root, "tuning", True)
    out = tmp_path / "sweep"
    with caplog.at_level(logging.WARNING, logger="tune"):
        code = main(
            ["tune", "--data", str(root), "--pretrained-ckpt", str(tiny_pretrained), "--out", str(out),
             "--num-samples", "2", "--max-concurrent-trials", "2", "--max-epochs", "2"]
        )  # fmt: skip
    assert code == 0
    assert "Best val/auprc undefined over 2 trials" in capsys.readouterr().out
    assert "trials are ranked by the lowest val/loss instead" in caplog.text
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["val_auprc"] is None
    assert summary["val_auroc"] is None
    best = json.loads((out / "best" / "params.json").read_text())
    assert math.isfinite(best["metrics"]["val/loss"])
    assert (out / "best" / "head.safetensors").is_file()
