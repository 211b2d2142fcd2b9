"""History thresholds at each code's train quantiles: fitting them on a real cache, carrying them in checkpoints."""

from __future__ import annotations

from dataclasses import asdict, replace

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch

from seqsetvae.cache import SplitCache, ensure_cache, fit_preprocessor, value_quantiles
from seqsetvae.config import DataConfig, ModelConfig, PretrainConfig
from seqsetvae.data import SetSequenceDataset
from seqsetvae.errors import UserInputError
from seqsetvae.lit import PretrainModule
from seqsetvae.model.core import SeqSetVAE
from seqsetvae.pretrain import quantile_thresholds

from conftest import fit_two_batches

DATA = DataConfig(max_sets=8, max_events_per_set=8)
EVEN = ModelConfig(d_model=16, latent_dim=4, n_inducing=2, n_heads=2, n_set_layers=1, n_seq_layers=1, history_thresholds=3)
QUANTILE = replace(EVEN, history_threshold_spacing="quantile")
LEVELS = (0.25, 0.5, 0.75)


@pytest.fixture(scope="module")
def cache(small_meds, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("quantile-cache")
    preprocessor = fit_preprocessor(small_meds, DATA)
    ensure_cache(small_meds, cache_dir, DATA, preprocessor, splits=("train", "tuning"))
    return cache_dir, preprocessor


def pandas_quantiles(cache_dir, vocab_size: int) -> np.ndarray:
    train = SplitCache(cache_dir, "train")
    valued = np.asarray(train.has_value)
    frame = pd.DataFrame({"code": np.asarray(train.codes)[valued], "value": np.asarray(train.values)[valued]})
    expected = np.full((vocab_size, len(LEVELS)), np.nan)
    for code, group in frame.groupby("code"):
        expected[code] = group["value"].astype(np.float64).quantile(list(LEVELS)).to_numpy()
    return expected


def test_value_quantiles_match_pandas(cache):
    cache_dir, preprocessor = cache
    table = value_quantiles(cache_dir, "train", preprocessor.vocab_size, LEVELS)
    expected = pandas_quantiles(cache_dir, preprocessor.vocab_size)
    np.testing.assert_allclose(table, expected, rtol=0, atol=1e-6, equal_nan=True)
    # Special codes and codes without values have no quantiles; the demo has codes with values.
    assert np.isnan(table[:2]).all()
    assert np.isfinite(table).all(axis=1).sum() > 5
    assert (np.diff(table[np.isfinite(table).all(axis=1)], axis=1) >= 0).all()


def test_value_quantiles_sample_frequent_codes(cache):
    cache_dir, preprocessor = cache
    full = value_quantiles(cache_dir, "train", preprocessor.vocab_size, LEVELS)
    sampled = value_quantiles(cache_dir, "train", preprocessor.vocab_size, LEVELS, sample_size=20)
    train = SplitCache(cache_dir, "train")
    counts = np.bincount(np.asarray(train.codes)[np.asarray(train.has_value)], minlength=preprocessor.vocab_size)
    # Every code with a value keeps a row, also the rare ones.
    assert np.array_equal(np.isfinite(sampled), np.isfinite(full))
    rare, frequent = (counts > 0) & (counts <= 20), counts > 20
    assert rare.any()
    assert frequent.any()
    np.testing.assert_allclose(sampled[rare], full[rare], atol=1e-6)
    assert not np.allclose(sampled[frequent], full[frequent])


def test_quantile_thresholds_only_for_quantile_spacing(cache):
    cache_dir, preprocessor = cache
    assert quantile_thresholds(EVEN, cache_dir, preprocessor.vocab_size) is None
    table = np.asarray(quantile_thresholds(QUANTILE, cache_dir, preprocessor.vocab_size))
    expected = pandas_quantiles(cache_dir, preprocessor.vocab_size)
    np.testing.assert_allclose(table, np.nan_to_num(expected, nan=0.0), atol=1e-6)


def test_even_spacing_keeps_grid_out_of_state_dict():
    model = SeqSetVAE(EVEN, vocab_size=10)
    assert model.history_thresholds.tolist() == [-2.0, 0.0, 2.0]
    assert "history_thresholds" not in model.state_dict()
    with pytest.raises(ValueError, match="quantile"):
        model.set_history_thresholds(torch.zeros(10, 3))


def test_set_history_thresholds_checks_table():
    model = SeqSetVAE(QUANTILE, vocab_size=10)
    assert not model.history_thresholds_ready()
    with pytest.raises(ValueError, match=r"shape \(10, 3\)"):
        model.set_history_thresholds(torch.zeros(10, 4))
    with pytest.raises(ValueError, match="finite"):
        model.set_history_thresholds(torch.full((10, 3), float("nan")))
    table = torch.arange(30.0).view(10, 3)
    model.set_history_thresholds(table)
    assert model.history_thresholds_ready()
    assert torch.equal(model.state_dict()["history_thresholds"], table)


def test_spacing_name_is_checked():
    with pytest.raises(UserInputError, match="history_threshold_spacing: expected one of even, quantile"):
        replace(EVEN, history_threshold_spacing="deciles")


def test_quantile_spacing_needs_thresholds():
    with pytest.raises(UserInputError, match="set history_thresholds above 0 or the spacing to 'even'"):
        replace(QUANTILE, history_thresholds=0)


def test_fit_keeps_thresholds_in_state(cache):
    cache_dir, preprocessor = cache
    pretrain = asdict(PretrainConfig(batch_size=4, max_epochs=1, beta_warmup_steps=0))
    table = quantile_thresholds(QUANTILE, cache_dir, preprocessor.vocab_size)
    pl.seed_everything(0, verbose=False)
    module = PretrainModule(asdict(QUANTILE), pretrain, preprocessor.to_dict(), history_thresholds=table)
    trainer = fit_two_batches(module, cache_dir, DATA.max_sets, batch_size=4)
    assert torch.isfinite(trainer.callback_metrics["train/history_loss"])
    state = module.model.state_dict()
    assert torch.equal(state["history_thresholds"], torch.tensor(table, dtype=torch.float32))
    # The table is not a hyperparameter: a module rebuilt from the hyperparameters gets it back with the weights.
    assert "history_thresholds" not in module.hparams
    rebuilt = PretrainModule(**module.hparams)
    assert not rebuilt.model.history_thresholds_ready()
    rebuilt.load_state_dict(module.state_dict())
    assert rebuilt.model.history_thresholds_ready()
    assert torch.equal(rebuilt.model.history_thresholds, state["history_thresholds"])


def test_fit_without_thresholds_fails(cache):
    cache_dir, preprocessor = cache
    pretrain = asdict(PretrainConfig(batch_size=4, max_epochs=1, beta_warmup_steps=0))
    module = PretrainModule(asdict(QUANTILE), pretrain, preprocessor.to_dict())
    with pytest.raises(ValueError, match="missing per-code history thresholds"):
        fit_two_batches(module, cache_dir, DATA.max_sets, batch_size=4)


def test_forward_needs_thresholds_until_loaded(cache):
    cache_dir, preprocessor = cache
    batch = SetSequenceDataset(SplitCache(cache_dir, "train"), DATA.max_sets, labelled=False).collate([0, 1, 2])
    trained = SeqSetVAE(QUANTILE, preprocessor.vocab_size)
    trained.set_history_thresholds(torch.tensor(quantile_thresholds(QUANTILE, cache_dir, preprocessor.vocab_size)))
    fresh = SeqSetVAE(QUANTILE, preprocessor.vocab_size)
    with pytest.raises(ValueError, match="missing per-code history thresholds"):
        fresh(batch, beta=0.5, free_bits=0.0)
    fresh.load_state_dict(trained.state_dict())
    assert torch.isfinite(fresh(batch, beta=0.5, free_bits=0.0)["recon_history"])
