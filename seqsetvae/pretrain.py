"""Distributed pretraining with Ray Train's TorchTrainer and Lightning DDP."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer
from ray.train.torch import TorchConfig, TorchTrainer

from seqsetvae import meds_io
from seqsetvae.cache import TRAINING_SPLITS, ensure_cache, fit_preprocessor, value_quantiles
from seqsetvae.callbacks import EXIT_AT_STEP_ENV, EpochHistory, ExitAtStep, history_of_checkpoint
from seqsetvae.checkpoint import load_weights_only, strip_wrapper_prefixes
from seqsetvae.config import DataConfig, ModelConfig, PretrainConfig
from seqsetvae.data import SetSequenceDataModule
from seqsetvae.lit import PretrainModule
from seqsetvae.losses import history_quantile_levels
from seqsetvae.preprocess import Preprocessor
from seqsetvae.ray_utils import cpus_per_worker, ddp_backend, init_ray, lightning_accelerator, worker_resources
from seqsetvae.storage import resolve_storage
from seqsetvae.training_log import TENSORBOARD_DIR, tensorboard_logger

logger = logging.getLogger(__name__)

PRETRAINED_FILE = "pretrained.pt"
METRICS_FILE = "pretrain_metrics.csv"


class EpochProgress(pl.Callback):
    """Logs one line per epoch on rank zero: epoch, losses and wall time."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        metrics = trainer.callback_metrics
        parts = [f"{key}={metrics[key].item():.4f}" for key in ("train/loss", "val/loss", "val/active_units") if key in metrics]
        logger.info(
            "Pretraining epoch %d/%d done: %s (%.0f s)",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            ", ".join(parts),
            time.monotonic() - self._start,
        )


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: one Lightning DDP process."""
    logging.basicConfig(level=logging.INFO if ray.train.get_context().get_world_rank() == 0 else logging.WARNING)
    train_config = PretrainConfig(**loop_config["pretrain_config"])
    data_config = DataConfig(**loop_config["data_config"])
    pl.seed_everything(train_config.seed, workers=True, verbose=False)

    module = PretrainModule(
        loop_config["model_config"],
        loop_config["pretrain_config"],
        loop_config["preprocessing"],
        history_thresholds=loop_config["history_thresholds"],
    )
    datamodule = SetSequenceDataModule(
        loop_config["cache_dir"],
        max_sets=data_config.max_sets,
        batch_size=train_config.batch_size,
        train_split=train_config.train_splits(),
        num_workers=train_config.dataloader_workers,
        seed=train_config.seed,
        pin_memory=train_config.use_gpu,
        group_by_length=train_config.group_by_length,
    )
    # EpochHistory must run before RayTrainReportCallback saves the checkpoint it lives in.
    callbacks = [EpochHistory(), RayTrainReportCallback(), EpochProgress()]
    if loop_config.get("test_exit_at_step") is not None:
        callbacks.append(ExitAtStep(loop_config["test_exit_at_step"], loop_config["test_exit_marker"]))
    trainer = pl.Trainer(
        max_epochs=train_config.max_epochs,
        accelerator=lightning_accelerator(train_config.use_gpu),
        devices="auto",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        callbacks=callbacks,
        # The data module shards the data so that every rank runs the same number of batches.
        use_distributed_sampler=False,
        precision=train_config.precision,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        # Lightning writes the event files from rank 0 only.
        logger=tensorboard_logger(loop_config["tensorboard_dir"]),
        log_every_n_steps=train_config.log_every_n_steps,
        gradient_clip_val=1.0,
    )
    trainer = prepare_trainer(trainer)

    # A restarted worker group, or a run started again with the same name,
    # continues from the latest reported checkpoint.
    checkpoint = ray.train.get_checkpoint()
    ckpt_path = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            ckpt_path = str(Path(directory) / RayTrainReportCallback.CHECKPOINT_NAME)
            logger.info("Resuming pretraining from the latest checkpoint")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            return
    trainer.fit(module, datamodule=datamodule)


@dataclass
class PretrainResult:
    pretrained_path: str
    best_checkpoint: str
    best_val_loss: float
    epochs: int
    cache_dir: str
    wall_seconds: float


def run_pretraining(
    meds_root: str | Path,
    out_dir: str | Path,
    data_config: DataConfig,
    model_config: ModelConfig,
    train_config: PretrainConfig,
    cache_dir: str | Path | None = None,
    storage: str | None = None,
    address: str | None = None,
    preprocessor: Preprocessor | None = None,
) -> PretrainResult:
    """Fit preprocessing on the train split, build the cache, pretrain with Ray Train, export the best weights.

    Writes `<out_dir>/pretrained.pt` (weights and hyperparameters, loadable with
    `weights_only=True`) and keeps Ray Train's checkpoints under the storage path.
    """
    start = time.monotonic()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir).resolve() if cache_dir else out / "cache"

    if preprocessor is None:
        logger.info("Fitting preprocessing on the train split")
        preprocessor = fit_preprocessor(meds_root, data_config)
    ensure_cache(meds_root, cache, data_config, preprocessor, required=TRAINING_SPLITS)

    init_ray(address)
    loop_config = {
        "cache_dir": str(cache),
        "data_config": asdict(data_config),
        "model_config": asdict(model_config),
        "pretrain_config": asdict(train_config),
        "preprocessing": preprocessor.to_dict(),
        "history_thresholds": quantile_thresholds(model_config, cache, preprocessor.vocab_size),
        # NOTE: rank 0 writes here, so on several nodes this path must be on a filesystem every node mounts.
        "tensorboard_dir": str(out / TENSORBOARD_DIR),
    }
    if os.environ.get(EXIT_AT_STEP_ENV):
        loop_config["test_exit_at_step"] = int(os.environ[EXIT_AT_STEP_ENV])
        loop_config["test_exit_marker"] = str(out / f".{EXIT_AT_STEP_ENV.lower()}-done")
        logger.warning("%s is set: a training worker will exit at step %s", EXIT_AT_STEP_ENV, os.environ[EXIT_AT_STEP_ENV])
    storage_path = resolve_storage(storage, out / "ray_results")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=ddp_backend(train_config.use_gpu)),
        scaling_config=ScalingConfig(
            num_workers=train_config.num_workers,
            use_gpu=train_config.use_gpu,
            resources_per_worker=worker_resources(
                train_config.use_gpu,
                cpus_per_worker(train_config.cpus_per_worker, train_config.num_workers, train_config.use_gpu),
            ),
        ),
        run_config=RunConfig(
            name=train_config.run_name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val/loss", checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=train_config.max_failures),
        ),
    )
    if "tuning" in train_config.train_splits():
        logger.warning(
            "Pretraining trains on the tuning split, which is also its validation split: val/loss, which picks "
            "the exported checkpoint, is measured on trained-on events"
        )
    logger.info(
        "Pretraining on the events of %s, %d Ray Train worker(s), %s, for %d epochs",
        " and ".join(train_config.train_splits()),
        train_config.num_workers,
        "GPU" if train_config.use_gpu else "CPU",
        train_config.max_epochs,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    best = result.get_best_checkpoint(metric="val/loss", mode="min") or result.checkpoint
    if best is None:
        raise RuntimeError("pretraining finished without a checkpoint; check the Ray Train logs above")

    best_metrics = _metrics_of(result, best)
    pretrained_path = out / PRETRAINED_FILE
    with best.as_directory() as directory:
        export_pretrained(Path(directory) / RayTrainReportCallback.CHECKPOINT_NAME, pretrained_path)
    # Ray keeps the metrics of the kept checkpoints only; the latest checkpoint carries every epoch.
    with result.checkpoint.as_directory() as directory:
        history = history_of_checkpoint(load_weights_only(Path(directory) / RayTrainReportCallback.CHECKPOINT_NAME))
    pd.DataFrame(history).to_csv(out / METRICS_FILE, index=False)
    return PretrainResult(
        pretrained_path=str(pretrained_path),
        best_checkpoint=str(best.path),
        best_val_loss=float(best_metrics.get("val/loss", float("nan"))),
        epochs=int(best_metrics.get("epoch", -1)) + 1,
        cache_dir=str(cache),
        wall_seconds=time.monotonic() - start,
    )


def quantile_thresholds(model_config: ModelConfig, cache_dir: str | Path, vocab_size: int) -> list[list[float]] | None:
    """Return each code's history thresholds [V][T] for the `quantile` spacing, else None.

    The thresholds are the quantiles k / (T + 1) of the code's normalised values
    in the cached train split. Codes without a value there get 0, and their
    threshold targets are masked out.
    """
    if not model_config.history_thresholds or model_config.history_threshold_spacing != "quantile":
        return None
    levels = history_quantile_levels(model_config.history_thresholds)
    table = value_quantiles(cache_dir, meds_io.meds.train_split, vocab_size, levels)
    logger.info("Placed %d history thresholds at each code's train quantiles", len(levels))
    return np.nan_to_num(table, nan=0.0).tolist()


def _metrics_of(result, checkpoint) -> dict:
    for candidate, metrics in result.best_checkpoints:
        if candidate.path == checkpoint.path:
            return metrics
    return result.metrics or {}


def export_pretrained(lightning_ckpt: str | Path, destination: str | Path) -> None:
    """Write the model weights and hyperparameters of a pretraining checkpoint as a weights-only file.

    The file is written to a temporary name and renamed, so a crash leaves any
    previous file in place.
    """
    content = load_weights_only(lightning_ckpt)
    state = {strip_wrapper_prefixes(key): value for key, value in content["state_dict"].items()}
    payload = {"state_dict": state, "hyper_parameters": dict(content["hyper_parameters"])}
    destination = Path(destination)
    temporary = destination.with_name(destination.name + ".tmp")
    torch.save(payload, temporary)
    temporary.replace(destination)
