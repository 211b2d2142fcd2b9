"""The sequence-of-sets VAE: set encoder, causal prior over set latents, and set decoder.

Dimension legend (the letters of seqsetvae.batch, plus M, E and W):
    B subjects, S sets per subject, N events per set, D model width, Z latent width,
    W width of the causal transformer (`seq_width`, D by default),
    V vocabulary size, H attention heads, M valid sets of a batch (M <= B*S),
    E real events of those M sets.

Each set t of a subject gets a latent z_t. Its prior p(z_t | sets < t, times)
comes from a causal transformer over the summaries of the earlier sets; its
posterior is the product of that prior with the Gaussian evidence of the set's
own events, so the posterior of the last set carries the whole history.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from seqsetvae.batch import BATCH_KEYS, PAD_CODE
from seqsetvae.config import ModelConfig
from seqsetvae.losses import (
    free_bits_kl,
    gaussian_kl,
    history_loss,
    history_outputs,
    history_targets,
    history_threshold_grid,
    mean_over_sets,
    reconstruction_losses,
    set_targets,
)
from seqsetvae.model.blocks import ISAB, PMA, CausalTransformerLayer, TimeGapBias

ACTIVE_UNIT_THRESHOLD = 0.01
"""Variance of a latent dimension's posterior mean across sets above which the dimension counts as active."""

SET_BUCKETS = 4
"""Groups of similar length in which the set encoder runs the sets of a batch; see SetEncoder.forward."""

TIME_PERIODS_HOURS = tuple(2.0**k for k in range(-2, 12))
"""Periods of the sinusoidal time features: 15 minutes to 2048 hours (about 85 days), doubling."""


