"""Ablations of the pretraining model and the feature definition on one split.

Each run pretrains a SeqSetVAE with a plain single-process Lightning Trainer
(no Ray, so that runs are cheap to repeat), encodes every labelled split once
and fits logistic regression probes on several feature definitions:

    last:       [mu, std] of the posterior at the prediction time (the product's features)
    last_mu:    mu only at the prediction time
    pooled:     [mu, std] averaged over the valid sets up to the prediction time

A probe is an L2-regularised logistic regression on standardised features whose
strength is chosen on the tuning split by AUPRC. It is a fast stand-in for the
focal-loss sweep of `seqsetvae tune`; both are linear in the features. With
`--baseline` the run also scores the gradient-boosting baseline of
`seqsetvae report` and two logistic regressions on the same summary features,
one of them with decile-threshold indicators of each summary.

    OMP_NUM_THREADS=1 python -m benchmarks.ablations --data MEDS_DIR --out runs/ablations \\
        --name history --set max_epochs=12 --set history_weight=1

Every `--set key=value` goes to the DataConfig, ModelConfig or PretrainConfig
field of that name. Results are appended to OUT/results.jsonl, one line per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from seqsetvae.cache import SplitCache, ensure_cache, fit_preprocessor
from seqsetvae.config import DataConfig, ModelConfig, PretrainConfig, from_dict
from seqsetvae.data import SetSequenceDataModule, SetSequenceDataset, make_loader
from seqsetvae.errors import UserInputError
from seqsetvae.lit import PretrainModule
from seqsetvae.pretrain import EpochProgress, quantile_thresholds
from seqsetvae.report.baseline import fit_baseline, read_split_events, summary_features
from seqsetvae.report.build import cache_label_rows

logger = logging.getLogger(__name__)

PROBE_STRENGTHS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
LABELLED_SPLITS = ("train", "tuning", "held_out")
# The report's default. PhysioNet 2012 has 46 codes, so every code is kept either way.
BASELINE_MAX_CODES = 500
THRESHOLD_QUANTILES = np.linspace(0.1, 0.9, 9)


def parse_overrides(pairs: list[str]) -> dict[str, dict]:
    """Sort `key=value` pairs into data, model and pretrain config dicts, parsing each value as YAML."""
    owners = {
        "data": {f.name for f in dataclasses.fields(DataConfig)},
        "model": {f.name for f in dataclasses.fields(ModelConfig)},
        "pretrain": {f.name for f in dataclasses.fields(PretrainConfig)},
    }
    sorted_overrides: dict[str, dict] = {name: {} for name in owners}
    for pair in pairs:
        key, _, text = pair.partition("=")
        matches = [name for name, fields in owners.items() if key in fields]
        if not matches:
            raise SystemExit(
                f"invalid --set {pair}: no config field named {key!r}; use a field of DataConfig, ModelConfig or PretrainConfig"
            )
        sorted_overrides[matches[0]][key] = yaml.safe_load(text)
    return sorted_overrides


@torch.no_grad()
def encode_split(model, cache: SplitCache, max_sets: int) -> dict[str, np.ndarray]:
    """Return the feature variants [n, *] of every label of `cache`, in label order."""
    model.eval()
    loader = make_loader(SetSequenceDataset(cache, max_sets, labelled=True), 256, shuffle=False)
    parts: dict[str, list[np.ndarray]] = {"last": [], "last_mu": [], "pooled": []}
    for batch in loader:
        posterior = model.encode(batch)
        last = model.features_of(posterior, batch["set_mask"])
        weights = batch["set_mask"].float()[..., None]  # [B, S, 1]
        std = torch.exp(0.5 * posterior["post_logvar"])
        count = weights.sum(1).clamp(min=1)
        pooled = torch.cat([(posterior["post_mu"] * weights).sum(1), (std * weights).sum(1)], -1) / count
        parts["last"].append(last.numpy())
        parts["last_mu"].append(last[:, : model.config.latent_dim].numpy())
        parts["pooled"].append(pooled.numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def probe(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], seed: int) -> dict:
    """Fit a logistic regression on train, pick its strength on tuning AUPRC, score tuning and held_out."""
    best = None
    for strength in PROBE_STRENGTHS:
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=strength, max_iter=2000, random_state=seed))
        classifier.fit(features["train"], labels["train"])
        tuning_auprc = average_precision_score(labels["tuning"], classifier.predict_proba(features["tuning"])[:, 1])
        if best is None or tuning_auprc > best[0]:
            best = (tuning_auprc, strength, classifier)
    _, strength, classifier = best
    scores = {"C": strength}
    for split in ("tuning", "held_out"):
        probability = classifier.predict_proba(features[split])[:, 1]
        scores[f"{split}_auroc"] = round(float(roc_auc_score(labels[split], probability)), 4)
        scores[f"{split}_auprc"] = round(float(average_precision_score(labels[split], probability)), 4)
    return scores


@torch.no_grad()
def probe_variants(model, caches: dict[str, SplitCache], max_sets: int, seed: int, variants=None) -> dict[str, dict]:
    """Encode the labelled splits once and return the probe scores of each feature variant (all by default)."""
    encoded = {split: encode_split(model, cache, max_sets) for split, cache in caches.items()}
    labels = {split: np.asarray(cache.labels["value"], dtype=bool) for split, cache in caches.items()}
    return {
        variant: probe({split: encoded[split][variant] for split in LABELLED_SPLITS}, labels, seed)
        for variant in variants or encoded["train"]
    }


def baseline_scores(meds_root: Path, caches: dict[str, SplitCache], seed: int) -> dict:
    """Score the report's gradient-boosting baseline and two logistic regressions on the same summaries.

    All fit on train and score tuning and held_out. The logistic regressions
    get each summary column with its missing values filled by the train mean,
    plus one missing-value indicator per column, and their strength is chosen
    on tuning AUPRC as for the probes. The second also gets the decile
    indicators of `threshold_features`.
    """
    rows = {split: cache_label_rows(cache) for split, cache in caches.items()}
    events = {split: read_split_events(meds_root, split) for split in caches}
    baseline = fit_baseline(events["train"], rows["train"], max_codes=BASELINE_MAX_CODES, seed=seed)
    scores: dict[str, dict] = {"gradient_boosting": {}}
    for split in ("tuning", "held_out"):
        probability = baseline.predict(events[split], rows[split])
        scores["gradient_boosting"][f"{split}_auroc"] = round(float(roc_auc_score(rows[split].label, probability)), 4)
        scores["gradient_boosting"][f"{split}_auprc"] = round(
            float(average_precision_score(rows[split].label, probability)), 4
        )

    summaries = {split: summary_features(events[split], rows[split], baseline.codes)[baseline.columns] for split in rows}
    train_means = summaries["train"].mean()
    features = {
        split: np.hstack([table.fillna(train_means).to_numpy(), table.isna().to_numpy(dtype=float)])
        for split, table in summaries.items()
    }
    labels = {split: rows[split].label for split in rows}
    scores["logistic_regression"] = probe(features, labels, seed)
    scores["logistic_regression_thresholds"] = probe(threshold_features(summaries, features), labels, seed)
    return scores


def threshold_features(summaries: dict[str, pd.DataFrame], features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Append to `features` one indicator per summary column and train decile: the column lies above it.

    A linear model on these indicators fits a step function of each summary,
    which is what the history decoder's threshold targets offer a linear head.
    A missing summary is above no decile.
    """
    deciles = np.nanquantile(summaries["train"].to_numpy(dtype=float), THRESHOLD_QUANTILES, axis=0)  # [9, C]
    result = {}
    for split, table in summaries.items():
        values = table.to_numpy(dtype=float)[None]  # [1, N, C]
        with np.errstate(invalid="ignore"):
            above = (values > deciles[:, None, :]).transpose(1, 0, 2).reshape(len(table), -1)  # [N, 9 * C]
        result[split] = np.hstack([features[split], above.astype(float)])
    return result


