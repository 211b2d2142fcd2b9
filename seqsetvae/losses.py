"""Loss functions of pretraining (set reconstruction, KL with free bits) and finetuning (focal loss).

Dimension legend: B subjects, S sets per subject, N events per set, Z latent
width, V vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seqsetvae.batch import PAD_CODE

REDUCTIONS = ("mean", "sum", "none")


def binary_focal_loss(
    logits: Tensor, targets: Tensor, gamma: float, alpha: float | None = None, reduction: str = "mean"
) -> Tensor:
    """Compute the binary focal loss of Lin et al. (2017) from logits.

    With p = sigmoid(logit) and target y, p_t = p * y + (1 - p) * (1 - y) and

        loss = -alpha_t * (1 - p_t) ** gamma * log(p_t),

    where alpha_t = alpha * y + (1 - alpha) * (1 - y), or 1 when alpha is None.
    -log(p_t) is computed as binary cross-entropy with logits, which uses
    log-sigmoid and does not overflow. gamma = 0 with alpha = None is plain
    binary cross-entropy.

    Args:
        logits: Logits of the positive class, any shape.
        targets: Targets in [0, 1], same shape as `logits`.
        gamma: Focusing parameter, >= 0.
        alpha: Weight of the positive class in (0, 1), or None for no class weight.
        reduction: "mean" averages over all elements, "sum" sums them, and
            "none" returns the elementwise loss.

    Raises:
        ValueError: shapes differ, gamma < 0, alpha outside (0, 1) or an unknown reduction.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"expected targets of the logits shape {tuple(logits.shape)}, got {tuple(targets.shape)}")
    if gamma < 0:
        raise ValueError(f"expected gamma >= 0, got {gamma}")
    if alpha is not None and not 0.0 < alpha < 1.0:
        raise ValueError(f"expected alpha in (0, 1) or None, got {alpha}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"expected reduction in {REDUCTIONS}, got {reduction!r}")

    targets = targets.to(logits.dtype)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    one_minus_p_t = p * (1 - targets) + (1 - p) * targets
    loss = one_minus_p_t.pow(gamma) * cross_entropy
    if alpha is not None:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss

    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def gaussian_kl(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """Return KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) elementwise, in nats, for diagonal Gaussians."""
    variance_ratio = torch.exp(logvar_q - logvar_p)
    mean_term = (mu_q - mu_p).pow(2) * torch.exp(-logvar_p)
    return 0.5 * (variance_ratio + mean_term - 1.0 - (logvar_q - logvar_p))


def mean_over_sets(per_set: Tensor, set_mask: Tensor) -> Tensor:
    """Average `per_set` [B, S, ...] over the valid sets of `set_mask` [B, S] to [...].

    The result is 0 when there is no valid set.
    """
    weights = set_mask.to(per_set.dtype).view(*set_mask.shape, *([1] * (per_set.dim() - 2)))  # [B, S, 1...]
    total = (per_set * weights).sum(dim=(0, 1))
    return total / set_mask.sum().clamp(min=1)


def free_bits_kl(kl: Tensor, set_mask: Tensor, free_bits: float) -> tuple[Tensor, Tensor]:
    """Apply free bits (Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive Flow").

    For each latent dimension z, kl_z is the KL [B, S, Z] averaged over the valid
    sets of the batch. The penalised KL is sum_z max(kl_z, free_bits), so a
    dimension whose batch-mean KL is below `free_bits` nats gets no gradient
    pushing it further down.

    Returns:
        (penalised KL, raw KL sum_z kl_z), both scalars in nats per set.
    """
    kl_per_dim = mean_over_sets(kl, set_mask)  # [Z]
    return kl_per_dim.clamp(min=free_bits).sum(), kl_per_dim.sum()


def set_targets(codes: Tensor, values: Tensor, has_value: Tensor, event_mask: Tensor, vocab_size: int) -> dict:
    """Turn the events of each set into order-free targets over the vocabulary.

    Returns a dict of three [B, S, V] tensors. `presence` is 1.0 where the code
    occurs in the set. `value` is the mean of the code's values in the set, 0
    where it has none. `has_value` is True where the code occurs with at least
    one value. Padded events add nothing, whatever their code.
    """
    shape = (*codes.shape[:2], vocab_size)
    codes = codes.masked_fill(~event_mask, PAD_CODE)
    valued = (has_value & event_mask).to(values.dtype)  # [B, S, N]

    event_count = values.new_zeros(shape).scatter_add_(-1, codes, event_mask.to(values.dtype))  # [B, S, V]
    value_count = values.new_zeros(shape).scatter_add_(-1, codes, valued)  # [B, S, V]
    value_sum = values.new_zeros(shape).scatter_add_(-1, codes, values * valued)  # [B, S, V]
    return {
        "presence": (event_count > 0).to(values.dtype),
        "value": value_sum / value_count.clamp(min=1),
        "has_value": value_count > 0,
    }


HISTORY_VALUE_STATISTICS = ("last", "min", "max", "mean")
"""Running statistics of each code's values over sets <= t that the history decoder predicts, in this order."""

HISTORY_OUTPUTS = len(HISTORY_VALUE_STATISTICS) + 2
"""Outputs per code of the history decoder without thresholds: the value statistics, log(1 + event count)
and a seen logit."""

HISTORY_THRESHOLD_RANGE = (-2.0, 2.0)
"""Normalised values between which `history_threshold_grid` spaces its thresholds."""


def history_threshold_grid(count: int) -> tuple[float, ...]:
    """Return `count` thresholds spaced evenly over HISTORY_THRESHOLD_RANGE, or (0.0,) for a count of 1."""
    if count <= 0:
        return ()
    if count == 1:
        return (0.0,)
    low, high = HISTORY_THRESHOLD_RANGE
    return tuple(low + (high - low) * k / (count - 1) for k in range(count))


def history_quantile_levels(count: int) -> tuple[float, ...]:
    """Return the quantile levels k / (count + 1), k = 1..count, of the `quantile` threshold spacing."""
    return tuple(k / (count + 1) for k in range(1, count + 1))


def history_outputs(n_thresholds: int) -> int:
    """Return the outputs per code of the history decoder: HISTORY_OUTPUTS plus one per statistic and threshold."""
    return HISTORY_OUTPUTS + len(HISTORY_VALUE_STATISTICS) * n_thresholds


def history_targets(targets: dict, thresholds: Tensor | tuple[float, ...] = ()) -> dict:
    """Summarise, for each set t, every code's events in sets 0..t.

    Takes the output of `set_targets` and returns a dict of four tensors, and
    a fifth when `thresholds` is not empty. `thresholds` is either T values
    shared by all codes or a [V, T] table with each code's own T values.

        values: [B, S, V, 4] last, minimum, maximum and mean of the code's
            per-set mean values, in HISTORY_VALUE_STATISTICS order. They are 0
            while the code has no value yet.
        has_value: [B, S, V] True once the code has had a value.
        log_count: [B, S, V] log(1 + number of sets so far that contain the code).
        seen: [B, S, V] 1.0 once the code has occurred.
        above: [B, S, V, 4 * T] 1.0 where a value statistic exceeds a threshold,
            statistic-major: (last > t_1, ..., last > t_T, min > t_1, ...).
            0 while the code has no value yet.

    A linear map from the latent cannot turn a value into "above t", so the
    `above` targets make the latent carry these steps linearly, and a linear
    head can then weigh abnormal values on either side of normal differently.

    Padded sets have no events, so they carry the statistics of the last
    valid set forward.
    """
    value, has_value, presence = targets["value"], targets["has_value"], targets["presence"]
    positions = torch.arange(value.shape[1], device=value.device).view(1, -1, 1)  # [1, S, 1]
    last_index = torch.where(has_value, positions, -1).cummax(dim=1).values  # [B, S, V]
    ever_valued = last_index >= 0
    last = value.gather(1, last_index.clamp(min=0))
    # Normalised values are clipped and finite, so +-inf only marks sets without a value.
    low = value.masked_fill(~has_value, float("inf")).cummin(dim=1).values
    high = value.masked_fill(~has_value, float("-inf")).cummax(dim=1).values
    value_count = has_value.to(value.dtype).cumsum(dim=1)
    mean = (value * has_value).cumsum(dim=1) / value_count.clamp(min=1)
    statistics = torch.stack([last, low, high, mean], dim=-1)  # [B, S, V, 4]
    set_count = presence.cumsum(dim=1)  # [B, S, V]
    statistics = statistics.masked_fill(~ever_valued[..., None], 0.0)
    history = {
        "values": statistics,
        "has_value": ever_valued,
        "log_count": torch.log1p(set_count),
        "seen": (set_count > 0).to(value.dtype),
    }
    grid = torch.as_tensor(thresholds, dtype=statistics.dtype, device=statistics.device)  # [T] or [V, T]
    if grid.shape[-1]:
        if grid.dim() == 2:
            grid = grid[:, None, :]  # [V, 1, T], against the statistics axis
        above = (statistics[..., None] > grid) & ever_valued[..., None, None]  # [B, S, V, 4, T]
        history["above"] = above.to(value.dtype).flatten(-2)  # [B, S, V, 4 * T]
    return history


def history_loss(prediction: Tensor, history: dict, set_mask: Tensor) -> Tensor:
    """Return the history reconstruction loss, a scalar in nats per set.

    For every code except PAD: 0.5 * squared error of each value statistic the
    code has, 0.5 * squared error of log(1 + count), the binary cross-entropy
    of `seen` and, with thresholds, 0.5 * squared error of each `above`
    indicator of a code that has a value, summed over codes and statistics,
    then averaged over valid sets. The indicators are regressed, not
    classified, so that they stay linear in the latent.

    Args:
        prediction: [B, S, V, history_outputs(T)] output of the history decoder.
        history: The output of `history_targets`.
        set_mask: [B, S] valid sets.
    """
    n_values = len(HISTORY_VALUE_STATISTICS)
    code_columns = (torch.arange(prediction.shape[2], device=prediction.device) != PAD_CODE).to(prediction.dtype)
    value_error = 0.5 * (prediction[..., :n_values] - history["values"]).pow(2).sum(-1) * history["has_value"]
    count_error = 0.5 * (prediction[..., n_values] - history["log_count"]).pow(2)
    seen_error = F.binary_cross_entropy_with_logits(prediction[..., n_values + 1], history["seen"], reduction="none")
    per_code = value_error + count_error + seen_error  # [B, S, V]
    if "above" in history:
        above_error = 0.5 * (prediction[..., n_values + 2 :] - history["above"]).pow(2).sum(-1)
        per_code = per_code + above_error * history["has_value"]
    per_set = (per_code * code_columns).sum(-1)  # [B, S]
    return mean_over_sets(per_set, set_mask)


def reconstruction_losses(
    presence_logits: Tensor, value_pred: Tensor, targets: dict, set_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Return the (presence, value) reconstruction losses of the sets, each a scalar in nats per set.

    Presence: binary cross-entropy of each code's presence in the set, summed over
    the vocabulary except PAD, then averaged over valid sets. Value: 0.5 *
    squared error between the predicted and the target (mean) value, summed over
    the codes present with a value, then averaged over valid sets. 0.5 * squared
    error is the negative log-likelihood of a unit-variance Gaussian up to a
    constant, which matches values normalised to unit variance per code, so both
    parts are log-likelihoods and enter the loss with weight 1.

    Args:
        presence_logits: [B, S, V] logits of each code being in the set.
        value_pred: [B, S, V] predicted normalised value of each code.
        targets: The output of `set_targets`.
        set_mask: [B, S] valid sets.
    """
    vocab_size = presence_logits.shape[-1]
    code_columns = torch.arange(vocab_size, device=presence_logits.device) != PAD_CODE  # [V]

    bce = F.binary_cross_entropy_with_logits(presence_logits, targets["presence"], reduction="none")  # [B, S, V]
    presence_per_set = (bce * code_columns).sum(-1)  # [B, S]

    squared_error = 0.5 * (value_pred - targets["value"]).pow(2)  # [B, S, V]
    value_per_set = (squared_error * targets["has_value"]).sum(-1)  # [B, S]
    return mean_over_sets(presence_per_set, set_mask), mean_over_sets(value_per_set, set_mask)
