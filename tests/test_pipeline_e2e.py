"""End to end on real stays: Ray Train DDP pretraining with 2 workers, a 3-trial sweep, export, evaluation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from seqsetvae.cache import value_quantiles
from seqsetvae.cli import main
from seqsetvae.export import EXPORT_FILES, load_export
from seqsetvae.losses import history_quantile_levels

pytestmark = pytest.mark.e2e

SMALL_MODEL = [
    "--d-model", "32", "--latent-dim", "8", "--n-inducing", "8", "--n-heads", "2",
    "--n-set-layers", "1", "--n-seq-layers", "1", "--max-sets", "24", "--max-events-per-set", "24",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(small_meds, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(
        [
            "run", "--data", str(small_meds), "--out", str(out),
            "--max-epochs", "1", "--num-workers", "2", "--batch-size", "16", "--beta-warmup-steps", "5",
            "--num-samples", "3", "--max-concurrent-trials", "2", "--finetune-max-epochs", "4",
            "--log-every-n-steps", "1", "--bootstrap-resamples", "100", *SMALL_MODEL,
            "--history-thresholds", "3", "--history-threshold-spacing", "quantile",
        ]
    )  # fmt: skip
    assert code == 0
    return out


def test_summary_has_contract_keys(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"best_params", "val_auprc", "held_out", "export_dir", "stage_seconds"} <= set(summary)
    assert {"auroc", "auprc", "accuracy"} <= set(summary["held_out"])
    assert set(summary["stage_seconds"]) == {"cache", "pretrain", "tune", "export", "evaluate", "report"}
    assert 0.0 <= summary["val_auprc"] <= 1.0
    assert summary["n_trials"] == 3


def test_pretraining_ran_on_two_workers(run_dir):
    metrics = pd.read_csv(run_dir / "pretrain" / "pretrain_metrics.csv")
    expected = {"train/loss", "train/recon_loss", "train/kl_loss", "train/beta", "val/loss", "val/active_units"}
    assert expected <= set(metrics.columns)
    assert len(metrics) == 1
    # 160 train subjects, 2 workers, batch 16: 5 optimiser steps per worker in one epoch.
    assert int(metrics["step"].iloc[-1]) == 5
    assert (run_dir / "pretrain" / "pretrained.pt").is_file()


def test_pretrained_weights_carry_quantile_thresholds(run_dir):
    # The Ray Train workers got the thresholds from the driver, which fitted them on the cached train split.
    payload = torch.load(run_dir / "pretrain" / "pretrained.pt", weights_only=True)
    thresholds = payload["state_dict"]["history_thresholds"]
    vocab_size = len(payload["hyper_parameters"]["preprocessing"]["codes"]) + 2
    expected = value_quantiles(run_dir / "cache", "train", vocab_size, history_quantile_levels(3))
    assert thresholds.shape == (vocab_size, 3)
    np.testing.assert_allclose(thresholds.numpy(), np.nan_to_num(expected, nan=0.0), atol=1e-6)


def test_best_trial_is_chosen(run_dir):
    trials = pd.read_csv(run_dir / "sweep" / "trials.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(trials) == 3
    assert summary["val_auprc"] == pytest.approx(trials["val_auprc"].max(), abs=1e-6)
    # The kept head is the one after the final epoch, and its tuning AUPRC ranks the trial.
    saved = json.loads((run_dir / "sweep" / "best" / "params.json").read_text())
    assert saved["metrics"]["epoch"] == 3
    assert saved["metrics"]["val/auprc"] == pytest.approx(summary["val_auprc"], abs=1e-6)
    for key in ("focal_gamma", "focal_alpha", "head_init", "head_lr"):
        assert key in summary["best_params"]


def test_trial_numbers_follow_suggestion_order(run_dir):
    trials = pd.read_csv(run_dir / "sweep" / "trials.csv")
    assert sorted(trials["trial_number"]) == [1, 2, 3]
    # The base config is evaluated first, as trial 1.
    first = trials[trials["trial_number"] == 1].iloc[0]
    assert first["config/focal_gamma"] == 2.0
    assert first["config/head_init"] == "normal"
    assert pd.isna(first["config/focal_alpha"])


def test_every_stage_writes_tensorboard(run_dir):
    from seqsetvae.report.training_curves import read_tensorboard_scalars

    pretraining = read_tensorboard_scalars(run_dir / "pretrain" / "tensorboard")
    assert {"train/recon_loss", "train/kl_loss", "train/beta", "val/active_units"} <= set(pretraining["tag"])
    # Rank 0 logs each of its 5 optimiser steps, and validation once.
    assert len(pretraining[pretraining["tag"] == "train/recon_loss"]) == 5
    assert len(pretraining[pretraining["tag"] == "val/recon_loss"]) == 1
    trial_logs = list((run_dir / "sweep" / "ray_results" / "sweep").glob("head_trial_*/events.out.tfevents.*"))
    assert len(trial_logs) == 3
    sweep = read_tensorboard_scalars(trial_logs[0].parent)
    assert any(tag.endswith("val/auprc") for tag in sweep["tag"])


def test_run_writes_report(run_dir):
    from matplotlib.image import imread

    from seqsetvae.report.figures import FIGURE_INCHES, figure_pixels

    report = json.loads((run_dir / "report" / "report.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["report"]["path"] == str(run_dir / "report" / "report.md")
    assert report["auroc"] == pytest.approx(summary["held_out"]["auroc"], abs=1e-6)
    assert report["baseline"]["auroc"] == summary["report"]["baseline_auroc"]
    assert report["pretraining"]["source"] == "tensorboard"
    assert report["sweep"]["n_trials"] == 3
    for name in FIGURE_INCHES:
        assert imread(run_dir / "report" / name).shape[:2] == figure_pixels(name), name


def test_export_loads_without_ray(run_dir):
    export = run_dir / "export"
    assert sorted(p.name for p in export.iterdir()) == sorted(EXPORT_FILES)
    script = (
        "import sys, json; from seqsetvae.export import load_export; "
        f"m = load_export({str(export)!r}); "
        "print(json.dumps({'ray': 'ray' in sys.modules, 'z': m.head.in_features}))"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = json.loads(output.stdout.strip().splitlines()[-1])
    assert loaded["ray"] is False
    assert loaded["z"] == 2 * 8
    model = load_export(export)
    assert all(not p.requires_grad for p in model.encoder.parameters())


def test_held_out_predictions(run_dir, small_meds):
    predictions = pq.read_table(run_dir / "evaluation" / "predictions.parquet")
    assert predictions.column_names == [
        "subject_id",
        "prediction_time",
        "boolean_value",
        "predicted_boolean_value",
        "predicted_boolean_probability",
    ]
    assert predictions.num_rows == 40
    probabilities = predictions.column("predicted_boolean_probability").to_numpy()
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert {"auroc", "auprc", "accuracy", "n", "n_positive"} <= set(metrics)
    assert metrics["n"] == 40
    assert metrics["n_positive"] == int(predictions.column("boolean_value").to_numpy().sum())


def test_evaluate_command_on_tuning_split(run_dir, small_meds, tmp_path):
    code = main(
        ["evaluate", "--model", str(run_dir / "export"), "--data", str(small_meds), "--split", "tuning", "--out", str(tmp_path)]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"] == 40
    assert metrics["split"] == "tuning"


def test_finetune_alias_runs_one_head(run_dir, small_meds, tmp_path):
    code = main(
        [
            "train", "--finetune", "--data", str(small_meds),
            "--pretrained-ckpt", str(run_dir / "pretrain" / "pretrained.pt"),
            "--out", str(tmp_path), "--finetune-max-epochs", "2", "--max-sets", "24", "--max-events-per-set", "24",
        ]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "export" / "metrics.json").read_text())
    assert {"val/auroc", "val/auprc", "val/accuracy"} <= set(metrics)


def test_best_export_from_run_directory(run_dir, tmp_path):
    from safetensors.torch import load_file

    # Without --storage, the sweep's storage lies in the run directory.
    code = main(["best", "--sweep", str(run_dir), "--export", str(tmp_path / "best")])
    assert code == 0
    for name in ("head.safetensors", "encoder.safetensors"):
        exported = load_file(str(tmp_path / "best" / name))
        expected = load_file(str(run_dir / "export" / name))
        assert exported.keys() == expected.keys()
        assert all((exported[key] == expected[key]).all() for key in expected)
    config = json.loads((tmp_path / "best" / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert config["finetune_config"] == summary["best_params"]


def test_run_with_encoder_skips_pretraining(run_dir, small_meds, tmp_path):
    from safetensors.torch import load_file

    pretrained = run_dir / "pretrain" / "pretrained.pt"
    code = main(
        [
            "run", "--data", str(small_meds), "--out", str(tmp_path), "--pretrained-ckpt", str(pretrained),
            "--num-samples", "2", "--max-concurrent-trials", "2", "--finetune-max-epochs", "2",
            "--bootstrap-resamples", "50", "--max-sets", "24", "--max-events-per-set", "24",
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pretrained"] == str(pretrained.resolve())
    assert summary["pretrain_best_val_loss"] is None
    assert not (tmp_path / "pretrain").exists()
    assert summary["held_out"]["n"] == 40
    exported = load_file(str(tmp_path / "export" / "encoder.safetensors"))
    expected = load_file(str(run_dir / "export" / "encoder.safetensors"))
    assert all((exported[key] == expected[key]).all() for key in expected)


def test_sweep_keeps_best_epoch(run_dir, small_meds, tmp_path):
    out = tmp_path / "sweep"
    code = main(
        ["tune", "--data", str(small_meds), "--pretrained-ckpt", str(run_dir / "pretrain" / "pretrained.pt"),
         "--out", str(out), "--num-samples", "2", "--max-concurrent-trials", "2", "--max-epochs", "6",
         "--trial-epoch", "best", "--max-sets", "24", "--max-events-per-set", "24"]
    )  # fmt: skip
    assert code == 0
    saved = json.loads((out / "best" / "params.json").read_text())
    trials = pd.read_csv(out / "trials.csv")
    best = trials.iloc[0]
    [trial_dir] = (out / "ray_results" / "sweep").glob(f"head_trial_{best['trial_id']}_*")
    history = pd.read_json(trial_dir / "result.json", lines=True)
    # The kept head is from the first epoch with the trial's highest tuning AUPRC, which ranks the trial.
    assert saved["metrics"]["epoch"] == int(history.loc[history["val/auprc"].idxmax(), "epoch"])
    assert best["val_auprc"] == pytest.approx(history["val/auprc"].max(), abs=1e-6)
    assert saved["metrics"]["val/auprc"] == pytest.approx(trials["val_auprc"].max(), abs=1e-6)


def test_probe_scores_run_encoder(run_dir, tmp_path, capsys):
    from benchmarks.probe import main as probe_main

    # A run given --pretrained-ckpt has no pretrain/ directory: its summary names the encoder.
    reused = tmp_path / "reused"
    reused.mkdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["pretrained"] = str(run_dir / "pretrain" / "pretrained.pt")
    (reused / "summary.json").write_text(json.dumps(summary))
    (reused / "cache").symlink_to(run_dir / "cache")

    probe_main([str(run_dir), str(reused)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["variant"] for line in lines] == ["last", "last_mu", "last", "last_mu"]
    for line in lines:
        assert 0.0 <= line["held_out_auroc"] <= 1.0
        assert 0.0 <= line["tuning_auprc"] <= 1.0
    scores = [{key: value for key, value in line.items() if key != "run"} for line in lines]
    assert scores[:2] == scores[2:]


def test_probe_names_missing_summary(tmp_path):
    from benchmarks.probe import main as probe_main

    with pytest.raises(SystemExit, match=r"summary\.json: not found; pass the output directory"):
        probe_main([str(tmp_path)])
