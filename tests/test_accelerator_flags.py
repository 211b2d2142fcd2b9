"""bf16 autocast and torch.compile in a real Lightning fit of the pretraining module on CPU."""

from __future__ import annotations

from dataclasses import asdict

import lightning.pytorch as pl
import pytest
import torch

from seqsetvae.cache import ensure_cache, fit_preprocessor
from seqsetvae.config import DataConfig, ModelConfig, PretrainConfig
from seqsetvae.data import SetSequenceDataModule
from seqsetvae.lit import PretrainModule
from seqsetvae.model.core import SeqSetVAE

from conftest import fit_two_batches

DATA = DataConfig(max_sets=8, max_events_per_set=8)
MODEL = ModelConfig(d_model=16, latent_dim=4, n_inducing=2, n_heads=2, n_set_layers=1, n_seq_layers=1)


@pytest.fixture(scope="module")
def cache(small_meds, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("flags-cache")
    preprocessor = fit_preprocessor(small_meds, DATA)
    ensure_cache(small_meds, cache_dir, DATA, preprocessor, splits=("train", "tuning"))
    return cache_dir, preprocessor


def fit_tiny(cache, **pretrain_options) -> tuple[PretrainModule, pl.Trainer, dict]:
    """Fit two training batches and one validation batch; return the module, trainer and initial weights."""
    cache_dir, preprocessor = cache
    config = PretrainConfig(batch_size=4, max_epochs=1, beta_warmup_steps=0, **pretrain_options)
    pl.seed_everything(0, verbose=False)
    module = PretrainModule(asdict(MODEL), asdict(config), preprocessor.to_dict())
    before = {key: value.clone() for key, value in module.model.state_dict().items()}
    trainer = fit_two_batches(module, cache_dir, DATA.max_sets, config.batch_size, config.precision)
    return module, trainer, before


def changed_parameters(module: PretrainModule, before: dict) -> int:
    return sum(not torch.equal(value, before[key]) for key, value in module.model.state_dict().items())


def test_bf16_mixed_fit_runs_under_autocast(cache):
    module, trainer, before = fit_tiny(cache, precision="bf16-mixed")
    train_loss = trainer.callback_metrics["train/loss"]
    val_loss = trainer.callback_metrics["val/loss"]

    # Validate again with a hook on the decoder's first layer, to see the dtype autocast gave it.
    decoder_dtypes = []
    module.model.decoder.mlp[0].register_forward_hook(lambda _m, _i, output: decoder_dtypes.append(output.dtype))
    trainer.validate(module, datamodule=trainer.datamodule, verbose=False)

    assert decoder_dtypes
    assert set(decoder_dtypes) == {torch.bfloat16}
    assert torch.isfinite(train_loss)
    assert torch.isfinite(val_loss)
    assert changed_parameters(module, before) > 0


def test_compile_fit_matches_eager_model(cache):
    module, trainer, before = fit_tiny(cache, compile=True)

    assert module.model._compiled_call_impl is not None
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert changed_parameters(module, before) > 0
    assert set(module.model.state_dict()) == set(before)

    # An eager model with the trained weights gives the same loss as the compiled one.
    eager = SeqSetVAE(MODEL, module.model.vocab_size)
    eager.load_state_dict(module.model.state_dict())
    batch = next(iter(trainer.datamodule.val_dataloader()))
    compiled_loss = module.model.eval()(batch, beta=0.5, free_bits=0.05)["loss"]
    eager_loss = eager.eval()(batch, beta=0.5, free_bits=0.05)["loss"]
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pin_memory", [False, True])
def test_data_module_pin_memory(cache, pin_memory):
    cache_dir, _ = cache
    datamodule = SetSequenceDataModule(cache_dir, max_sets=DATA.max_sets, batch_size=4, pin_memory=pin_memory)
    assert datamodule.train_dataloader().pin_memory is pin_memory
    assert datamodule.val_dataloader().pin_memory is pin_memory


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_over_the_run(cache, schedule):
    module, trainer, _ = fit_tiny(cache, lr=1e-3, lr_schedule=schedule)

    final_lr = trainer.optimizers[0].param_groups[0]["lr"]
    if schedule == "constant":
        assert trainer.lr_scheduler_configs == []
        assert final_lr == pytest.approx(1e-3)
    else:
        # Two optimiser steps in all: the half cosine spans both and ends at 0.
        (config,) = trainer.lr_scheduler_configs
        assert config.interval == "step"
        factor = config.scheduler.lr_lambdas[0]
        assert [factor(step) for step in (0, 1, 2, 3)] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-12)
        assert final_lr == pytest.approx(0.0, abs=1e-12)
