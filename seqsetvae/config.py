"""Typed, validated configuration for every stage.

Each stage has one dataclass. Field names are the option names: `max_sets` is
`--max-sets` on the command line and `max_sets:` in a YAML file given with
`--config`. Every field documents its unit in the `help` metadata, which the
command line shows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from seqsetvae.errors import UserInputError


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """Declare a config field with its command-line help text."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class DataConfig:
    """How MEDS events become packed set tensors.

    Attributes:
        max_sets: Sets kept per subject; longer records keep the most recent ones.
        max_events_per_set: Events kept per set; the rest are dropped and counted.
        clip_quantile: Values of a code are clipped to the [q, 1 - q] quantiles of
            its train-split values before normalisation.
        task: Name of the label directory under the MEDS root.
    """

    max_sets: int = option(
        256,
        "maximum number of sets (time points) kept per subject; older sets are dropped, and with the first set "
        "the static events that sit in it",
    )
    max_events_per_set: int = option(48, "maximum number of events kept per set; extra events are dropped and counted")
    clip_quantile: float = option(
        0.005, "per-code clipping quantile q: values are clipped to the train-split [q, 1-q] quantiles"
    )
    task: str = option("in_hospital_mortality", "label task name, a directory under MEDS_DIR/labels or MEDS_DIR/tasks")

    def __post_init__(self) -> None:
        _check_positive(self, "max_sets", "max_events_per_set")
        if not 0.0 <= self.clip_quantile < 0.5:
            raise UserInputError(f"clip_quantile: expected a value in [0, 0.5), got {self.clip_quantile}")


VALUE_EMBEDDINGS = ("mlp", "linear")
THRESHOLD_SPACINGS = ("even", "quantile")


