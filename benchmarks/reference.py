"""A straightforward pretraining loss that encodes one set at a time in Python loops, for checking and timing.

It calls the submodules of a `SeqSetVAE` with its own weights: the set encoder
on each set's real events alone (no padding), the prior on each subject's
sequence alone, and the decoders on each set latent. The running statistics
that the history decoder predicts come from `history_targets` on the
subject's own sets, whose loop reference is in the tests. The reductions are those
of `SeqSetVAE.forward`: reconstruction terms averaged over the valid sets of
the batch, and the KL averaged over valid sets per latent dimension before
free bits. In eval mode, where z is the posterior mean, both give the same
loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqsetvae.losses import gaussian_kl, history_loss, history_targets, reconstruction_losses, set_targets
from seqsetvae.model.core import SeqSetVAE, product_of_gaussians


def encode_one_set(model: SeqSetVAE, codes: Tensor, values: Tensor, has_value: Tensor) -> Tensor:
    """Summarise the real events of one set, each input [N], to [1, D]."""
    encoder = model.set_encoder
    mask = torch.ones(1, len(codes), dtype=torch.bool)  # [1, N]
    x = encoder.embedding(codes[None], values[None], has_value[None])  # [1, N, D]
    for layer in encoder.layers:
        x = layer(x, mask)
    return encoder.pool(x, mask)  # [1, D]


def reference_loss(model: SeqSetVAE, batch: dict, beta: float, free_bits: float) -> Tensor:
    """Return recon + beta * KL of `batch`, computed subject by subject and set by set."""
    if model.training:
        raise ValueError("expected the model in eval mode, where z is the posterior mean; call model.eval() first")
    config = model.config
    # Sums over sets are kept in float64, so the reference adds no rounding of its own to the comparison.
    presence_total = value_total = history_total = torch.zeros((), dtype=torch.float64)
    kl_total = torch.zeros(config.latent_dim, dtype=torch.float64)
    n_valid_sets = 0
    for b in range(batch["codes"].shape[0]):
        n_sets = int(batch["set_mask"][b].sum())
        if n_sets == 0:
            continue
        summaries = []
        for t in range(n_sets):
            real = batch["event_mask"][b, t]
            summaries.append(
                encode_one_set(model, batch["codes"][b, t][real], batch["values"][b, t][real], batch["has_value"][b, t][real])
            )
        summary = torch.cat(summaries)[None]  # [1, S_b, D]

        evidence_mu, evidence_logvar = model.evidence_head(summary)
        set_times = batch["set_times"][b, :n_sets][None]  # [1, S_b]
        prior_mu, prior_logvar = model.prior(summary, set_times, torch.ones(1, n_sets, dtype=torch.bool))
        post_mu, post_logvar = product_of_gaussians(evidence_mu, evidence_logvar, prior_mu, prior_logvar)
        post_logvar = post_logvar.clamp(config.logvar_min, config.logvar_max)

        subject = {key: batch[key][b : b + 1, :n_sets] for key in ("codes", "values", "has_value", "event_mask")}
        history = history_targets(set_targets(**subject, vocab_size=model.vocab_size), model.history_thresholds)
        for t in range(n_sets):
            if model.history_decoder is not None:
                at_t = {key: value[:, t : t + 1] for key, value in history.items()}
                prediction = model.history_decoder(post_mu[:, t : t + 1])
                history_total = history_total + history_loss(prediction, at_t, torch.ones(1, 1, dtype=torch.bool))
            presence_logits, value_pred = model.decoder(post_mu[:, t : t + 1])  # [1, 1, V] each
            one_set = {key: batch[key][b : b + 1, t : t + 1] for key in ("codes", "values", "has_value", "event_mask")}
            targets = set_targets(**one_set, vocab_size=model.vocab_size)
            presence, value = reconstruction_losses(presence_logits, value_pred, targets, torch.ones(1, 1, dtype=torch.bool))
            presence_total = presence_total + presence
            value_total = value_total + value
            kl_total = kl_total + gaussian_kl(
                post_mu[0, t], post_logvar[0, t], prior_mu[0, t], prior_logvar[0, t]
            )  # [Z]
        n_valid_sets += n_sets

    n_valid_sets = max(n_valid_sets, 1)
    recon = (presence_total + value_total + config.history_weight * history_total) / n_valid_sets
    kl = (kl_total / n_valid_sets).clamp(min=free_bits).sum()
    return (recon + beta * kl).float()