class ProbeEveryEpochs(pl.Callback):
    """Probe the product's features every `every` epochs, to see how they improve with pretraining length."""

    def __init__(self, every: int, caches: dict[str, SplitCache], max_sets: int, seed: int) -> None:
        self.every, self.caches, self.max_sets, self.seed = every, caches, max_sets, seed
        self.history: list[dict] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every and epoch != trainer.max_epochs:
            return
        encoded = {split: encode_split(pl_module.model, cache, self.max_sets) for split, cache in self.caches.items()}
        labels = {split: np.asarray(cache.labels["value"], dtype=bool) for split, cache in self.caches.items()}
        scores = probe({split: encoded[split]["last"] for split in encoded}, labels, self.seed)
        self.history.append({"epoch": epoch, **scores})
        logger.info("Epoch %d probe: %s", epoch, scores)
        pl_module.model.train()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="MEDS directory with train, tuning and held_out")
    parser.add_argument("--out", required=True, type=Path, help="directory for the cache and results.jsonl")
    parser.add_argument("--name", required=True, help="name of this run in results.jsonl")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--baseline", action="store_true", help="also score the gradient-boosting baseline and a logistic regression on its features")
    parser.add_argument("--baseline-only", action="store_true", help="score the baselines and skip pretraining")
    parser.add_argument("--probe-every", type=int, default=0, help="also probe every N epochs (0: only at the end)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    overrides = parse_overrides(args.set)
    try:
        data_config = from_dict(DataConfig, overrides["data"], "--set")
        model_config = from_dict(ModelConfig, overrides["model"], "--set")
        pretrain_config = from_dict(PretrainConfig, overrides["pretrain"], "--set")
    except UserInputError as error:
        message = str(error)
        raise SystemExit(message if message.startswith("--set") else f"--set: {message}") from None
    pl.seed_everything(pretrain_config.seed, workers=True, verbose=False)

    preprocessor = fit_preprocessor(args.data, data_config)
    cache_dir = args.out / "cache" / data_config.task
    ensure_cache(args.data, cache_dir, data_config, preprocessor, need_labels=True)
    caches = {split: SplitCache(cache_dir, split, task=data_config.task) for split in LABELLED_SPLITS}

    result: dict = {"name": args.name, "overrides": overrides}
    if args.baseline or args.baseline_only:
        result["baseline"] = baseline_scores(args.data, caches, pretrain_config.seed)
        logger.info("Baselines: %s", result["baseline"])
    if args.baseline_only:
        write_result(args.out, result)
        return

    module = PretrainModule(
        dataclasses.asdict(model_config),
        dataclasses.asdict(pretrain_config),
        preprocessor.to_dict(),
        history_thresholds=quantile_thresholds(model_config, cache_dir, preprocessor.vocab_size),
    )
    datamodule = SetSequenceDataModule(
        cache_dir,
        max_sets=data_config.max_sets,
        batch_size=pretrain_config.batch_size,
        train_split=pretrain_config.train_splits(),
        seed=pretrain_config.seed,
        group_by_length=pretrain_config.group_by_length,
    )
    probes = ProbeEveryEpochs(args.probe_every, caches, data_config.max_sets, pretrain_config.seed) if args.probe_every else None
    trainer = pl.Trainer(
        max_epochs=pretrain_config.max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        precision=pretrain_config.precision,
        callbacks=[EpochProgress()] + ([probes] if probes else []),
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    result["pretrain_seconds"] = round(time.perf_counter() - started, 1)
    result["probe_history"] = probes.history if probes else []
    result["val"] = {key: round(float(value), 4) for key, value in trainer.callback_metrics.items()}

    result["probes"] = probe_variants(module.model, caches, data_config.max_sets, pretrain_config.seed)
    for variant, scores in result["probes"].items():
        logger.info("Probe %s: %s", variant, scores)

    write_result(args.out, result)


def write_result(out: Path, result: dict) -> None:
    """Append one run's result to OUT/results.jsonl and print it."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as handle:
        handle.write(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
