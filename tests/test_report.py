"""The evaluation report on real stays: a real pretrained encoder and head, a real baseline fit, real PNGs."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from seqsetvae.cache import SplitCache, ensure_cache, fit_preprocessor
from seqsetvae.cli import main
from seqsetvae.config import DataConfig, FinetuneConfig, ModelConfig, PretrainConfig
from seqsetvae.data import SetSequenceDataModule
from seqsetvae.evaluate import evaluate, predict_split
from seqsetvae.export import load_export
from seqsetvae.finetune import run_finetune
from seqsetvae.lit import PretrainModule
from seqsetvae.pretrain import export_pretrained
from seqsetvae.report.baseline import LabelRows, read_split_events, summary_features
from seqsetvae.report.build import cache_label_rows, meds_label_rows
from seqsetvae.report.figures import FIGURE_INCHES, figure_pixels
from seqsetvae.report.metrics import choose_threshold
from seqsetvae.report.sweep_insight import load_trials, rebuild_study
from seqsetvae.report.training_curves import read_tensorboard_scalars
from seqsetvae.training_log import TENSORBOARD_DIR

TASK = "in_hospital_mortality"
DATA = DataConfig(max_sets=24, max_events_per_set=24)
MODEL = ModelConfig(d_model=16, latent_dim=4, n_inducing=4, n_heads=2, n_set_layers=1, n_seq_layers=1)
PRETRAIN = PretrainConfig(max_epochs=2, batch_size=32, beta_warmup_steps=5, log_every_n_steps=1)
RESAMPLES = 200
US_PER_HOUR = 3_600_000_000

# A finished sweep as `seqsetvae tune` writes it: one trial without focal_alpha
# (the None category) and one failed trial without a value.
TRIALS_CSV = """\
trial_number,trial_id,config/focal_gamma,config/focal_alpha,config/head_init,config/head_lr,config/weight_decay,val_auprc,epochs,status
3,c3,1.5,0.75,normal,0.005,0.0001,0.41,40,TERMINATED
1,a1,2.0,,normal,0.003,0.0,0.38,40,TERMINATED
5,e5,4.1,0.9,zero_logodds,0.002,0.0,0.35,40,TERMINATED
2,b2,0.7,0.25,xavier,0.009,0.001,0.22,40,TERMINATED
4,d4,3.3,,xavier,0.008,0.001,0.19,40,TERMINATED
6,f6,2.5,0.5,normal,0.001,0.0001,,0,ERROR
"""


@pytest.fixture(scope="module")
def trained(small_meds, tmp_path_factory):
    """A run directory with a pretrained encoder (TensorBoard logs included), an exported head and a sweep table."""
    root = tmp_path_factory.mktemp("report_run")
    cache = root / "cache"
    preprocessor = fit_preprocessor(small_meds, DATA)
    ensure_cache(small_meds, cache, DATA, preprocessor)

    pl.seed_everything(0, verbose=False)
    module = PretrainModule(asdict(MODEL), asdict(PRETRAIN), preprocessor.to_dict())
    from seqsetvae.training_log import tensorboard_logger

    trainer = pl.Trainer(
        max_epochs=PRETRAIN.max_epochs, accelerator="cpu", devices=1,
        logger=tensorboard_logger(root / "pretrain" / TENSORBOARD_DIR), log_every_n_steps=PRETRAIN.log_every_n_steps,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=SetSequenceDataModule(cache, DATA.max_sets, PRETRAIN.batch_size))
    trainer.save_checkpoint(root / "last.ckpt")
    export_pretrained(root / "last.ckpt", root / "pretrain" / "pretrained.pt")

    run_finetune(
        small_meds, root / "pretrain" / "pretrained.pt", root, DATA, FinetuneConfig(max_epochs=4, batch_size=32),
        cache_dir=cache,
    )  # fmt: skip
    (root / "sweep").mkdir()
    (root / "sweep" / "trials.csv").write_text(TRIALS_CSV)
    return root


@pytest.fixture(scope="module")
def report_dir(trained, small_meds):
    out = trained / "report"
    code = main(
        [
            "report", "--model", str(trained / "export"), "--data", str(small_meds), "--split", "held_out",
            "--out", str(out), "--cache-dir", str(trained / "cache"), "--bootstrap-resamples", str(RESAMPLES),
        ]
    )  # fmt: skip
    assert code == 0
    return out


REPORT_KEYS = ("auroc", "auroc_ci", "auprc", "auprc_ci", "accuracy", "brier", "challenge_score", "threshold")


def test_report_json_has_contract_keys(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    for key in REPORT_KEYS:
        assert key in report, key
        assert key in report["baseline"], key
    assert report["split"] == "held_out"
    assert report["n"] == 40
    assert report["bootstrap"]["resamples"] == RESAMPLES
    assert report["positive_rate"] == pytest.approx(report["n_positive"] / report["n"])


@pytest.mark.parametrize("model", ["model", "baseline"])
def test_report_intervals_contain_estimates(report_dir, model):
    report = json.loads((report_dir / "report.json").read_text())
    metrics = report if model == "model" else report["baseline"]
    for name in ("auroc", "auprc"):
        low, high = metrics[f"{name}_ci"]
        assert 0.0 <= low <= metrics[name] <= high <= 1.0
    assert 0.0 <= metrics["brier"] <= 1.0
    assert 0.0 < metrics["threshold"] < 1.0


def test_report_uses_run_directories_beside_export(report_dir, trained):
    report = json.loads((report_dir / "report.json").read_text())
    assert report["sweep"]["sweep_dir"] == str(trained / "sweep")
    assert report["sweep"]["n_trials"] == 6
    assert report["sweep"]["n_completed"] == 5
    assert report["sweep"]["best_trial"] == 3
    assert report["pretraining"]["source"] == "tensorboard"


def test_report_figures_decode_at_expected_size(report_dir):
    for name in FIGURE_INCHES:
        path = report_dir / name
        assert path.is_file(), name
        assert path.stat().st_size > 10_000, name
        image = imread(path)
        assert image.shape[:2] == figure_pixels(name), name
        # A blank canvas has one colour; a drawn figure has many.
        assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 50, name


def test_report_markdown_shows_numbers_and_figures(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    markdown = (report_dir / "report.md").read_text()
    for name in FIGURE_INCHES:
        assert f"]({name})" in markdown, name
    assert f"{report['auroc']:.4f}" in markdown
    assert f"{report['baseline']['auroc']:.4f}" in markdown
    assert f"{report['challenge_score']:.4f}" in markdown
    assert "| 3 | 1.5 | 0.75 | normal |" in markdown  # the best trial, first in the table
    assert "| none | 0 | ERROR |" in markdown


def test_report_model_metrics_match_evaluate(report_dir, trained, small_meds, tmp_path):
    report = json.loads((report_dir / "report.json").read_text())
    metrics = evaluate(trained / "export", small_meds, "held_out", tmp_path, cache_dir=trained / "cache")
    assert report["auroc"] == pytest.approx(metrics["auroc"], abs=1e-6)
    assert report["auprc"] == pytest.approx(metrics["auprc"], abs=1e-6)
    assert report["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)


def test_report_threshold_is_chosen_on_tuning(report_dir, trained):
    report = json.loads((report_dir / "report.json").read_text())
    tuning = SplitCache(trained / "cache", "tuning", task=TASK)
    probabilities = predict_split(load_export(trained / "export"), tuning)
    expected = choose_threshold(probabilities, tuning.labels["value"].astype(bool), "tuning")
    assert report["threshold_split"] == "tuning"
    assert report["threshold"] == pytest.approx(expected.value)
    assert report["tuning_challenge_score"] == pytest.approx(expected.score)


def test_baseline_features_match_plain_loop(small_meds, trained):
    events = read_split_events(small_meds, "tuning")
    rows = cache_label_rows(SplitCache(trained / "cache", "tuning", task=TASK))
    codes = ["HR", "GCS", "STATIC//Gender//0", "NeverSeen"]
    # Cut each stay at 6 hours after its first event, so later events must be left out.
    first = events.groupby("subject_id")["time_us"].min()
    cut = LabelRows(rows.subject_id, first.loc[rows.subject_id].to_numpy() + 6 * US_PER_HOUR, rows.label)
    features = summary_features(events, cut, codes)
    assert features.shape == (len(rows), 5 * len(codes))
    for i in (0, 7, len(rows) - 1):
        subject = events[(events["subject_id"] == cut.subject_id[i]) & (events["time_us"] <= cut.prediction_time_us[i])]
        for code in codes:
            chosen = subject[subject["code"] == code].sort_values("time_us", kind="stable")
            values = [v for v in chosen["value"] if not math.isnan(v)]
            assert features.loc[i, f"{code}/count"] == len(chosen)
            if values:
                assert features.loc[i, f"{code}/last"] == pytest.approx(values[-1])
                assert features.loc[i, f"{code}/min"] == pytest.approx(min(values))
                assert features.loc[i, f"{code}/max"] == pytest.approx(max(values))
                assert features.loc[i, f"{code}/mean"] == pytest.approx(sum(values) / len(values))
            else:
                assert math.isnan(features.loc[i, f"{code}/last"])
    full = summary_features(events, rows, ["HR"])
    assert (full["HR/count"] >= features["HR/count"]).all()
    assert (full["HR/count"] > features["HR/count"]).any()


def test_meds_labels_match_cache_order(small_meds, trained):
    from_meds = meds_label_rows(small_meds, TASK, "held_out")
    from_cache = cache_label_rows(SplitCache(trained / "cache", "held_out", task=TASK))
    np.testing.assert_array_equal(from_meds.subject_id, from_cache.subject_id)
    np.testing.assert_array_equal(from_meds.prediction_time_us, from_cache.prediction_time_us)
    np.testing.assert_array_equal(from_meds.label, from_cache.label)


def test_study_keeps_none_category_and_failures(trained):
    from ray.tune.search.optuna import OptunaSearch

    from tune.search_space import search_space

    import optuna

    trials = load_trials(trained / "sweep")
    study = rebuild_study(trials, OptunaSearch.convert_search_space(search_space()))
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(complete) == 5
    assert len(failed) == 1
    alphas = sorted(trial.params["focal_alpha"] is None for trial in complete)
    assert alphas == [False, False, False, True, True]
    assert study.best_value == pytest.approx(0.41)


def test_importances_cover_every_parameter(report_dir):
    importances = json.loads((report_dir / "report.json").read_text())["sweep"]["importances"]
    assert set(importances) == {"focal_gamma", "focal_alpha", "head_init", "head_lr", "weight_decay"}
    assert sum(importances.values()) == pytest.approx(1.0, abs=1e-6)


def test_pretraining_logs_every_step(trained):
    scalars = read_tensorboard_scalars(trained / "pretrain" / TENSORBOARD_DIR)
    tags = set(scalars["tag"])
    assert {"train/recon_loss", "train/kl_loss", "train/beta", "train/active_units", "val/recon_loss"} <= tags
    # 160 train subjects in batches of 32 for 2 epochs: 10 optimiser steps, each logged.
    assert len(scalars[scalars["tag"] == "train/recon_loss"]) == 10
    assert len(scalars[scalars["tag"] == "val/recon_loss"]) == 2
    beta = scalars[scalars["tag"] == "train/beta"].sort_values("step")["value"].to_numpy()
    assert beta[0] == 0.0  # the warm-up starts from 0
    assert beta[-1] == pytest.approx(PRETRAIN.beta)


def test_finetune_writes_tensorboard(trained):
    scalars = read_tensorboard_scalars(trained / TENSORBOARD_DIR)
    epochs = scalars[scalars["tag"] == "val/auprc"]
    assert len(epochs) == 4
    hparams = (trained / TENSORBOARD_DIR / "hparams.yaml").read_text()
    assert "focal_gamma" in hparams
    assert "preprocessing" not in hparams


def test_report_rejects_missing_export(small_meds, tmp_path, capsys):
    code = main(["report", "--model", str(tmp_path / "absent"), "--data", str(small_meds), "--out", str(tmp_path / "r")])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "not a seqsetvae export" in error


def test_report_rejects_bad_confidence_level(trained, small_meds, tmp_path, capsys):
    code = main(
        [
            "report", "--model", str(trained / "export"), "--data", str(small_meds), "--out", str(tmp_path),
            "--confidence-level", "95",
        ]
    )  # fmt: skip
    assert code == 2
    assert "confidence_level: expected a value in (0, 1), got 95.0" in capsys.readouterr().err


def test_trial_table_reads_as_written(trained):
    trials = load_trials(trained / "sweep")
    assert list(trials["trial_number"]) == [3, 1, 5, 2, 4, 6]
    assert trials["focal_alpha"].isna().sum() == 2
    assert pd.isna(trials.loc[trials["status"] == "ERROR", "val_auprc"]).all()


def test_old_trial_table_reads(tmp_path):
    (tmp_path / "trials.csv").write_text(TRIALS_CSV.replace("val_auprc", "best_val_auprc"))
    trials = load_trials(tmp_path)
    assert trials["val_auprc"].max() == 0.41


def test_report_rejects_data_without_tuning(trained, tmp_path, capsys):
    from conftest import make_meds_subset

    meds = make_meds_subset(tmp_path / "meds", {"train": 20, "held_out": 20})
    code = main(["report", "--model", str(trained / "export"), "--data", str(meds), "--out", str(tmp_path / "r")])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "split 'tuning' has no subjects" in error


def test_baseline_fits_with_few_positives(small_meds, caplog):
    from seqsetvae.report.baseline import MIN_LABELS_FOR_EARLY_STOPPING, fit_baseline

    events = read_split_events(small_meds, "train")
    rows = meds_label_rows(small_meds, TASK, "train")
    # Keep a single positive label, too few for a stratified early-stopping split.
    first_positive = int(np.flatnonzero(rows.label)[0])
    keep = ~rows.label
    keep[first_positive] = True
    few = LabelRows(rows.subject_id[keep], rows.prediction_time_us[keep], rows.label[keep])
    with caplog.at_level("WARNING", logger="seqsetvae.report.baseline"):
        baseline = fit_baseline(events, few, max_codes=50, seed=0)
    assert baseline.info["early_stopping"] is False
    assert f"fewer than {MIN_LABELS_FOR_EARLY_STOPPING}" in caplog.text
    probabilities = baseline.predict(events, few)
    assert probabilities.shape == (len(few),)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
