"""Key mapping, safe loading, freezing, and finetuning that never reaches the decoder."""

from __future__ import annotations

import logging
import pickle
from dataclasses import asdict

import lightning.pytorch as pl
import pytest
import torch

from seqsetvae.cache import ensure_cache, fit_preprocessor
from seqsetvae.checkpoint import load_weights_only, map_encoder_state
from seqsetvae.config import DataConfig, FinetuneConfig, ModelConfig
from seqsetvae.data import SetSequenceDataModule
from seqsetvae.errors import UserInputError
from seqsetvae.lit import FinetuneModule, init_head
from seqsetvae.model.core import SeqSetVAE

TASK = "in_hospital_mortality"
MODEL = ModelConfig(d_model=16, latent_dim=4, n_inducing=4, n_heads=2, n_set_layers=1, n_seq_layers=1)
PREPROCESSING = {"codes": [f"C{i}" for i in range(10)]}


def pretrained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return SeqSetVAE(MODEL, vocab_size=12).state_dict()


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "model.", "module.model."])
def test_mapping_strips_wrapper_prefixes(prefix):
    source = {prefix + key: value for key, value in pretrained_state().items()}
    target = SeqSetVAE(MODEL, vocab_size=12).state_dict()
    mapped = map_encoder_state(source, target, SeqSetVAE.encoder_state_prefixes, "test")
    encoder_keys = [k for k in target if k.startswith(SeqSetVAE.encoder_state_prefixes)]
    assert sorted(mapped) == sorted(encoder_keys)
    assert not any(key.startswith("decoder.") for key in mapped)


def test_mapping_raises_on_missing_encoder_key():
    source = pretrained_state()
    removed = next(key for key in source if key.startswith(SeqSetVAE.encoder_state_prefixes))
    del source[removed]
    target = SeqSetVAE(MODEL, vocab_size=12).state_dict()
    with pytest.raises(UserInputError, match=removed.replace(".", r"\.")):
        map_encoder_state(source, target, SeqSetVAE.encoder_state_prefixes, "test")


def test_mapping_raises_on_wrong_shape():
    source = pretrained_state()
    key = next(k for k in source if k.startswith(SeqSetVAE.encoder_state_prefixes) and source[k].dim() == 2)
    source[key] = torch.zeros(source[key].shape[0] + 1, source[key].shape[1])
    target = SeqSetVAE(MODEL, vocab_size=12).state_dict()
    with pytest.raises(UserInputError, match="wrong shape"):
        map_encoder_state(source, target, SeqSetVAE.encoder_state_prefixes, "test")


def test_mapping_names_skipped_keys(caplog):
    source = {**pretrained_state(), "extra.weight": torch.zeros(1)}
    target = SeqSetVAE(MODEL, vocab_size=12).state_dict()
    with caplog.at_level(logging.INFO, logger="seqsetvae.checkpoint"):
        map_encoder_state(source, target, SeqSetVAE.encoder_state_prefixes, "test")
    assert "Skipped pretrained key extra.weight" in caplog.text
    assert "Mapped" in caplog.text


class _Planted:
    def __reduce__(self):
        return (print, ("planted pickle ran",))


def test_planted_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {}, "payload": _Planted()}, handle)
    with pytest.raises(UserInputError, match="rejected, the file contains objects other than weights"):
        load_weights_only(path)
    assert "planted pickle ran" not in capsys.readouterr().out


def test_truncated_checkpoint_is_clear(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"state_dict": pretrained_state()}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserInputError, match="cut.pt"):
        load_weights_only(path)


@pytest.mark.parametrize("scheme", ["normal", "xavier", "zero_logodds"])
def test_head_initialisation(scheme):
    torch.manual_seed(0)
    head = torch.nn.Linear(200, 1)
    init_head(head, scheme, prevalence=0.2)
    if scheme == "normal":
        assert abs(float(head.weight.std()) - 0.01) < 0.003
    if scheme == "zero_logodds":
        assert float(head.weight.abs().sum()) == 0.0
        assert float(torch.sigmoid(head.bias)) == pytest.approx(0.2, rel=1e-5)
    if scheme == "xavier":
        bound = (6 / 201) ** 0.5
        assert float(head.weight.abs().max()) <= bound


@pytest.fixture(scope="module")
def finetune_setup(small_meds, tmp_path_factory):
    data_config = DataConfig(max_sets=16, max_events_per_set=16)
    preprocessor = fit_preprocessor(small_meds, data_config)
    cache_dir = tmp_path_factory.mktemp("ft-cache")
    ensure_cache(small_meds, cache_dir, data_config, preprocessor)
    return data_config, preprocessor, cache_dir


def make_module(preprocessor) -> FinetuneModule:
    config = FinetuneConfig(max_epochs=2, batch_size=32)
    module = FinetuneModule(asdict(MODEL), asdict(config), preprocessor.to_dict(), prevalence=0.2)
    torch.manual_seed(1)
    state = SeqSetVAE(MODEL, vocab_size=preprocessor.vocab_size).state_dict()
    module.load_encoder_state({"model." + k: v for k, v in state.items()}, "test")
    return module


def test_finetune_freezes_encoder_and_skips_decoder(finetune_setup):
    data_config, preprocessor, cache_dir = finetune_setup
    module = make_module(preprocessor)
    before = {k: v.clone() for k, v in module.encoder.state_dict().items()}

    def decoder_called(*args, **kwargs):
        raise AssertionError("the decoder ran during finetuning")

    module.encoder.decoder.forward = decoder_called
    modes = []

    class RecordMode(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(pl_module.encoder.training)

    datamodule = SetSequenceDataModule(cache_dir, data_config.max_sets, 32, task=TASK)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[RecordMode()],
    )
    trainer.fit(module, datamodule=datamodule)

    assert modes and not any(modes)
    assert all(not p.requires_grad for p in module.encoder.parameters())
    after = module.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    logged = set(trainer.logged_metrics)
    assert {"train/focal_loss", "train/loss", "train/mu_norm", "train/std_mean"} <= logged
    assert {"val/auroc", "val/auprc", "val/accuracy"} <= logged


def test_finetune_features_are_deterministic(finetune_setup):
    data_config, preprocessor, cache_dir = finetune_setup
    module = make_module(preprocessor)
    module.train()
    batch = next(iter(SetSequenceDataModule(cache_dir, data_config.max_sets, 16, task=TASK).val_dataloader()))
    first = module.features(batch)
    second = module.features(batch)
    assert first.shape == (16, 2 * MODEL.latent_dim)
    assert torch.equal(first, second)
