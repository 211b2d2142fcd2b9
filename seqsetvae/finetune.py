"""One finetuning run without a sweep: the frozen encoder and a linear head, with Lightning."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import numpy as np

from seqsetvae.cache import TRAINING_SPLITS, SplitCache, ensure_cache
from seqsetvae.checkpoint import load_weights_only, pretrained_hparams
from seqsetvae.config import DataConfig, FinetuneConfig
from seqsetvae.data import SetSequenceDataModule
from seqsetvae.encoder import PretrainedEncoder, compute_features
from seqsetvae.export import export_model
from seqsetvae.lit import FinetuneModule
from seqsetvae.preprocess import Preprocessor
from seqsetvae.training_log import TENSORBOARD_DIR, tensorboard_logger

logger = logging.getLogger(__name__)


def run_finetune(
    meds_root: str | Path,
    pretrained_ckpt: str | Path,
    out_dir: str | Path,
    data_config: DataConfig,
    finetune_config: FinetuneConfig,
    cache_dir: str | Path | None = None,
) -> dict:
    """Train the head on the frozen encoder, then export the model to `<out_dir>/export`.

    Returns the validation metrics of the last epoch.
    """
    start = time.monotonic()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    content = load_weights_only(pretrained_ckpt)
    hparams = pretrained_hparams(content, str(pretrained_ckpt))
    preprocessor = Preprocessor.from_dict(hparams["preprocessing"])
    cache = Path(cache_dir).resolve() if cache_dir else out / "cache"
    ensure_cache(meds_root, cache, data_config, preprocessor, required=TRAINING_SPLITS, need_labels=True)

    train_labels = SplitCache(cache, "train", task=data_config.task).labels["value"]
    module = FinetuneModule(
        dict(hparams["model_config"]),
        asdict(finetune_config),
        dict(hparams["preprocessing"]),
        prevalence=float(np.mean(train_labels)),
    )
    module.load_encoder_state(content["state_dict"], str(pretrained_ckpt))
    if finetune_config.standardize:
        # One pass over the train split gives the statistics that the head's input is standardised by.
        train_cache = SplitCache(cache, "train", task=data_config.task)
        module.set_feature_scaling(compute_features(module.encoder, train_cache, data_config.max_sets)["features"])
    datamodule = SetSequenceDataModule(
        cache, data_config.max_sets, finetune_config.batch_size, task=data_config.task, seed=finetune_config.seed
    )
    pl.seed_everything(finetune_config.seed, verbose=False)
    trainer = pl.Trainer(
        max_epochs=finetune_config.max_epochs,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        logger=tensorboard_logger(out / TENSORBOARD_DIR),
        # An epoch of the head is only a few batches, so every step is logged.
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    logger.info("Finetuning the head for %d epochs", finetune_config.max_epochs)
    trainer.fit(module, datamodule=datamodule)
    # val/auroc and val/auprc are NaN when the tuning labels have one class; they are written as null.
    metrics = {
        key: float(value) if math.isfinite(float(value)) else None
        for key, value in trainer.callback_metrics.items()
        if key.startswith("val/")
    }
    metrics["wall_seconds"] = time.monotonic() - start

    encoder = PretrainedEncoder(module.encoder, dict(hparams["model_config"]), dict(hparams["preprocessing"]))
    export_model(encoder, module.head_state(), data_config, asdict(finetune_config), metrics, out / "export")
    return metrics
