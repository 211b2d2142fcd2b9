"""Sweep the head on the frozen encoder with Ray Tune and a seeded Optuna search.

The encoder is frozen and in eval mode, so its `[mu, std]` features are the
same for every trial. They are computed once per split, put in Ray's object
store with `tune.with_parameters`, and every trial trains only the linear head.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from seqsetvae.cache import SplitCache, ensure_cache
from seqsetvae.config import DataConfig, FinetuneConfig, TuneConfig
from seqsetvae.encoder import compute_features, load_features, load_pretrained_encoder, save_features
from seqsetvae.errors import UserInputError
from seqsetvae.head import save_head, train_head
from seqsetvae.ray_utils import init_ray
from seqsetvae.storage import resolve_storage
from seqsetvae.sweep_record import PARAMS_FILE, finish_record, start_record
from tune.search_space import default_point, search_space

logger = logging.getLogger(__name__)

METRIC = "val/auprc"
# Ranks the trials when the tuning labels have one class and val/auprc is undefined.
FALLBACK_METRIC = "val/loss"
EXPERIMENT_NAME = "sweep"
SWEEP_INFO_FILE = "sweep.json"
# Seconds between saves of the sweep state that `--resume` reads. Tune's own default is 10 s or more,
# and a trial that finished after the last save runs again on resume.
STATE_SAVE_SECONDS = "1"


class ReportToTune(pl.Callback):
    """Lightning callback that reports validation metrics to Tune after every epoch, with the kept heads.

    With `trial_epoch="last"` the checkpoint is the head after the final epoch.
    With `"best"` a checkpoint follows every epoch at which `metric` improves.
    """

    def __init__(self, params: dict[str, Any], metric: str = METRIC, mode: str = "max", trial_epoch: str = "last"):
        self.params = params
        self.metric = metric
        self.trial_epoch = trial_epoch
        # Scores are compared as "higher is better".
        self.sign = 1.0 if mode == "max" else -1.0
        self.best = -np.inf

    def keep(self, trainer: pl.Trainer, metrics: dict[str, float]) -> bool:
        """Return whether this epoch's head is saved as a checkpoint, recording a new best score."""
        if self.trial_epoch == "last":
            return trainer.current_epoch == trainer.max_epochs - 1
        score = self.sign * metrics.get(self.metric, float("nan"))
        if not np.isfinite(score) or score <= self.best:
            return False
        self.best = score
        return True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        metrics["epoch"] = trainer.current_epoch
        if not self.keep(trainer, metrics):
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_head(pl_module, directory)
            Path(directory, PARAMS_FILE).write_text(json.dumps({"params": self.params, "metrics": metrics}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def head_trial(
    config: dict[str, Any],
    train: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    base_config: dict[str, Any],
    model_config: dict,
    preprocessing: dict,
    metric: str = METRIC,
    mode: str = "max",
    trial_epoch: str = "last",
) -> None:
    """Train one head, as a Tune trial, with the sampled settings on the shared features.

    A trial that was running when its sweep stopped starts again from its first epoch on resume.
    """
    if tune.get_checkpoint() is not None:
        logger.info("Restarting an interrupted trial from its first epoch")
    finetune_config = FinetuneConfig(**{**base_config, **config})
    callbacks = [ReportToTune(config, metric, mode, trial_epoch)]
    train_head(train, val, finetune_config, model_config, preprocessing, callbacks=callbacks)


@dataclass
class SweepResult:
    """The best trial; val_auprc and val_auroc are None when the tuning labels have one class."""

    best_params: dict[str, Any]
    val_auprc: float | None
    val_auroc: float | None
    best_dir: str
    n_trials: int
    wall_seconds: float


def encode_splits(
    pretrained_ckpt: str | Path,
    meds_root: str | Path,
    cache_dir: Path,
    feature_dir: Path,
    data_config: DataConfig,
    splits: tuple[str, ...],
) -> tuple[Any, dict[str, dict[str, np.ndarray]]]:
    """Encode the labels of `splits` once with the frozen encoder, reusing features already written."""
    encoder = load_pretrained_encoder(pretrained_ckpt)
    ensure_cache(meds_root, cache_dir, data_config, encoder.preprocessor, required=splits, need_labels=True)
    # Features depend on the weights and on the cached inputs, so both name the file.
    ckpt_stat = Path(pretrained_ckpt).stat()
    features = {}
    for split in splits:
        signature = json.dumps(
            [str(Path(pretrained_ckpt).resolve()), ckpt_stat.st_size, ckpt_stat.st_mtime_ns,
             json.loads((cache_dir / split / "signature.json").read_text())],
            sort_keys=True,
        )
        path = feature_dir / f"{split}-{hashlib.sha256(signature.encode()).hexdigest()[:12]}.npz"
        if path.is_file():
            try:
                features[split] = load_features(path)
                continue
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
                # The features are a cache of the encoder's output, so a damaged file is computed again.
                logger.warning("Computing the features of split '%s' again: %s is unreadable (%s)", split, path, error)
        cache = SplitCache(cache_dir, split, task=data_config.task)
        features[split] = compute_features(encoder.model, cache, data_config.max_sets)
        save_features(features[split], path)
    return encoder, features


def run_sweep(
    meds_root: str | Path,
    pretrained_ckpt: str | Path,
    out_dir: str | Path,
    data_config: DataConfig,
    finetune_config: FinetuneConfig,
    tune_config: TuneConfig,
    cache_dir: str | Path | None = None,
    storage: str | None = None,
    address: str | None = None,
    resume: bool = False,
) -> SweepResult:
    """Run (or resume) the sweep and copy the best head checkpoint to `<out_dir>/best/`."""
    start = time.monotonic()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage_path = resolve_storage(storage, out / "ray_results")
    experiment_path = f"{storage_path.rstrip('/')}/{EXPERIMENT_NAME}"
    if resume and not tune.Tuner.can_restore(experiment_path):
        raise UserInputError(f"{experiment_path}: no sweep to resume; run `seqsetvae tune` without --resume first")

    cache = Path(cache_dir).resolve() if cache_dir else out / "cache"
    encoder, features = encode_splits(
        pretrained_ckpt, meds_root, cache, out / "features", data_config, ("train", "tuning")
    )
    metric, mode = selection_metric(features["tuning"]["label"])
    # Tune reads this when the tuner starts; a value the user set wins.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_SAVE_SECONDS)
    init_ray(address)
    trainable = tune.with_resources(
        tune.with_parameters(
            head_trial,
            train=features["train"],
            val=features["tuning"],
            base_config=asdict(finetune_config),
            model_config=encoder.model_config,
            preprocessing=encoder.preprocessing,
            metric=metric,
            mode=mode,
            trial_epoch=tune_config.trial_epoch,
        ),
        {"cpu": tune_config.cpus_per_trial},
    )
    if resume:
        # Tune restores the Optuna searcher and every trial's state; finished trials are not run again.
        logger.info("Resuming sweep from %s", experiment_path)
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(trainable, finetune_config, tune_config, storage_path, metric, mode)
    # The record and the encoder copy let `seqsetvae best` export from the storage alone.
    start_record(experiment_path, pretrained_ckpt, data_config, finetune_config, METRIC)
    logger.info("Sweeping %d trials, %d at a time", tune_config.num_samples, tune_config.max_concurrent_trials)
    results = tuner.fit()

    checkpoint = _best_checkpoint(results, metric, mode, tune_config.trial_epoch)
    if checkpoint is None:
        raise RuntimeError(f"no trial kept a head with a finite {metric}; check the trial errors in {experiment_path}")
    best_dir = out / "best"
    with checkpoint.as_directory() as directory:
        _replace_tree(Path(directory), best_dir)
    saved = json.loads((best_dir / PARAMS_FILE).read_text())
    finish_record(experiment_path, checkpoint.path, saved, len(results))
    _write_trial_table(results, out / "trials.csv", tune_config.trial_epoch)
    summary = SweepResult(
        best_params={**asdict(finetune_config), **saved["params"]},
        val_auprc=_finite_or_none(saved["metrics"].get(METRIC)),
        val_auroc=_finite_or_none(saved["metrics"].get("val/auroc")),
        best_dir=str(best_dir),
        n_trials=len(results),
        wall_seconds=time.monotonic() - start,
    )
    (out / SWEEP_INFO_FILE).write_text(
        json.dumps(
            {**asdict(summary), "pretrained_ckpt": str(Path(pretrained_ckpt).resolve()), "experiment": experiment_path},
            indent=2,
        )
    )
    return summary


def selection_metric(tuning_labels: np.ndarray) -> tuple[str, str]:
    """Return the metric and mode that rank the trials: val/auprc, or val/loss when the labels have one class."""
    n_positive = int(np.sum(tuning_labels))
    if 0 < n_positive < len(tuning_labels):
        return METRIC, "max"
    logger.warning(
        "All %d tuning labels are %s, so %s is undefined; trials are ranked by the lowest %s instead",
        len(tuning_labels),
        "positive" if n_positive else "negative",
        METRIC,
        FALLBACK_METRIC,
    )
    return FALLBACK_METRIC, "min"


def _finite_or_none(value: float | None) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _new_tuner(
    trainable, finetune_config: FinetuneConfig, tune_config: TuneConfig, storage_path: str, metric: str, mode: str
) -> tune.Tuner:
    searcher = OptunaSearch(seed=tune_config.search_seed, points_to_evaluate=[default_point(asdict(finetune_config))])
    return tune.Tuner(
        trainable,
        param_space=search_space(),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=searcher,
            num_samples=tune_config.num_samples,
            max_concurrent_trials=tune_config.max_concurrent_trials,
            # A trial trains one linear layer for seconds, and a fresh actor per trial would first spend about
            # 5 CPU seconds importing torch and Lightning (measured on a 2-core AMD EPYC).
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT_NAME,
            storage_path=storage_path,
            # Every checkpoint is kept. One contains a linear layer of a few kilobytes, and a checkpoint
            # deleted after the last state save would make its trial fail on `--resume`.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=None, checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
            verbose=0,
        ),
    )


def _replace_tree(source: Path, target: Path) -> None:
    staging = target.with_name(target.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(source, staging)
    if target.exists():
        shutil.rmtree(target)
    staging.replace(target)


def _trial_number(result) -> int | None:
    """Return the trial's index in the order the searcher suggested it, counted from 1.

    Tune names each trial directory `<trainable>_<trial_id>_<index>_<parameters>_<date>`.
    """
    trial_id = (result.metrics or {}).get("trial_id")
    name = PurePosixPath(str(result.path)).name
    match = re.match(rf"{head_trial.__name__}_{re.escape(trial_id)}_(\d+)_", name) if trial_id else None
    if match is None:
        logger.warning("Trial directory %s does not carry a trial number", name)
        return None
    return int(match.group(1))


def _kept_value(history: pd.DataFrame | None, metric: str, mode: str, trial_epoch: str) -> float:
    """Return `metric` at the epoch a trial keeps (its last, or its best by `mode`), or NaN when it has none."""
    if history is None or metric not in history or not len(history):
        return float("nan")
    values = history[metric]
    if trial_epoch == "last":
        return float(values.iloc[-1])
    return float(values.max() if mode == "max" else values.min())


def _best_checkpoint(results, metric: str, mode: str, trial_epoch: str):
    """Return the head checkpoint of the trial whose kept epoch scores best, or None when no trial kept one.

    Ray's own ranking would also consider a trial that failed before its last
    epoch, which kept no head when `trial_epoch` is `last`.
    """
    sign = 1.0 if mode == "max" else -1.0
    best, best_score = None, -np.inf
    for result in results:
        if trial_epoch == "last":
            checkpoint = result.checkpoint if result.error is None else None
        else:
            # Ray raises here for a trial that never reported a checkpoint.
            checkpoint = result.get_best_checkpoint(metric=metric, mode=mode) if result.best_checkpoints else None
        score = sign * _kept_value(result.metrics_dataframe, metric, mode, trial_epoch)
        if checkpoint is not None and np.isfinite(score) and score > best_score:
            best, best_score = checkpoint, score
    return best


def _write_trial_table(results, path: Path, trial_epoch: str = "last") -> None:
    """Write one row per trial, whose `val_auprc` is the tuning AUPRC of the epoch the trial keeps."""
    rows = []
    for result in results:
        row = {"trial_number": _trial_number(result), "trial_id": (result.metrics or {}).get("trial_id")}
        row.update({f"config/{k}": v for k, v in (result.config or {}).items()})
        history = result.metrics_dataframe
        value = _kept_value(history, METRIC, "max", trial_epoch)
        # A trial restarted on resume reports its epochs again, so epochs are counted once each.
        epochs = int(history["epoch"].nunique()) if history is not None and "epoch" in history else 0
        row.update({"val_auprc": value, "epochs": epochs})
        row["status"] = "ERROR" if result.error else "TERMINATED"
        rows.append(row)
    table = pd.DataFrame(rows).astype({"trial_number": "Int64"})
    table.sort_values("val_auprc", ascending=False).to_csv(path, index=False)
