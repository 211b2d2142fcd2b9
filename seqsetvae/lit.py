"""Lightning modules: VAE pretraining, and the linear head on the frozen encoder."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryAveragePrecision

from seqsetvae.checkpoint import map_encoder_state
from seqsetvae.config import FinetuneConfig, ModelConfig, PretrainConfig
from seqsetvae.losses import binary_focal_loss
from seqsetvae.model.core import ACTIVE_UNIT_THRESHOLD, SeqSetVAE

logger = logging.getLogger(__name__)

# A train feature whose std is below this is treated as constant and left unscaled.
FEATURE_SCALE_FLOOR = 1e-8


class PretrainModule(pl.LightningModule):
    """Pretrains the sequence-of-sets VAE on reconstruction + beta * KL.

    Hyperparameters are plain dicts so that checkpoints load with
    `torch.load(weights_only=True)`.
    """

    def __init__(
        self,
        model_config: dict,
        pretrain_config: dict,
        preprocessing: dict,
        history_thresholds: list[list[float]] | None = None,
    ):
        """Build the model and set `history_thresholds` [V][T], the per-code thresholds of the `quantile` spacing.

        They are not a hyperparameter. The model's state dict carries them, so a
        module rebuilt from a checkpoint's hyperparameters gets them back with
        the weights.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["history_thresholds"])
        self.train_config = PretrainConfig(**pretrain_config)
        self.model = SeqSetVAE(ModelConfig(**model_config), vocab_size=len(preprocessing["codes"]) + 2)
        if history_thresholds is not None:
            self.model.set_history_thresholds(torch.tensor(history_thresholds, dtype=torch.float32))
        if self.train_config.compile:
            # nn.Module.compile compiles in place, so parameter names and checkpoints stay unchanged.
            # Batch shapes change from step to step, hence dynamic shapes.
            self.model.compile(dynamic=True)

    def beta(self) -> float:
        """Return the KL weight: linear warm-up from 0 over beta_warmup_steps optimiser steps."""
        warmup = self.train_config.beta_warmup_steps
        fraction = 1.0 if warmup == 0 else min(1.0, self.global_step / warmup)
        return self.train_config.beta * fraction

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        beta = self.beta()
        out = self.model(batch, beta=beta, free_bits=self.train_config.free_bits)
        batch_size = batch["codes"].shape[0]
        self.log("train/loss", out["loss"], batch_size=batch_size, prog_bar=True)
        self.log("train/recon_loss", out["recon"], batch_size=batch_size)
        self.log("train/kl_loss", out["kl_raw"], batch_size=batch_size)
        self.log("train/history_loss", out["recon_history"], batch_size=batch_size)
        self.log("train/beta", beta, batch_size=batch_size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        active = self.model.active_units(out["post_mu"].detach(), batch["set_mask"])
        self.log("train/active_units", active, batch_size=batch_size)
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        self._val_sums = ValidationSums(self.model.config.latent_dim, self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # A rank whose share of the split is smaller than its number of batches gets empty ones.
        if batch["codes"].shape[0] == 0:
            return
        out = self.model(batch, beta=self.train_config.beta, free_bits=self.train_config.free_bits)
        self._val_sums.add(out, batch["set_mask"])

    def on_validation_epoch_end(self) -> None:
        """Log the validation metrics of the whole split, the same on every rank.

        The per-rank sums over sets are added across ranks before the losses
        are formed, so every set of every validation subject counts once and
        the result does not depend on how the split was divided among ranks
        and batches. Free bits apply to the split-mean KL of each dimension.
        """
        sums = self.trainer.strategy.reduce(self._val_sums.values, reduce_op="sum")
        metrics = ValidationSums.metrics(sums, self.model.config.latent_dim, self.train_config.free_bits)
        metrics["loss"] = metrics["recon_loss"] + self.train_config.beta * metrics["penalised_kl"]
        metrics["beta"] = self.train_config.beta
        for key in ("loss", "recon_loss", "kl_loss", "beta", "active_units"):
            # The values are equal on every rank already; max keeps them unchanged.
            self.log(f"val/{key}", float(metrics[key]), prog_bar=key == "loss", sync_dist=True, reduce_fx="max")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.train_config.lr, weight_decay=self.train_config.weight_decay
        )
        if self.train_config.lr_schedule == "constant":
            return optimizer
        # Stepped once per optimiser step. Lightning restores the step count on resume, and the curve
        # follows this run's length. Unlike CosineAnnealingLR, the factor stays at 0 past the end.
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class ValidationSums:
    """Sums over the valid sets of one rank's validation batches.

    `values` is a float64 vector. Its first three entries are the number of
    sets and the set-weighted sums of the presence and value reconstruction
    losses; the fourth is the set-weighted sum of the weighted history loss.
    Three blocks of Z follow: the set-weighted KL sum of each latent
    dimension, and the sums of the posterior mean and of its square.
    """

    def __init__(self, latent_dim: int, device: torch.device) -> None:
        self.values = torch.zeros(4 + 3 * latent_dim, dtype=torch.float64, device=device)

    def add(self, out: dict[str, torch.Tensor], set_mask: torch.Tensor) -> None:
        """Add one batch: `out` from SeqSetVAE.forward, `set_mask` [B, S]."""
        n_sets = set_mask.sum().double()
        means = out["post_mu"].detach()[set_mask].double()  # [M, Z]
        parts = [
            n_sets[None],
            (out["recon_presence"].detach().double() * n_sets)[None],
            (out["recon_value"].detach().double() * n_sets)[None],
            ((out["recon"] - out["recon_presence"] - out["recon_value"]).detach().double() * n_sets)[None],
            out["kl_per_dim"].detach().double() * n_sets,
            means.sum(dim=0),
            means.pow(2).sum(dim=0),
        ]
        self.values += torch.cat(parts)

    @staticmethod
    def metrics(values: torch.Tensor, latent_dim: int, free_bits: float) -> dict[str, torch.Tensor]:
        """Return the split-level losses in nats per set, and the fraction of active latent units."""
        n_sets = values[0].clamp(min=1)
        kl_sums, mean_sums, square_sums = values[4:].view(3, latent_dim)
        kl_per_dim = kl_sums / n_sets
        variance = square_sums / n_sets - (mean_sums / n_sets).pow(2)
        return {
            "recon_loss": (values[1] + values[2] + values[3]) / n_sets,
            "kl_loss": kl_per_dim.sum(),
            "penalised_kl": kl_per_dim.clamp(min=free_bits).sum(),
            "active_units": (variance > ACTIVE_UNIT_THRESHOLD).double().mean(),
        }


def init_head(head: nn.Linear, scheme: str, prevalence: float) -> None:
    """Initialise the linear head.

    `normal`: weights N(0, 0.01) (standard deviation 0.01), bias 0. `xavier`:
    Xavier-uniform weights, bias 0. `zero_logodds`: weights 0, bias at the
    log-odds of the training prevalence, so the first predictions equal it.
    """
    with torch.no_grad():
        if scheme == "normal":
            nn.init.normal_(head.weight, mean=0.0, std=0.01)
            nn.init.zeros_(head.bias)
        elif scheme == "xavier":
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)
        elif scheme == "zero_logodds":
            p = min(max(prevalence, 1e-6), 1 - 1e-6)
            nn.init.zeros_(head.weight)
            head.bias.fill_(math.log(p / (1 - p)))
        else:
            raise ValueError(f"head_init: expected normal, xavier or zero_logodds, got {scheme!r}")