@dataclass
class ModelConfig:
    """Widths and depths of the sequence-of-sets VAE.

    Attributes:
        d_model: Width D of event embeddings, set blocks and, unless seq_width is set, the transformer.
        latent_dim: Width Z of each set latent; features are 2 * Z wide.
        n_inducing: Inducing points per induced set attention block.
        n_heads: Attention heads in set blocks and in the transformer.
        n_set_layers: Induced set attention blocks in the set encoder.
        n_seq_layers: Causal transformer layers over the set sequence.
        seq_width: Width of the causal transformer, or 0 for d_model. Set summaries are projected to it.
        dropout: Dropout probability in the transformer.
        logvar_min: Lower clamp of every log-variance.
        logvar_max: Upper clamp of every log-variance.
        history_weight: Weight of the history reconstruction loss; 0 builds no history decoder.
        history_thresholds: Number T of thresholds at which the history decoder also predicts whether
            each running value statistic exceeds them.
        history_threshold_spacing: `even` places the T thresholds evenly over normalised values -2 to 2
            for every code (seqsetvae.losses.history_threshold_grid); `quantile` places them at each
            code's train quantiles k / (T + 1), so T = 9 gives the code's deciles.
        value_embedding: `mlp` embeds a value with Linear-GELU-Linear, so the embedding can bend
            (abnormal on both sides of a reference range); `linear` uses one Linear(1, D).
    """

    d_model: int = option(64, "model width D (embedding and attention size)")
    latent_dim: int = option(32, "latent width Z per set; finetuning features are 2*Z wide")
    n_inducing: int = option(8, "number of inducing points per induced set attention block")
    n_heads: int = option(4, "number of attention heads")
    n_set_layers: int = option(2, "number of induced set attention blocks in the set encoder")
    n_seq_layers: int = option(2, "number of causal transformer layers over the sequence of sets")
    seq_width: int = option(
        0,
        "width of the causal transformer over the sequence of sets, which carries the history of a stay, "
        "or 0 for d_model",
    )
    dropout: float = option(0.1, "dropout probability in the transformer")
    logvar_min: float = option(-10.0, "lower clamp of log-variances")
    logvar_max: float = option(10.0, "upper clamp of log-variances")
    history_weight: float = option(
        1.0,
        "weight of the history reconstruction loss, in which a linear decoder predicts from each set latent every "
        "code's last, minimum, maximum and mean value, event count and presence so far; 0 turns it off",
    )
    value_embedding: str = option("mlp", f"value embedding, one of {', '.join(VALUE_EMBEDDINGS)}")
    history_thresholds: int = option(
        0,
        "number T of thresholds for which the history decoder also predicts whether each running value "
        "statistic lies above it; 0 turns this off. The decoder has V * (6 + 4 * T) outputs per set, so a large "
        "vocabulary V needs a small T",
    )
    history_threshold_spacing: str = option(
        "even",
        "where the history thresholds lie: even (evenly over normalised values -2 to 2, the same for every code) "
        "or quantile (at each code's train quantiles k/(T+1); T=9 gives deciles)",
    )

    def __post_init__(self) -> None:
        _check_positive(self, "d_model", "latent_dim", "n_inducing", "n_heads", "n_set_layers", "n_seq_layers")
        if self.seq_width < 0:
            raise UserInputError(
                f"seq_width: invalid width {self.seq_width}. Set 0 to use d_model, or a positive multiple of n_heads"
            )
        for name in ("d_model", "seq_width"):
            width = getattr(self, name)
            if width % self.n_heads:
                raise UserInputError(f"{name}: expected a multiple of n_heads={self.n_heads}, got {width}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserInputError(f"dropout: expected a value in [0, 1), got {self.dropout}")
        if self.history_thresholds < 0:
            raise UserInputError(f"history_thresholds: expected a value >= 0, got {self.history_thresholds}")
        if self.history_thresholds and not self.history_weight:
            raise UserInputError(
                f"history_thresholds: {self.history_thresholds} needs the history decoder, which history_weight 0 "
                "turns off; set history_weight above 0 or history_thresholds to 0"
            )
        if self.history_threshold_spacing not in THRESHOLD_SPACINGS:
            raise UserInputError(
                f"history_threshold_spacing: expected one of {', '.join(THRESHOLD_SPACINGS)}, "
                f"got {self.history_threshold_spacing!r}"
            )
        if self.history_threshold_spacing == "quantile" and not self.history_thresholds:
            raise UserInputError(
                "history_threshold_spacing: 'quantile' places history thresholds, but history_thresholds is 0; "
                "set history_thresholds above 0 or the spacing to 'even'"
            )
        if self.history_weight < 0:
            raise UserInputError(f"history_weight: expected a value >= 0, got {self.history_weight}")
        if self.value_embedding not in VALUE_EMBEDDINGS:
            raise UserInputError(
                f"value_embedding: expected one of {', '.join(VALUE_EMBEDDINGS)}, got {self.value_embedding!r}"
            )
        if self.logvar_min >= self.logvar_max:
            raise UserInputError(
                f"logvar_min: expected a value below logvar_max={self.logvar_max}, got {self.logvar_min}"
            )


# Splits whose events pretraining may read. The held-out split is left for evaluation.
PRETRAIN_SPLITS = ("train", "tuning")

# Learning-rate schedules of pretraining.
LR_SCHEDULES = ("constant", "cosine")

# Lightning precision settings that pretraining accepts.
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")


@dataclass
class PretrainConfig:
    """Optimisation and Ray Train settings of pretraining.

    Attributes:
        beta: Weight of the KL term after warm-up.
        beta_warmup_steps: Optimiser steps over which beta rises linearly from 0.
        free_bits: Minimum KL per latent dimension (nats) that is not penalised further.
        pretrain_splits: `train`, or `train,tuning` to train on the tuning split's events
            too, without labels. Validation stays on the tuning split, so with `train,tuning`
            the validation loss is measured on events the model has trained on.
        lr_schedule: `constant` keeps `lr` throughout. `cosine` decays it to 0 along a half
            cosine over every optimiser step of the run, so the encoder at the last epoch has
            settled instead of still moving at the full rate.
        group_by_length: Off, a batch contains random stays and is padded to the longest of them. On,
            the stays of each window of 50 batches are sorted by number of sets before they are cut
            into batches, and the batches run in random order (seqsetvae.sampling.LengthGroupedSampler).
    """

    max_epochs: int = option(8, "number of pretraining epochs")
    batch_size: int = option(32, "subjects per batch on each worker")
    lr: float = option(1e-3, "AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    lr_schedule: str = option(
        "constant", f"learning-rate schedule, one of {', '.join(LR_SCHEDULES)}; cosine decays lr to 0 over the run"
    )
    beta: float = option(0.5, "KL weight after warm-up")
    beta_warmup_steps: int = option(500, "optimiser steps of linear KL warm-up from 0 to beta")
    free_bits: float = option(0.05, "free bits: KL per latent dimension, in nats, below which it is not penalised")
    pretrain_splits: str = option(
        "train",
        "MEDS splits whose events, without labels, pretraining trains on: train or train,tuning; "
        "held_out is never read",
    )
    num_workers: int = option(1, "Ray Train workers (DDP processes)")
    cpus_per_worker: int = option(
        0,
        "CPU cores reserved for each Ray Train worker; 0 divides the Ray cluster's CPUs among the workers, "
        "or reserves 1 per worker with --use-gpu",
    )
    use_gpu: bool = option(False, "train on one GPU per worker with NCCL; without it, CPU with gloo")
    max_failures: int = option(0, "worker-group restarts Ray Train allows before the run fails")
    seed: int = option(0, "random seed")
    precision: str = option("32-true", f"Lightning precision, one of {', '.join(PRECISIONS)}; 16-bit float needs --use-gpu")
    run_name: str = option("pretrain", "Ray Train run name; running again with the same name resumes it")
    dataloader_workers: int = option(0, "DataLoader worker processes per Ray worker")
    group_by_length: bool = option(
        False,
        "draw each training batch from stays of similar length, in random batch order, so batches carry less "
        "padding",
    )
    compile: bool = option(
        False, "compile the model with torch.compile (dynamic shapes) before training; the first steps are slower"
    )
    log_every_n_steps: int = option(10, "optimiser steps between training metrics written to TensorBoard")

    def __post_init__(self) -> None:
        _check_positive(self, "max_epochs", "batch_size", "num_workers", "log_every_n_steps")
        if self.cpus_per_worker < 0:
            raise UserInputError(f"cpus_per_worker: expected 0 (automatic) or a positive count, got {self.cpus_per_worker}")
        parts = self.pretrain_splits.split(",") if isinstance(self.pretrain_splits, str) else []
        if sorted(part.strip() for part in parts) not in (["train"], ["train", "tuning"]):
            raise UserInputError(
                f"pretrain_splits: expected train or train,tuning (held_out is kept for evaluation), "
                f"got {self.pretrain_splits!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserInputError(f"lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise UserInputError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision.startswith("16-") and not self.use_gpu:
            # Lightning turns 16-mixed into bf16-mixed on CPU with only a warning.
            raise UserInputError(f"precision: {self.precision} needs --use-gpu; on CPU use bf16-mixed or 32-true")
        if self.lr <= 0 or self.beta < 0 or self.free_bits < 0 or self.beta_warmup_steps < 0:
            raise UserInputError(
                "lr must be positive and beta, free_bits and beta_warmup_steps non-negative, got "
                f"lr={self.lr}, beta={self.beta}, free_bits={self.free_bits}, "
                f"beta_warmup_steps={self.beta_warmup_steps}"
            )

    def train_splits(self) -> tuple[str, ...]:
        """Return the splits of `pretrain_splits` in the order of PRETRAIN_SPLITS, whatever order they were given in."""
        requested = {part.strip() for part in self.pretrain_splits.split(",")}
        return tuple(split for split in PRETRAIN_SPLITS if split in requested)


HEAD_INITS = ("normal", "xavier", "zero_logodds")


@dataclass
class FinetuneConfig:
    """Settings of the linear head trained on the frozen encoder.

    Attributes:
        focal_alpha: Weight of the positive class in focal loss; None applies no class weight.
        head_init: `normal` draws weights from N(0, 0.01); `xavier` uses Xavier-uniform;
            `zero_logodds` sets weights to 0 and the bias to the log-odds of the train prevalence.
        standardize: The features of one encoder differ in scale by orders of magnitude, so with a
            fixed learning rate and weight decay the head would favour the widest ones. Training on
            standardised features and folding the scaling into the weights afterwards gives every
            feature the same footing, and the saved head is still one linear layer on `[mu, std]`.
    """

    focal_gamma: float = option(2.0, "focal loss focusing parameter gamma (0 gives cross-entropy)")
    focal_alpha: float | None = option(None, "focal loss weight of the positive class in (0, 1); null for none")
    head_init: str = option("normal", f"head initialisation, one of {', '.join(HEAD_INITS)}")
    head_lr: float = option(3e-3, "Adam learning rate of the linear head")
    weight_decay: float = option(0.0, "Adam weight decay of the linear head")
    max_epochs: int = option(40, "finetuning epochs")
    batch_size: int = option(256, "labelled samples per batch")
    seed: int = option(0, "random seed")
    standardize: bool = option(
        True, "train the head on features centred and scaled by their train mean and std (folded into the saved layer)"
    )

    def __post_init__(self) -> None:
        _check_positive(self, "max_epochs", "batch_size")
        if self.head_init not in HEAD_INITS:
            raise UserInputError(f"head_init: expected one of {', '.join(HEAD_INITS)}, got {self.head_init!r}")
        if self.focal_alpha is not None and not 0.0 < self.focal_alpha < 1.0:
            raise UserInputError(f"focal_alpha: expected a value in (0, 1) or null, got {self.focal_alpha}")
        if self.focal_gamma < 0 or self.head_lr <= 0:
            raise UserInputError(
                f"focal_gamma must be >= 0 and head_lr > 0, got focal_gamma={self.focal_gamma}, "
                f"head_lr={self.head_lr}"
            )


# Choices of the sweep trial's epoch that is kept and ranked.
TRIAL_EPOCHS = ("last", "best")


@dataclass
class TuneConfig:
    """Settings of the Ray Tune + Optuna sweep over the head.

    Attributes:
        trial_epoch: `last` keeps and ranks each trial's head after its final
            epoch. `best` keeps its epoch with the highest tuning AUPRC, which
            adds a second maximum over a noisy split. On PhysioNet 2012 it
            favoured heads stopped early at a low learning rate, which did worse
            on the held-out split (docs/results.md).
    """

    num_samples: int = option(16, "number of Optuna trials")
    max_concurrent_trials: int = option(2, "trials run at the same time")
    search_seed: int = option(0, "seed of the Optuna sampler")
    cpus_per_trial: float = option(1.0, "CPU cores reserved for each trial")
    trial_epoch: str = option(
        "last", f"epoch of each trial that is kept and ranked, one of {', '.join(TRIAL_EPOCHS)} (best tuning AUPRC)"
    )

    def __post_init__(self) -> None:
        _check_positive(self, "num_samples", "max_concurrent_trials")
        if self.trial_epoch not in TRIAL_EPOCHS:
            raise UserInputError(f"trial_epoch: expected one of {', '.join(TRIAL_EPOCHS)}, got {self.trial_epoch!r}")


@dataclass
class ReportConfig:
    """Settings of the evaluation report.

    Attributes:
        bootstrap_resamples: Resamples of the evaluated labels, drawn with replacement,
            behind every confidence interval.
        confidence_level: Coverage of the bootstrap percentile intervals.
        report_seed: Seed of the bootstrap and of the gradient-boosting baseline.
        calibration_bins: Equal-width probability bins of the calibration diagram.
        baseline_max_codes: The baseline summarises this many of the most frequent
            train-split codes, five features each.
    """

    bootstrap_resamples: int = option(1000, "bootstrap resamples behind each confidence interval")
    confidence_level: float = option(0.95, "coverage of the bootstrap percentile confidence intervals, in (0, 1)")
    report_seed: int = option(0, "seed of the bootstrap and of the gradient-boosting baseline")
    calibration_bins: int = option(10, "number of equal-width probability bins in the calibration diagram")
    baseline_max_codes: int = option(500, "most frequent train-split codes summarised as baseline features")

    def __post_init__(self) -> None:
        _check_positive(self, "bootstrap_resamples", "calibration_bins", "baseline_max_codes")
        if not 0.0 < self.confidence_level < 1.0:
            raise UserInputError(f"confidence_level: expected a value in (0, 1), got {self.confidence_level}")


def _check_positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise UserInputError(f"{name}: expected a positive value, got {value}")


def from_dict(cls: type, values: dict[str, Any], source: str = "config") -> Any:
    """Build `cls` from the keys of `values` that name its fields.

    Raises:
        UserInputError: a value has the wrong type for its field.
    """
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            continue
        kwargs[key] = _coerce(value, names[key], source)
    return cls(**kwargs)


def _coerce(value: Any, spec: dataclasses.Field, source: str) -> Any:
    default = spec.default
    if value is None or default is None:
        return value
    expected = type(default)
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise UserInputError(f"{source}: {spec.name} expected true or false, got {value!r}")
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected):
        raise UserInputError(f"{source}: {spec.name} expected {expected.__name__}, got {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Return the fields of a config as plain types, safe for JSON and weights-only checkpoints."""
    return dataclasses.asdict(config)
