"""The benchmarks run at tiny sizes and return the contract keys with sane values; no timing is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import data_scale, length_grouping, sweep_cost, throughput, workers
from benchmarks.reference import reference_loss
from seqsetvae.config import ModelConfig
from seqsetvae.model.core import SeqSetVAE
from seqsetvae.physionet import DEMO_DATA_DIR

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("history_thresholds", [0, 3])
def test_reference_matches_vectorised_loss(history_thresholds):
    from test_model import VOCAB, make_batch

    torch.manual_seed(0)
    config = ModelConfig(d_model=16, latent_dim=4, n_inducing=3, n_heads=2, history_thresholds=history_thresholds)
    model = SeqSetVAE(config, VOCAB).eval()
    batch = make_batch([3, 1, 5, 0])
    expected = reference_loss(model, batch, beta=0.5, free_bits=0.05)
    got = model(batch, beta=0.5, free_bits=0.05)["loss"]
    assert abs(got.item() - expected.item()) < 1e-5


def test_reference_rejects_training_mode():
    from test_model import VOCAB, make_batch

    model = SeqSetVAE(ModelConfig(d_model=16, latent_dim=4, n_inducing=3, n_heads=2), VOCAB).train()
    with pytest.raises(ValueError, match="eval mode"):
        reference_loss(model, make_batch([2]), beta=0.5, free_bits=0.05)


def test_throughput_benchmark_tiny(tmp_path):
    figures = throughput.measure(throughput.TINY, str(tmp_path))
    assert figures["vectorised_max_loss_diff"] < 1e-5
    assert figures["vectorised_speedup"] > 0
    training = figures["throughput"]["training"]
    assert set(training) == {"demo", "generated_60"}
    for run in training.values():
        assert run["events_per_second"] > 0
        assert 0.0 <= run["padding_fraction"] < 1.0


def test_data_scale_benchmark_tiny(tmp_path):
    figures = data_scale.measure((40, 80), str(tmp_path))
    assert set(figures["prepare_seconds_by_subjects"]) == {"40", "80"}
    assert 0 < figures["prepare_peak_rss_gb"] < 4
    assert 0 < figures["epoch_read_peak_rss_gb"] < 4
    per_size = figures["data_scale"]["per_size"]
    assert per_size["80"]["generated"]["events"] > per_size["40"]["generated"]["events"]
    # Preparation drops exact duplicate events, which the generator makes now and then.
    assert 0.9 * per_size["80"]["generated"]["events"] <= per_size["80"]["prepare"]["events"]
    assert per_size["80"]["prepare"]["events"] <= per_size["80"]["generated"]["events"]
    assert per_size["80"]["epoch_read"]["subjects"] > 0


def test_sweep_cost_benchmark_tiny(tmp_path, ray_local):
    figures = sweep_cost.measure(sweep_cost.TINY, str(tmp_path))
    ratio = figures["sweep_cached_32_over_uncached_1"]
    assert math.isfinite(ratio)
    assert ratio > 0
    assert figures["sweep_cost"]["cached_trials"] == sweep_cost.TINY.trials


def test_workers_benchmark_tiny(tmp_path, ray_local):
    sizes = workers.Sizes(batch_size=8, max_sets=8, generated_subjects=60, epochs=2, worker_counts=(1,))
    figures = workers.measure(sizes, str(tmp_path))
    assert set(figures["samples_per_second_by_workers"]) == {"1"}
    run = figures["workers"]["per_workers"]["1"]
    assert run["wall_seconds_2_epochs"] > 0
    assert run["wall_seconds_1_epoch"] > 0


def test_gpu_script_runs_on_cpu(tmp_path):
    out = tmp_path / "cpu.json"
    command = [sys.executable, "-m", "benchmarks.gpu_throughput", "--device", "cpu", "--quick",
               "--variants", "float32", "bf16", "--out", str(out)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"float32_batch_8", "bf16_batch_8"}
    for run in runs.values():
        assert run["events_per_second"] > 0


def test_reference_matches_without_history_decoder():
    from test_model import VOCAB, make_batch

    torch.manual_seed(0)
    config = ModelConfig(d_model=16, latent_dim=4, n_inducing=3, n_heads=2, history_weight=0.0)
    model = SeqSetVAE(config, VOCAB).eval()
    assert model.history_decoder is None
    batch = make_batch([3, 1, 5, 0])
    expected = reference_loss(model, batch, beta=0.5, free_bits=0.05)
    assert abs(model(batch, beta=0.5, free_bits=0.05)["loss"].item() - expected.item()) < 1e-5


def test_seed_spread_is_mean_and_sample_std():
    from benchmarks.seeds import FIGURES, spread

    per_seed = {seed: {name: float(seed) for name in FIGURES} for seed in (0, 1, 2)}
    result = spread(per_seed)
    assert result["auroc"] == {"mean": 1.0, "std": 1.0}
    assert spread({0: per_seed[0]})["auprc"]["std"] == 0.0


def test_ablation_overrides_go_to_their_config():
    from benchmarks.ablations import parse_overrides

    overrides = parse_overrides(["max_sets=128", "latent_dim=64", "beta=0.1", "history_weight=0"])
    assert overrides == {
        "data": {"max_sets": 128},
        "model": {"latent_dim": 64, "history_weight": 0},
        "pretrain": {"beta": 0.1},
    }
    with pytest.raises(SystemExit, match="no config field named 'latent'"):
        parse_overrides(["latent=3"])


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("history_thresholds=9.0", "--set: history_thresholds expected int, got 9.0"),
        ("history_threshold_spacing=deciles", "--set: history_threshold_spacing: expected one of even, quantile"),
    ],
)
def test_ablation_rejects_bad_override_values(tmp_path, pair, message):
    from benchmarks.ablations import main

    with pytest.raises(SystemExit, match=message):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--name", "bad", "--set", pair])
    assert not (tmp_path / "out").exists()


def test_ablation_baselines_only(small_meds, tmp_path):
    from benchmarks.ablations import main

    main(["--data", str(small_meds), "--out", str(tmp_path), "--name", "baselines", "--baseline-only"])
    [line] = (tmp_path / "results.jsonl").read_text().splitlines()
    result = json.loads(line)
    assert result["name"] == "baselines"
    assert "probes" not in result
    for model in ("gradient_boosting", "logistic_regression", "logistic_regression_thresholds"):
        scores = result["baseline"][model]
        for key in ("tuning_auroc", "tuning_auprc", "held_out_auroc", "held_out_auprc"):
            assert 0.0 <= scores[key] <= 1.0, (model, key)


def test_threshold_features_mark_deciles():
    import pandas as pd

    from benchmarks.ablations import threshold_features

    summaries = {"train": pd.DataFrame({"a": np.arange(10.0)}), "held_out": pd.DataFrame({"a": [-1.0, 100.0, np.nan]})}
    features = {split: np.zeros((len(table), 1)) for split, table in summaries.items()}
    result = threshold_features(summaries, features)
    assert result["train"].shape == (10, 1 + 9)
    # Each train row lies above as many deciles as there are below it.
    assert result["train"][:, 1:].sum(axis=1).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert result["held_out"][:, 1:].sum(axis=1).tolist() == [0, 9, 0]


def test_length_grouping_benchmark_tiny(tmp_path):
    options = {"max_sets": 32, "batch_size": 16, "d_model": 16, "latent_dim": 4, "n_inducing": 2, "n_heads": 2}
    figures = length_grouping.measure(DEMO_DATA_DIR, options, 2, str(tmp_path))
    padded = figures["padded_over_real_sets"]
    assert 1.0 <= padded["grouped"] < padded["shuffled"]
    assert figures["grouped"]["batches"] == figures["shuffled"]["batches"]
    for order in ("shuffled", "grouped"):
        assert figures[order]["sampled_batches"] == 2
        assert figures[order]["cpu_seconds_per_step"] > 0

