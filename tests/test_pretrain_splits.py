"""Pretraining on the events of the train and tuning splits together, under Ray Train."""

from __future__ import annotations

import math

import pandas as pd

from seqsetvae.config import DataConfig, ModelConfig, PretrainConfig
from seqsetvae.pretrain import METRICS_FILE, run_pretraining

DATA = DataConfig(max_sets=8, max_events_per_set=8)
MODEL = ModelConfig(d_model=16, latent_dim=4, n_inducing=2, n_heads=2, n_set_layers=1, n_seq_layers=1)


def test_steps_cover_both_pretraining_splits(ray_local, small_meds, tmp_path):
    # 160 train and 40 tuning subjects.
    subjects = 200
    config = PretrainConfig(
        max_epochs=2,
        batch_size=20,
        beta_warmup_steps=0,
        pretrain_splits="train,tuning",
        lr_schedule="cosine",
        log_every_n_steps=1,
        # Length-grouped batches keep the step count of shuffled ones.
        group_by_length=True,
    )
    result = run_pretraining(small_meds, tmp_path / "out", DATA, MODEL, config)

    metrics = pd.read_csv(tmp_path / "out" / METRICS_FILE)
    steps_per_epoch = math.ceil(subjects / config.batch_size)
    assert metrics["step"].tolist() == [steps_per_epoch, 2 * steps_per_epoch]
    # The cosine spans both epochs: the rate logged at the last step of epoch 1 is above lr / 2, at the end near 0.
    assert metrics["train/lr"].iloc[-1] < 0.05 * config.lr
    assert metrics["train/lr"].iloc[0] > 0.5 * config.lr
    assert result.epochs == 2