class EventEmbedding(nn.Module):
    """Embed an event (code, normalised value) as code_embedding + value part.

    The value part is value_mlp(value) when the event has a value and a learned
    no-value vector otherwise. value_mlp (Linear-GELU-Linear, or one Linear with
    `value_embedding="linear"`) has biases, so a value of 0 embeds differently
    from a missing value.
    """

    def __init__(self, vocab_size: int, d_model: int, value_embedding: str = "mlp") -> None:
        super().__init__()
        self.code = nn.Embedding(vocab_size, d_model, padding_idx=PAD_CODE)
        if value_embedding == "linear":
            self.value_mlp = nn.Sequential(nn.Linear(1, d_model))
        else:
            self.value_mlp = nn.Sequential(nn.Linear(1, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.no_value = nn.Parameter(torch.randn(d_model) * 0.02)  # [D]

    def forward(self, codes: Tensor, values: Tensor, has_value: Tensor) -> Tensor:
        """Embed `codes`, `values` and `has_value` [..., N] to [..., N, D]."""
        # Values of events without one are zeroed first, so a NaN there cannot reach the gradients.
        values = values.masked_fill(~has_value, 0.0)
        value_part = torch.where(has_value[..., None], self.value_mlp(values[..., None]), self.no_value)  # [..., N, D]
        return self.code(codes) + value_part


class SetEncoder(nn.Module):
    """Embed the events of each set, apply ISABs under the event mask and pool to one summary per set."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.embedding = EventEmbedding(vocab_size, config.d_model, config.value_embedding)
        self.layers = nn.ModuleList(
            ISAB(config.d_model, config.n_heads, config.n_inducing) for _ in range(config.n_set_layers)
        )
        self.pool = PMA(config.d_model, config.n_heads)

    def forward(self, codes: Tensor, values: Tensor, has_value: Tensor, event_mask: Tensor) -> Tensor:
        """Summarise M sets of events, each input [M, N], to [M, D].

        Sets are encoded in up to SET_BUCKETS groups of similar length, each cut
        after its own last real event. A batch is padded to its largest set,
        which is several times the typical one, so this skips most padding
        slots in attention and in the padded buffers of the set blocks.
        """
        last_event = (event_mask * torch.arange(1, event_mask.shape[1] + 1, device=event_mask.device)).amax(dim=1)  # [M]
        order = torch.argsort(last_event)
        pooled = []
        for bucket in order.tensor_split(min(SET_BUCKETS, max(len(order), 1))):
            n_kept = max(int(last_event[bucket[-1]]), 1) if len(bucket) else 1
            pooled.append(
                self._encode(
                    codes[bucket, :n_kept], values[bucket, :n_kept], has_value[bucket, :n_kept], event_mask[bucket, :n_kept]
                )
            )  # [M_bucket, D]
        return torch.cat(pooled)[torch.argsort(order)]  # [M, D]

    def _encode(self, codes: Tensor, values: Tensor, has_value: Tensor, event_mask: Tensor) -> Tensor:
        """Summarise sets [M, N] to [M, D]; only real events are embedded, so codes and values under padding are never read."""
        events = self.embedding(codes[event_mask], values[event_mask], has_value[event_mask])  # [E, D]
        x = events.new_zeros(*event_mask.shape, events.shape[-1]).index_put((event_mask,), events)  # [M, N, D]
        for layer in self.layers:
            x = layer(x, event_mask)
        return self.pool(x, event_mask)


class GaussianHead(nn.Module):
    """Linear map to the mean and the clamped log-variance of a diagonal Gaussian."""

    def __init__(self, d_in: int, latent_dim: int, logvar_min: float, logvar_max: float) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, 2 * latent_dim)
        self.logvar_min = logvar_min
        self.logvar_max = logvar_max

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map [..., D] to (mu, logvar), each [..., Z]."""
        mu, logvar = self.linear(x).chunk(2, dim=-1)
        return mu, logvar.clamp(self.logvar_min, self.logvar_max)


class TimeEncoding(nn.Module):
    """Project sin and cos of 2 * pi * t / period, for each period in TIME_PERIODS_HOURS, to width D."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        frequencies = torch.tensor([2 * math.pi / period for period in TIME_PERIODS_HOURS])
        self.register_buffer("frequencies", frequencies, persistent=False)  # [F]
        self.project = nn.Linear(2 * len(TIME_PERIODS_HOURS), d_model)

    def forward(self, set_times: Tensor) -> Tensor:
        """Encode `set_times` [B, S] in hours as [B, S, D]."""
        phase = set_times[..., None] * self.frequencies  # [B, S, F]
        return self.project(torch.cat([phase.sin(), phase.cos()], dim=-1))


class CausalPrior(nn.Module):
    """Prior p(z_t | sets < t, times) from a causal transformer with time-gap attention bias.

    The input at position t is the summary of set t - 1 (a learned start token at
    t = 0) plus the time encoding of set t, so output t depends on sets < t and on
    the times of sets <= t only.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width = config.seq_width or config.d_model
        # At a width other than D, a linear layer maps each set summary to the transformer's width.
        self.project = nn.Identity() if width == config.d_model else nn.Linear(config.d_model, width)
        self.start_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)  # [1, 1, W]
        self.time_encoding = TimeEncoding(width)
        self.time_bias = TimeGapBias(config.n_heads)
        self.layers = nn.ModuleList(
            CausalTransformerLayer(width, config.n_heads, config.dropout) for _ in range(config.n_seq_layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = GaussianHead(width, config.latent_dim, config.logvar_min, config.logvar_max)

    def forward(self, summary: Tensor, set_times: Tensor, set_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Map set summaries [B, S, D], times [B, S] in hours and `set_mask` [B, S] to prior (mu, logvar) [B, S, Z].

        The transformer runs at width W: `seq_width`, or D when that is 0.
        """
        start = self.start_token.expand(summary.shape[0], -1, -1)  # [B, 1, W]
        x = torch.cat([start, self.project(summary[:, :-1])], dim=1) + self.time_encoding(set_times)  # [B, S, W]
        attn_mask = self.time_bias(set_times, set_mask)  # [B, H, S, S]
        for layer in self.layers:
            x = layer(x, attn_mask)
        return self.head(self.norm(x))


class SetDecoder(nn.Module):
    """Decode a set latent z to presence logits and predicted normalised values over the vocabulary."""

    def __init__(self, latent_dim: int, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(latent_dim, d_model),
            nn.GELU(),
            nn.Linear(d_model, d_model),
            nn.GELU(),
            nn.Linear(d_model, 2 * vocab_size),
        )

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Map z [B, S, Z] to (presence logits, values), each [B, S, V]."""
        presence_logits, values = self.mlp(z).chunk(2, dim=-1)
        return presence_logits, values


class HistoryDecoder(nn.Module):
    """Decode a set latent z_t linearly to running statistics of every code over sets <= t.

    The map is linear on purpose. What it decodes (the last, minimum, maximum
    and mean value, the event count, whether the code has been seen and, with
    `n_thresholds`, whether each value statistic lies above each threshold) is
    then a linear function of the posterior mean, and a linear head on the
    frozen encoder can use it.
    """

    def __init__(self, latent_dim: int, vocab_size: int, n_thresholds: int = 0) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.n_outputs = history_outputs(n_thresholds)
        self.linear = nn.Linear(latent_dim, vocab_size * self.n_outputs)

    def forward(self, z: Tensor) -> Tensor:
        """Map z [B, S, Z] to [B, S, V, history_outputs(n_thresholds)]."""
        return self.linear(z).unflatten(-1, (self.vocab_size, self.n_outputs))


def product_of_gaussians(
    mu_a: Tensor, logvar_a: Tensor, mu_b: Tensor, logvar_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Return (mu, logvar) of the normalised product N(mu_a, var_a) * N(mu_b, var_b).

    Precisions add, and the mean weighs each input by its share of the precision:
    var_b / (var_a + var_b) = sigmoid(logvar_b - logvar_a) for mu_a.
    """
    logvar = -torch.logaddexp(-logvar_a, -logvar_b)
    weight_a = torch.sigmoid(logvar_b - logvar_a)
    return weight_a * mu_a + (1 - weight_a) * mu_b, logvar


def check_batch(batch: dict, vocab_size: int) -> None:
    """Raise ValueError unless `batch` follows the layout of seqsetvae.batch for this vocabulary."""
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise ValueError(f"expected batch keys {BATCH_KEYS}, got {tuple(batch)}; missing {missing}")
    codes = batch["codes"]
    if codes.dim() != 3 or codes.dtype != torch.int64:
        raise ValueError(f"codes: expected int64 [B, S, N], got {codes.dtype} {tuple(codes.shape)}")

    expected_shapes = {
        "values": codes.shape,
        "has_value": codes.shape,
        "event_mask": codes.shape,
        "set_times": codes.shape[:2],
        "set_mask": codes.shape[:2],
    }
    for key, shape in expected_shapes.items():
        if batch[key].shape != shape:
            raise ValueError(f"{key}: expected shape {tuple(shape)}, got {tuple(batch[key].shape)}")
    for key in ("has_value", "event_mask", "set_mask"):
        if batch[key].dtype != torch.bool:
            raise ValueError(f"{key}: expected dtype torch.bool, got {batch[key].dtype}")
    for key in ("values", "set_times"):
        if not batch[key].is_floating_point():
            raise ValueError(f"{key}: expected a floating-point dtype, got {batch[key].dtype}")

    real_codes = codes[batch["event_mask"]]
    if real_codes.numel():
        low, high = int(real_codes.min()), int(real_codes.max())
        if low <= PAD_CODE or high >= vocab_size:
            raise ValueError(
                f"codes: expected indices in [{PAD_CODE + 1}, {vocab_size}) at real events, got min {low}, max {high}"
            )
    set_mask = batch["set_mask"]
    gaps = (set_mask[:, 1:] & ~set_mask[:, :-1]).any(dim=1)  # [B]
    if bool(gaps.any()):
        rows = gaps.nonzero().flatten().tolist()
        raise ValueError(
            f"set_mask: expected valid sets left-aligned, got a valid set after a padded one in rows {rows[:10]}"
        )


def _refresh_thresholds_ready(model: "SeqSetVAE", incompatible_keys) -> None:
    """Mark the per-code history thresholds as set after load_state_dict when the loaded table has no NaN."""
    model._thresholds_ready = not torch.isnan(model.history_thresholds).any().item()


class SeqSetVAE(nn.Module):
    """Sequence-of-sets VAE over packed batches of seqsetvae.batch.

    `encode` and `features` use the encoder only. `forward` also decodes and
    returns the named loss parts of pretraining.
    """

    encoder_state_prefixes = ("set_encoder.", "evidence_head.", "prior.")
    """State-dict key prefixes of the encoder: every parameter except the decoder's."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        if vocab_size <= PAD_CODE + 1:
            raise ValueError(f"expected vocab_size > {PAD_CODE + 1} (PAD plus at least one code), got {vocab_size}")
        self.config = config
        self.vocab_size = vocab_size
        self.set_encoder = SetEncoder(config, vocab_size)
        self.evidence_head = GaussianHead(config.d_model, config.latent_dim, config.logvar_min, config.logvar_max)
        self.prior = CausalPrior(config)
        self.decoder = SetDecoder(config.latent_dim, config.d_model, vocab_size)
        n_thresholds = config.history_thresholds
        if config.history_threshold_spacing == "quantile":
            # Each code's own thresholds, fitted on the train split: set_history_thresholds fills them,
            # and checkpoints carry them. Until then the table is NaN and forward raises.
            self.register_buffer("history_thresholds", torch.full((vocab_size, n_thresholds), float("nan")))
            self._thresholds_ready = False
            self.register_load_state_dict_post_hook(_refresh_thresholds_ready)
        else:
            grid = torch.tensor(history_threshold_grid(n_thresholds), dtype=torch.float32)
            self.register_buffer("history_thresholds", grid, persistent=False)
            self._thresholds_ready = True
        self.history_decoder = (
            HistoryDecoder(config.latent_dim, vocab_size, n_thresholds) if config.history_weight > 0 else None
        )

    def set_history_thresholds(self, table: Tensor) -> None:
        """Set each code's history thresholds [V, T] of the `quantile` spacing, in normalised value units.

        Raises:
            ValueError: the model does not use per-code thresholds, or `table` has the wrong shape or a
                non-finite entry.
        """
        if self.config.history_threshold_spacing != "quantile":
            raise ValueError("per-code history thresholds need history_threshold_spacing 'quantile'")
        if tuple(table.shape) != tuple(self.history_thresholds.shape):
            raise ValueError(f"expected thresholds of shape {tuple(self.history_thresholds.shape)}, got {tuple(table.shape)}")
        if not torch.isfinite(table).all():
            raise ValueError("expected finite history thresholds")
        self.history_thresholds.copy_(table)
        self._thresholds_ready = True

    def history_thresholds_ready(self) -> bool:
        """Return False while the per-code thresholds of the `quantile` spacing are still unset."""
        return self._thresholds_ready

    def summarise_sets(self, batch: dict) -> Tensor:
        """Return the summary [B, S, D] of each set, zeros for padded sets.

        Only valid sets run through the set encoder, and the event axis is cut
        after the last real event of the batch, so padded sets and trailing
        padded event slots cost no compute.
        """
        codes, set_mask, event_mask = batch["codes"], batch["set_mask"], batch["event_mask"]
        b, s, n = codes.shape
        valid = set_mask.reshape(b * s)  # [B*S]
        last_event = (event_mask * torch.arange(1, n + 1, device=codes.device)).amax() if codes.numel() else 0
        n_kept = max(int(last_event), 1)

        def kept(tensor: Tensor) -> Tensor:
            return tensor.reshape(b * s, n)[valid][:, :n_kept]  # [M, N]

        pooled = self.set_encoder(
            kept(codes), kept(batch["values"]), kept(batch["has_value"]), kept(event_mask)
        )  # [M, D]
        summary = pooled.new_zeros(b * s, pooled.shape[-1]).index_put((valid,), pooled)  # [B*S, D]
        return summary.view(b, s, -1)  # [B, S, D]

    def encode(self, batch: dict) -> dict:
        """Return the distributions of the set latents and the set summaries.

        The dict has `post_mu`, `post_logvar`, `prior_mu`, `prior_logvar`,
        `evidence_mu` and `evidence_logvar`, each [B, S, Z], and `summary` [B, S, D].

        Times of padded sets are taken as 0 h, so the prior at position 0 of a
        subject without sets comes from the start token and time 0.
        """
        check_batch(batch, self.vocab_size)
        set_mask = batch["set_mask"]
        summary = self.summarise_sets(batch)  # [B, S, D]
        evidence_mu, evidence_logvar = self.evidence_head(summary)
        set_times = batch["set_times"].masked_fill(~set_mask, 0.0)
        prior_mu, prior_logvar = self.prior(summary, set_times, set_mask)
        post_mu, post_logvar = product_of_gaussians(evidence_mu, evidence_logvar, prior_mu, prior_logvar)
        return {
            "post_mu": post_mu,
            "post_logvar": post_logvar.clamp(self.config.logvar_min, self.config.logvar_max),
            "prior_mu": prior_mu,
            "prior_logvar": prior_logvar,
            "evidence_mu": evidence_mu,
            "evidence_logvar": evidence_logvar,
            "summary": summary,
        }

    def forward(self, batch: dict, beta: float, free_bits: float) -> dict:
        """Compute the pretraining loss, loss = recon + beta * kl, and its named parts.

        Reductions (all parts are scalars in nats per valid set):
            recon_presence: presence BCE summed over the vocabulary except PAD,
                averaged over valid sets.
            recon_value: 0.5 * squared error summed over the codes present with a
                value (target: mean of the code's values in the set), averaged
                over valid sets.
            recon_history: the history loss of seqsetvae.losses.history_loss:
                running per-code statistics of sets <= t decoded linearly from z_t.
            recon: recon_presence + recon_value + history_weight * recon_history.
            kl_raw: KL(posterior || prior) averaged over valid sets per latent
                dimension, then summed over the Z dimensions.
            kl: the same with free bits, sum_z max(kl_z, free_bits).

        Both recon parts are negative log-likelihoods (Bernoulli presence and
        unit-variance Gaussian value, up to a constant), so they add with weight 1.

        z is sampled with the reparameterisation trick in training mode and is
        the posterior mean in eval mode. The output also has `post_mu` [B, S, Z]
        and `kl_per_dim` [Z], the kl_z of kl_raw, which validation sums over
        batches to apply free bits to a whole split.
        """
        if beta < 0 or free_bits < 0:
            raise ValueError(f"expected beta >= 0 and free_bits >= 0, got beta={beta}, free_bits={free_bits}")
        if self.history_decoder is not None and not self._thresholds_ready:
            raise ValueError(
                "missing per-code history thresholds for history_threshold_spacing 'quantile'; call "
                "set_history_thresholds or build PretrainModule with "
                "history_thresholds=seqsetvae.pretrain.quantile_thresholds(...)"
            )
        posterior = self.encode(batch)
        post_mu, post_logvar = posterior["post_mu"], posterior["post_logvar"]
        z = post_mu + torch.randn_like(post_mu) * torch.exp(0.5 * post_logvar) if self.training else post_mu

        presence_logits, value_pred = (output.float() for output in self.decoder(z))  # [B, S, V] each
        targets = set_targets(batch["codes"], batch["values"], batch["has_value"], batch["event_mask"], self.vocab_size)
        recon_presence, recon_value = reconstruction_losses(presence_logits, value_pred, targets, batch["set_mask"])
        if self.history_decoder is None:
            recon_history = recon_value.new_zeros(())
        else:
            history_pred = self.history_decoder(z).float()  # [B, S, V, history_outputs(T)]
            history = history_targets(targets, self.history_thresholds)
            recon_history = history_loss(history_pred, history, batch["set_mask"])

        # Losses are computed in float32, also under bf16 autocast: the KL of close Gaussians is a small
        # difference of large terms.
        gaussians = (post_mu, post_logvar, posterior["prior_mu"], posterior["prior_logvar"])
        kl_elements = gaussian_kl(*(tensor.float() for tensor in gaussians))  # [B, S, Z]
        kl, kl_raw = free_bits_kl(kl_elements, batch["set_mask"], free_bits)
        recon = recon_presence + recon_value + self.config.history_weight * recon_history
        return {
            "loss": recon + beta * kl,
            "recon": recon,
            "recon_presence": recon_presence,
            "recon_value": recon_value,
            "recon_history": recon_history,
            "kl": kl,
            "kl_raw": kl_raw,
            "kl_per_dim": mean_over_sets(kl_elements, batch["set_mask"]),
            "post_mu": post_mu,
        }

    def features(self, batch: dict) -> Tensor:
        """Return [mu, std] [B, 2Z] of the posterior at each subject's last valid set.

        A subject without valid sets gets the prior at position 0. The decoder is not used.
        """
        return self.features_of(self.encode(batch), batch["set_mask"])

    def features_of(self, posterior: dict, set_mask: Tensor) -> Tensor:
        """Return the `features` [B, 2Z] of an `encode` output, for callers that also need the rest of it."""
        last = (set_mask.sum(dim=1) - 1).clamp(min=0)  # [B]
        index = last[:, None, None].expand(-1, 1, self.config.latent_dim)  # [B, 1, Z]

        def at_last(tensor: Tensor) -> Tensor:
            return tensor.gather(1, index).squeeze(1)  # [B, Z]

        has_sets = set_mask.any(dim=1, keepdim=True)  # [B, 1]
        mu = torch.where(has_sets, at_last(posterior["post_mu"]), posterior["prior_mu"][:, 0])
        logvar = torch.where(has_sets, at_last(posterior["post_logvar"]), posterior["prior_logvar"][:, 0])
        return torch.cat([mu, torch.exp(0.5 * logvar)], dim=-1)  # [B, 2Z]

    @staticmethod
    def active_units(post_mu: Tensor, set_mask: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> Tensor:
        """Return the fraction of latent dimensions whose posterior mean varies across valid sets.

        A dimension is active when the variance of post_mu [B, S, Z] over the valid
        sets of `set_mask` [B, S] exceeds `threshold` (Burda et al. 2016,
        "Importance Weighted Autoencoders"). Returns a scalar, 0 with fewer than two valid sets.
        """
        means = post_mu[set_mask]  # [M, Z]
        if means.shape[0] < 2:
            return post_mu.new_zeros(())
        return (means.var(dim=0, correction=0) > threshold).to(post_mu.dtype).mean()