class FinetuneModule(pl.LightningModule):
    """One linear layer with focal loss on `[mu, std]` features of a frozen encoder.

    With an encoder, batches are packed set tensors and features are computed
    in eval mode without gradients; the decoder is never called. Without one,
    batches carry precomputed `features`, which is how sweep trials share one
    encoding pass.
    """

    def __init__(
        self,
        model_config: dict,
        finetune_config: dict,
        preprocessing: dict,
        prevalence: float,
        with_encoder: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.config = FinetuneConfig(**finetune_config)
        model_cfg = ModelConfig(**model_config)
        self.encoder: SeqSetVAE | None = None
        if with_encoder:
            self.encoder = SeqSetVAE(model_cfg, vocab_size=len(preprocessing["codes"]) + 2)
            self.freeze_encoder()
        self.head = nn.Linear(2 * model_cfg.latent_dim, 1)
        init_head(self.head, self.config.head_init, prevalence)
        # The head's input is (features - feature_mean) / feature_scale, the identity until set_feature_scaling.
        self.register_buffer("feature_mean", torch.zeros(2 * model_cfg.latent_dim))
        self.register_buffer("feature_scale", torch.ones(2 * model_cfg.latent_dim))
        self.val_auroc = BinaryAUROC()
        self.val_auprc = BinaryAveragePrecision()
        self.val_accuracy = BinaryAccuracy()
        self.val_loss = MeanMetric()
        self.val_positives = SumMetric()
        self.val_count = SumMetric()
        self._warned_one_class = False

    def load_encoder_state(self, state: dict[str, torch.Tensor], origin: str) -> None:
        """Load pretrained encoder weights through the explicit key mapping, then freeze again.

        Raises:
            UserInputError: an encoder key is missing or has the wrong shape.
        """
        assert self.encoder is not None
        mapped = map_encoder_state(state, self.encoder.state_dict(), SeqSetVAE.encoder_state_prefixes, origin)
        # Decoder keys are deliberately absent; map_encoder_state raised if any encoder key was.
        self.encoder.load_state_dict(mapped, strict=False)
        self.freeze_encoder()

    def freeze_encoder(self) -> None:
        assert self.encoder is not None
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> "FinetuneModule":
        # Lightning calls train() on the whole module at every epoch start;
        # the encoder must stay in eval mode so its features are deterministic.
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return `[mu, std]` features [B, 2Z]."""
        if "features" in batch:
            return batch["features"]
        if self.encoder is None:
            raise ValueError("batch has no 'features' and this module has no encoder")
        with torch.no_grad():
            return self.encoder.features(batch)

    def set_feature_scaling(self, train_features: torch.Tensor | np.ndarray) -> None:
        """Centre and scale the head's input by the mean and std of the train features [N, 2Z].

        A feature that is constant on the train split keeps scale 1.
        """
        # A copy, because arrays from Ray's object store are read-only.
        features = torch.from_numpy(np.array(train_features, dtype=np.float64))
        std = features.std(dim=0, correction=0)
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_scale.copy_(torch.where(std > FEATURE_SCALE_FLOOR, std, torch.ones_like(std)))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Return the head's logits [B] for `[mu, std]` features [B, 2Z]."""
        return self.head((features - self.feature_mean) / self.feature_scale).squeeze(-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return logits [B]."""
        return self.logits(self.features(batch))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features = self.features(batch)
        logits = self.logits(features)
        loss = binary_focal_loss(logits, batch["label"], self.config.focal_gamma, self.config.focal_alpha)
        half = features.shape[-1] // 2
        batch_size = features.shape[0]
        self.log("train/focal_loss", loss, batch_size=batch_size)
        self.log("train/loss", loss, batch_size=batch_size, prog_bar=True)
        self.log("train/mu_norm", features[:, :half].norm(dim=-1).mean(), batch_size=batch_size)
        self.log("train/std_mean", features[:, half:].mean(), batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # A rank whose share of the split is smaller than its number of batches gets empty ones.
        if batch["label"].numel() == 0:
            return
        logits = self(batch)
        probabilities = torch.sigmoid(logits)
        target = batch["label"].long()
        focal = binary_focal_loss(
            logits, batch["label"], self.config.focal_gamma, self.config.focal_alpha, reduction="none"
        )
        # Metric objects accumulate the whole split and sync across ranks in compute().
        self.val_loss.update(focal)
        self.val_positives.update(target.sum())
        self.val_count.update(target.numel())
        self.val_auroc.update(probabilities, target)
        self.val_auprc.update(probabilities, target)
        self.val_accuracy.update(probabilities, target)

    def on_validation_epoch_end(self) -> None:
        """Log val/loss, val/accuracy and, when the labels have both classes, val/auroc and val/auprc.

        With one class AUROC and AUPRC are undefined. They are logged as NaN,
        with a warning at the first epoch, instead of the 0 that torchmetrics returns.
        """
        n_positive, n_labels = int(self.val_positives.compute()), int(self.val_count.compute())
        self.log("val/loss", self.val_loss.compute())
        self.log("val/accuracy", self.val_accuracy.compute())
        if 0 < n_positive < n_labels:
            self.log("val/auroc", self.val_auroc.compute(), prog_bar=True)
            self.log("val/auprc", self.val_auprc.compute(), prog_bar=True)
        else:
            if self.trainer.is_global_zero and not self.trainer.sanity_checking and not self._warned_one_class:
                self._warned_one_class = True
                logger.warning(
                    "All %d validation labels are %s: val/auroc and val/auprc are undefined",
                    n_labels,
                    "positive" if n_positive else "negative",
                )
            self.log("val/auroc", math.nan)
            self.log("val/auprc", math.nan)
        for metric in (self.val_loss, self.val_positives, self.val_count, self.val_auroc, self.val_auprc, self.val_accuracy):
            metric.reset()

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(
            self.head.parameters(), lr=self.config.head_lr, weight_decay=self.config.weight_decay
        )
        # The learning rate decays to 0 along a half cosine, so the head after the last epoch has
        # settled instead of still stepping around the optimum at the full rate.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.config.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    def head_state(self) -> dict[str, Any]:
        """Return the weight and bias of one linear layer on raw `[mu, std]`, with the feature scaling folded in.

        w' = w / scale and b' = b - w' . mean give w' x + b' = w (x - mean) / scale + b.
        """
        weight = self.head.weight.detach().double() / self.feature_scale.double()
        bias = self.head.bias.detach().double() - weight @ self.feature_mean.double()
        return {"weight": weight.float().cpu(), "bias": bias.float().cpu()}
