import math

import pytest
import torch

from seqsetvae.batch import PAD_CODE
from seqsetvae.config import ModelConfig
from seqsetvae.model.blocks import ISAB, PMA, TimeGapBias, causal_attention_allowed, key_padding_mask
from seqsetvae.model.core import EventEmbedding, SeqSetVAE, product_of_gaussians

VOCAB = 12
CONFIG = ModelConfig(d_model=16, latent_dim=4, n_inducing=3, n_heads=2, n_set_layers=2, n_seq_layers=2, dropout=0.0)


def make_batch(n_sets: list[int], max_sets: int = 5, max_events: int = 6, seed: int = 0) -> dict:
    """Build a random left-aligned batch in which subject b has n_sets[b] valid sets of 1..max_events events."""
    generator = torch.Generator().manual_seed(seed)
    b, s, n = len(n_sets), max_sets, max_events
    set_mask = torch.arange(s)[None] < torch.tensor(n_sets)[:, None]  # [B, S]
    counts = torch.randint(1, n + 1, (b, s), generator=generator)
    event_mask = (torch.arange(n) < counts[..., None]) & set_mask[..., None]  # [B, S, N]
    codes = torch.randint(2, VOCAB, (b, s, n), generator=generator).masked_fill(~event_mask, PAD_CODE)
    has_value = (torch.rand(b, s, n, generator=generator) < 0.7) & event_mask
    values = torch.randn(b, s, n, generator=generator).masked_fill(~has_value, 0.0)
    gaps = torch.rand(b, s, generator=generator) * 5.0
    gaps[:, 0] = 0.0
    set_times = gaps.cumsum(dim=1).masked_fill(~set_mask, 0.0)
    return {
        "codes": codes,
        "values": values,
        "has_value": has_value,
        "event_mask": event_mask,
        "set_times": set_times,
        "set_mask": set_mask,
    }


def make_model(config: ModelConfig = CONFIG, seed: int = 0) -> SeqSetVAE:
    torch.manual_seed(seed)
    return SeqSetVAE(config, VOCAB).eval()


def permute_events(batch: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(batch["codes"].shape, generator=generator).argsort(dim=-1)  # [B, S, N]
    permuted = dict(batch)
    for key in ("codes", "values", "has_value", "event_mask"):
        permuted[key] = batch[key].gather(-1, order)
    return permuted


def append_padding_events(batch: dict, extra: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    shape = (*batch["codes"].shape[:2], extra)
    padded = dict(batch)
    padded["codes"] = torch.cat([batch["codes"], torch.randint(0, VOCAB, shape, generator=generator)], dim=-1)
    padded["values"] = torch.cat([batch["values"], torch.randn(shape, generator=generator) * 10], dim=-1)
    padded["has_value"] = torch.cat([batch["has_value"], torch.rand(shape, generator=generator) < 0.5], dim=-1)
    padded["event_mask"] = torch.cat([batch["event_mask"], torch.zeros(shape, dtype=torch.bool)], dim=-1)
    return padded


def append_padding_sets(batch: dict, extra: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    b, _, n = batch["codes"].shape
    padded = dict(batch)
    padded["codes"] = torch.cat([batch["codes"], torch.randint(0, VOCAB, (b, extra, n), generator=generator)], 1)
    padded["values"] = torch.cat([batch["values"], torch.randn(b, extra, n, generator=generator)], 1)
    padded["has_value"] = torch.cat([batch["has_value"], torch.zeros(b, extra, n, dtype=torch.bool)], 1)
    padded["event_mask"] = torch.cat([batch["event_mask"], torch.zeros(b, extra, n, dtype=torch.bool)], 1)
    padded["set_times"] = torch.cat([batch["set_times"], torch.rand(b, extra, generator=generator) * 100], 1)
    padded["set_mask"] = torch.cat([batch["set_mask"], torch.zeros(b, extra, dtype=torch.bool)], 1)
    return padded


def test_set_encoder_invariant_to_event_order():
    model, batch = make_model(), make_batch([3, 5, 1])
    with torch.no_grad():
        expected = model.summarise_sets(batch)
        permuted = model.summarise_sets(permute_events(batch, seed=1))
    assert torch.allclose(permuted, expected, atol=1e-5)


def test_set_encoder_invariant_to_padding_events():
    model, batch = make_model(), make_batch([3, 5, 1])
    with torch.no_grad():
        expected = model.summarise_sets(batch)
        padded = model.summarise_sets(append_padding_events(batch, extra=4, seed=2))
    assert torch.allclose(padded, expected, atol=1e-5)


def test_set_encoder_invariant_to_interleaved_padding():
    model, batch = make_model(), make_batch([3, 5, 1])
    with torch.no_grad():
        expected = model.summarise_sets(batch)
        padded = model.summarise_sets(permute_events(append_padding_events(batch, extra=4, seed=2), seed=6))
    assert torch.allclose(padded, expected, atol=1e-5)


def test_set_encoder_module_ignores_padding_events():
    # Calls the set encoder directly, with stray codes and values under the padding mask.
    model, batch = make_model(), make_batch([5, 5])
    padded = append_padding_events(batch, extra=3, seed=7)

    def flat(tensors: dict) -> list:
        n = tensors["codes"].shape[-1]
        return [tensors[key].reshape(-1, n) for key in ("codes", "values", "has_value", "event_mask")]

    with torch.no_grad():
        expected = model.set_encoder(*flat(batch))
        summary = model.set_encoder(*flat(padded))
    assert torch.allclose(summary, expected, atol=1e-5)


def test_set_summaries_differ_between_sets():
    model, batch = make_model(), make_batch([3])
    with torch.no_grad():
        summary = model.summarise_sets(batch)
    assert not torch.allclose(summary[0, 0], summary[0, 1], atol=1e-3)


@pytest.mark.parametrize("key", ["post_mu", "post_logvar", "prior_mu", "prior_logvar"])
def test_padding_sets_leave_valid_outputs(key):
    model, batch = make_model(), make_batch([3, 5, 0])
    with torch.no_grad():
        expected = model.encode(batch)[key]
        padded = model.encode(append_padding_sets(batch, extra=3, seed=3))[key]
    valid = batch["set_mask"]
    assert torch.allclose(padded[:, :5][valid], expected[valid], atol=1e-5)


@pytest.mark.parametrize("key", ["loss", "recon", "kl_raw"])
def test_padding_sets_leave_losses(key):
    model, batch = make_model(), make_batch([3, 5, 0])
    with torch.no_grad():
        expected = model(batch, beta=0.5, free_bits=0.05)[key]
        padded = model(append_padding_sets(batch, extra=3, seed=3), beta=0.5, free_bits=0.05)[key]
    assert padded.item() == pytest.approx(expected.item(), abs=1e-5)


def change_sets_from(batch: dict, first: int, seed: int) -> dict:
    """Redraw codes, values and times of every set at index >= first."""
    other = make_batch([5, 5], seed=seed)
    changed = {key: tensor.clone() for key, tensor in batch.items()}
    for key in ("codes", "values", "has_value", "event_mask"):
        changed[key][:, first:] = other[key][:, first:]
    changed["set_times"][:, first:] = batch["set_times"][:, first - 1 : first] + 1.0 + other["set_times"][:, first:]
    return changed


@pytest.mark.parametrize("key", ["post_mu", "post_logvar", "prior_mu", "prior_logvar"])
def test_causal_earlier_sets_unchanged(key):
    model, batch = make_model(), make_batch([5, 5])
    with torch.no_grad():
        expected = model.encode(batch)[key]
        changed = model.encode(change_sets_from(batch, first=2, seed=4))[key]
    assert torch.allclose(changed[:, :2], expected[:, :2], atol=1e-6)


@pytest.mark.parametrize("key", ["post_mu", "prior_mu"])
def test_causal_later_sets_changed(key):
    # Guards the test above: the change does reach the sets from index 2 on.
    model, batch = make_model(), make_batch([5, 5])
    with torch.no_grad():
        expected = model.encode(batch)[key]
        changed = model.encode(change_sets_from(batch, first=2, seed=4))[key]
    assert not torch.allclose(changed[:, 2], expected[:, 2], atol=1e-4)


def change_set_events(batch: dict, index: int, seed: int) -> dict:
    """Redraw the events of set `index`, keeping its time."""
    other = make_batch([5, 5], seed=seed)
    changed = {key: tensor.clone() for key, tensor in batch.items()}
    for key in ("codes", "values", "has_value", "event_mask"):
        changed[key][:, index] = other[key][:, index]
    return changed


def test_prior_ignores_own_set():
    model, batch = make_model(), make_batch([5, 5])
    with torch.no_grad():
        expected = model.encode(batch)["prior_mu"]
        prior = model.encode(change_set_events(batch, index=2, seed=8))["prior_mu"]
    assert torch.allclose(prior[:, 2], expected[:, 2], atol=1e-6)


def test_posterior_uses_own_set():
    model, batch = make_model(), make_batch([5, 5])
    with torch.no_grad():
        expected = model.encode(batch)["post_mu"]
        posterior = model.encode(change_set_events(batch, index=2, seed=8))["post_mu"]
    assert not torch.allclose(posterior[:, 2], expected[:, 2], atol=1e-4)


def test_prior_depends_on_history():
    model, batch = make_model(), make_batch([5, 5])
    changed = {key: tensor.clone() for key, tensor in batch.items()}
    changed["codes"][:, 0] = torch.where(batch["event_mask"][:, 0], (batch["codes"][:, 0] - 1) % (VOCAB - 2) + 2, 0)
    with torch.no_grad():
        expected = model.encode(batch)["prior_mu"]
        prior = model.encode(changed)["prior_mu"]
    assert not torch.allclose(prior[:, 1], expected[:, 1], atol=1e-4)


WIDE_PRIOR = ModelConfig(
    d_model=16, latent_dim=4, n_inducing=3, n_heads=2, n_set_layers=2, n_seq_layers=2, seq_width=24, dropout=0.0
)


@pytest.mark.parametrize("key", ["post_mu", "prior_mu"])
def test_wide_prior_is_causal(key):
    model, batch = make_model(WIDE_PRIOR), make_batch([5, 5])
    with torch.no_grad():
        expected = model.encode(batch)[key]
        changed = model.encode(change_sets_from(batch, first=2, seed=4))[key]
    assert torch.allclose(changed[:, :2], expected[:, :2], atol=1e-6)
    assert not torch.allclose(changed[:, 2], expected[:, 2], atol=1e-4)


def test_wide_prior_widths():
    model, batch = make_model(WIDE_PRIOR), make_batch([5, 2])
    assert model.prior.project.weight.shape == (24, 16)
    assert model.prior.start_token.shape == (1, 1, 24)
    assert model.prior.head.linear.in_features == 24
    outputs = model(batch, beta=0.5, free_bits=0.0)
    assert_all_finite({key: value for key, value in outputs.items() if value.is_floating_point()})
    assert model.features(batch).shape == (2, 2 * WIDE_PRIOR.latent_dim)


def test_default_width_keeps_state_keys():
    # Checkpoints written before seq_width existed load into the default model.
    keys = set(make_model().state_dict())
    assert not any(key.startswith("prior.project") for key in keys)
    assert make_model(ModelConfig(**{**CONFIG.__dict__, "seq_width": CONFIG.d_model})).state_dict().keys() == keys


def test_wide_prior_encoder_round_trip():
    from seqsetvae.encoder import build_encoder

    model = make_model(WIDE_PRIOR, seed=1)
    encoder_state = {k: v for k, v in model.state_dict().items() if k.startswith(SeqSetVAE.encoder_state_prefixes)}
    assert "prior.project.weight" in encoder_state
    preprocessing = {"codes": [f"code{i}" for i in range(VOCAB - 2)]}
    loaded = build_encoder(dict(WIDE_PRIOR.__dict__), preprocessing, encoder_state, "model.safetensors")
    batch = make_batch([3, 5])
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(batch), model.features(batch))


def assert_all_finite(outputs: dict) -> None:
    for key, tensor in outputs.items():
        assert torch.isfinite(tensor).all(), f"{key} is not finite"


def test_empty_subject_forward_finite():
    model = make_model().train()
    outputs = model(make_batch([3, 0, 5]), beta=1.0, free_bits=0.05)
    assert_all_finite(outputs)


def test_empty_subject_gradients_finite():
    model = make_model().train()
    model(make_batch([3, 0, 5]), beta=1.0, free_bits=0.05)["loss"].backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), f"gradient of {name} is not finite"


def test_empty_subject_features_finite():
    assert torch.isfinite(make_model().features(make_batch([3, 0, 5]))).all()


def test_empty_batch_forward_finite():
    model = make_model().train()
    outputs = model(make_batch([0, 0]), beta=1.0, free_bits=0.05)
    assert_all_finite(outputs)


def test_bf16_autocast_losses_float32():
    model = make_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(make_batch([3, 0, 5]), beta=1.0, free_bits=0.05)
    for key in ("loss", "recon", "kl", "kl_raw"):
        assert outputs[key].dtype == torch.float32, key


def test_bf16_autocast_forward_finite():
    model = make_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(make_batch([3, 0, 5]), beta=1.0, free_bits=0.05)
    assert_all_finite(outputs)


def test_event_embedding_value_zero_differs_from_missing():
    embedding = make_model().set_encoder.embedding
    codes = torch.tensor([[5, 5]])
    values = torch.zeros(1, 2)
    has_value = torch.tensor([[True, False]])
    with torch.no_grad():
        embedded = embedding(codes, values, has_value)  # [1, 2, D]
    assert not torch.allclose(embedded[0, 0], embedded[0, 1], atol=1e-4)


def test_linear_value_embedding_is_affine():
    embedding = EventEmbedding(vocab_size=12, d_model=8, value_embedding="linear")
    codes = torch.tensor([[5, 5, 5]])
    values = torch.tensor([[0.0, 1.0, 3.0]])
    has_value = torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        embedded = embedding(codes, values, has_value)[0]  # [3, D]
    # Equal steps in value give equal steps in the embedding, which an MLP's GELU would bend.
    torch.testing.assert_close(embedded[2] - embedded[1], 2 * (embedded[1] - embedded[0]))
    assert len(embedding.value_mlp) == 1


def test_event_embedding_missing_value_gradients_finite():
    embedding = make_model().set_encoder.embedding
    codes = torch.tensor([[5, 5]])
    has_value = torch.tensor([[True, False]])
    embedding(codes, torch.tensor([[0.5, float("nan")]]), has_value).sum().backward()
    assert torch.isfinite(embedding.value_mlp[0].weight.grad).all()


def test_features_shape():
    assert make_model().features(make_batch([3, 5, 1])).shape == (3, 2 * CONFIG.latent_dim)


def test_features_std_positive():
    features = make_model().features(make_batch([3, 5, 1]))
    assert (features[:, CONFIG.latent_dim :] > 0).all()


def test_features_match_posterior_at_last_set():
    model, batch = make_model(), make_batch([3, 5, 1])
    with torch.no_grad():
        encoded = model.encode(batch)
        features = model.features(batch)
    rows = torch.arange(3)
    last = torch.tensor([2, 4, 0])
    expected_mu = encoded["post_mu"][rows, last]
    expected_std = torch.exp(0.5 * encoded["post_logvar"][rows, last])
    assert torch.allclose(features, torch.cat([expected_mu, expected_std], dim=-1))


def test_features_empty_subject_uses_prior_at_start():
    model, batch = make_model(), make_batch([3, 0])
    with torch.no_grad():
        encoded = model.encode(batch)
        features = model.features(batch)
    expected = torch.cat([encoded["prior_mu"][1, 0], torch.exp(0.5 * encoded["prior_logvar"][1, 0])])
    assert torch.allclose(features[1], expected)


def test_features_empty_subject_ignores_padded_times():
    model, batch = make_model(), make_batch([3, 0])
    stray = {key: tensor.clone() for key, tensor in batch.items()}
    stray["set_times"][1] = torch.tensor([7.0, 9.0, 11.0, 13.0, 15.0])
    with torch.no_grad():
        expected = model.features(batch)
        features = model.features(stray)
    assert torch.allclose(features, expected)


def test_features_do_not_call_decoder(monkeypatch):
    model = make_model()

    def fail(*args, **kwargs):
        raise AssertionError("features called the decoder")

    monkeypatch.setattr(model.decoder, "forward", fail)
    assert model.features(make_batch([3, 5, 1])).shape == (3, 2 * CONFIG.latent_dim)


def test_decoder_patch_is_seen_by_forward(monkeypatch):
    # Guards the test above: the patch does intercept decoder calls.
    model = make_model()

    def fail(*args, **kwargs):
        raise AssertionError("decoder called")

    monkeypatch.setattr(model.decoder, "forward", fail)
    with pytest.raises(AssertionError, match="decoder called"):
        model(make_batch([3]), beta=1.0, free_bits=0.0)


def clamped_model() -> SeqSetVAE:
    config = ModelConfig(d_model=16, latent_dim=4, n_inducing=3, n_heads=2, logvar_min=-0.5, logvar_max=0.25)
    model = make_model(config)
    with torch.no_grad():
        for head in (model.evidence_head, model.prior.head):
            head.linear.weight.mul_(100.0)
            head.linear.bias.mul_(100.0)
    return model


@pytest.mark.parametrize("key", ["post_logvar", "prior_logvar", "evidence_logvar"])
def test_logvar_clamp_lower_bound(key):
    with torch.no_grad():
        logvar = clamped_model().encode(make_batch([5, 5, 2]))[key]
    assert logvar.min().item() >= -0.5


@pytest.mark.parametrize("key", ["post_logvar", "prior_logvar", "evidence_logvar"])
def test_logvar_clamp_upper_bound(key):
    with torch.no_grad():
        logvar = clamped_model().encode(make_batch([5, 5, 2]))[key]
    assert logvar.max().item() <= 0.25


def test_logvar_clamp_reached():
    # Guards the two tests above: the scaled heads do produce values past the bounds.
    with torch.no_grad():
        logvar = clamped_model().encode(make_batch([5, 5, 2]))["evidence_logvar"]
    assert (logvar == -0.5).any()
    assert (logvar == 0.25).any()


def test_product_of_gaussians_by_hand():
    # N(0, 1) * N(2, 1) is proportional to N(1, 1/2).
    mu, logvar = product_of_gaussians(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(2.0), torch.tensor(0.0))
    assert mu.item() == pytest.approx(1.0)
    assert logvar.item() == pytest.approx(math.log(0.5))


def test_product_of_gaussians_weighs_by_precision():
    # Precisions 4 and 1: mean (4 * 1 + 1 * 6) / 5 = 2.
    mu, _ = product_of_gaussians(
        torch.tensor(1.0), torch.tensor(math.log(0.25)), torch.tensor(6.0), torch.tensor(0.0)
    )
    assert mu.item() == pytest.approx(2.0, rel=1e-6)


def test_forward_eval_uses_posterior_mean():
    model, batch = make_model(), make_batch([3, 5])
    with torch.no_grad():
        first = model(batch, beta=1.0, free_bits=0.0)["recon"]
        second = model(batch, beta=1.0, free_bits=0.0)["recon"]
    assert first.item() == second.item()


def test_forward_train_samples_latents():
    model, batch = make_model().train(), make_batch([3, 5])
    with torch.no_grad():
        first = model(batch, beta=1.0, free_bits=0.0)["recon"]
        second = model(batch, beta=1.0, free_bits=0.0)["recon"]
    assert first.item() != second.item()


def test_forward_loss_combines_parts():
    with torch.no_grad():
        outputs = make_model()(make_batch([3, 5]), beta=0.3, free_bits=0.05)
    weight = make_model().config.history_weight
    assert weight > 0
    assert outputs["recon_history"].item() > 0
    recon = outputs["recon_presence"] + outputs["recon_value"] + weight * outputs["recon_history"]
    assert outputs["loss"].item() == pytest.approx((recon + 0.3 * outputs["kl"]).item(), rel=1e-6)


def test_loss_decreases_with_training():
    model, batch = make_model(seed=1), make_batch([4, 2, 5], seed=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = model(batch, beta=0.1, free_bits=0.0)["loss"].item()
    model.train()
    for _ in range(25):
        optimizer.zero_grad()
        model(batch, beta=0.1, free_bits=0.0)["loss"].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(batch, beta=0.1, free_bits=0.0)["loss"].item()
    assert after < 0.8 * before


def test_active_units_counts_varying_dimensions():
    post_mu = torch.zeros(2, 3, 4)
    post_mu[..., 0] = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    post_mu[1, 2, 1:] = 50.0  # padded set: ignored
    set_mask = torch.tensor([[True, True, True], [True, True, False]])
    assert SeqSetVAE.active_units(post_mu, set_mask).item() == pytest.approx(0.25)


def test_active_units_threshold():
    post_mu = torch.zeros(1, 2, 2)
    post_mu[0, :, 0] = torch.tensor([0.0, 0.1])  # variance 0.0025
    post_mu[0, :, 1] = torch.tensor([0.0, 0.4])  # variance 0.04
    assert SeqSetVAE.active_units(post_mu, torch.ones(1, 2, dtype=torch.bool)).item() == pytest.approx(0.5)


def test_active_units_without_sets_is_zero():
    assert SeqSetVAE.active_units(torch.ones(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def test_encoder_state_prefixes_cover_all_but_decoder():
    keys = make_model().state_dict().keys()
    prefixes = SeqSetVAE.encoder_state_prefixes
    decoders = ("decoder.", "history_decoder.")
    assert any(key.startswith("history_decoder.") for key in keys)
    uncovered = [key for key in keys if not key.startswith(prefixes) and not key.startswith(decoders)]
    assert uncovered == []


def test_encoder_state_prefixes_exclude_decoder():
    assert not any(prefix.startswith(("decoder", "history")) for prefix in SeqSetVAE.encoder_state_prefixes)


def test_rejects_mismatched_shapes():
    batch = make_batch([3, 5])
    batch["values"] = batch["values"][:, :, :-1]
    with pytest.raises(ValueError, match=r"values: expected shape \(2, 5, 6\), got \(2, 5, 5\)"):
        make_model().encode(batch)


def test_rejects_out_of_vocabulary_code():
    batch = make_batch([3, 5])
    batch["codes"][0, 0, 0] = VOCAB
    with pytest.raises(ValueError, match=f"codes: expected indices in \\[1, {VOCAB}\\) at real events"):
        make_model().encode(batch)


def test_rejects_pad_code_at_real_event():
    batch = make_batch([3, 5])
    batch["codes"][0, 0, 0] = PAD_CODE
    with pytest.raises(ValueError, match="got min 0"):
        make_model().encode(batch)


def test_rejects_gap_in_set_mask():
    batch = make_batch([3, 5])
    batch["set_mask"][0, 1] = False
    with pytest.raises(ValueError, match="set_mask: expected valid sets left-aligned"):
        make_model().encode(batch)


def test_rejects_missing_key():
    batch = make_batch([3])
    del batch["set_times"]
    with pytest.raises(ValueError, match="missing \\['set_times'\\]"):
        make_model().encode(batch)


def test_key_padding_mask_opens_empty_rows():
    key_mask = torch.tensor([[True, False, False], [False, False, False]])
    assert key_padding_mask(key_mask)[:, 0, 0].tolist() == [[True, False, False], [True, True, True]]


def test_causal_mask_is_lower_triangular():
    allowed = causal_attention_allowed(torch.ones(1, 4, dtype=torch.bool))[0, 0]
    assert torch.equal(allowed, torch.ones(4, 4, dtype=torch.bool).tril())


def test_causal_mask_keeps_diagonal_of_padding():
    allowed = causal_attention_allowed(torch.tensor([[True, False, False], [False, False, False]]))[:, 0]
    assert allowed.any(dim=-1).all()


def test_causal_mask_hides_padded_keys():
    allowed = causal_attention_allowed(torch.tensor([[True, False, False]]))[0, 0]
    assert allowed[2].tolist() == [True, False, True]


def test_pma_empty_set_pools_to_zero():
    torch.manual_seed(0)
    pooled = PMA(d_model=8, n_heads=2)(torch.randn(2, 3, 8), torch.tensor([[True, True, False], [False] * 3]))
    assert torch.equal(pooled[1], torch.zeros(8))


def test_isab_output_zero_at_padding():
    torch.manual_seed(0)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    output = ISAB(d_model=8, n_heads=2, n_inducing=3)(torch.randn(2, 3, 8), mask)
    assert torch.equal(output[~mask], torch.zeros(3, 8))


def test_time_gap_bias_by_hand():
    bias_module = TimeGapBias(n_heads=2)
    with torch.no_grad():
        bias_module.slope.copy_(torch.tensor([-1.0, 0.5]))
        bias = bias_module(torch.tensor([[0.0, 1.0, 3.0]]), torch.ones(1, 3, dtype=torch.bool))
    assert bias[0, 0, 2, 0].item() == pytest.approx(-math.log(4.0))
    assert bias[0, 1, 2, 1].item() == pytest.approx(0.5 * math.log(3.0))
    assert bias[0, 0, 1, 1].item() == 0.0


def test_time_gap_bias_masks_future():
    bias = TimeGapBias(n_heads=2)(torch.tensor([[0.0, 1.0, 3.0]]), torch.ones(1, 3, dtype=torch.bool))
    assert torch.isneginf(bias[0, :, 0, 1:]).all()


def test_thresholds_widen_history_decoder():
    config = ModelConfig(**{**CONFIG.__dict__, "history_thresholds": 3})
    model, plain = make_model(config), make_model()
    assert model.history_thresholds.tolist() == [-2.0, 0.0, 2.0]
    z = torch.zeros(2, 5, config.latent_dim)
    assert model.history_decoder(z).shape == (2, 5, VOCAB, 6 + 4 * 3)
    assert plain.history_decoder(z).shape == (2, 5, VOCAB, 6)


def test_encoder_loads_without_thresholds_key():
    from seqsetvae.encoder import build_encoder

    model = make_model(ModelConfig(**{**CONFIG.__dict__, "history_thresholds": 3}), seed=1)
    encoder_state = {k: v for k, v in model.state_dict().items() if k.startswith(SeqSetVAE.encoder_state_prefixes)}
    # A config saved before the option existed has no history_thresholds key.
    old_config = {key: value for key, value in CONFIG.__dict__.items() if key != "history_thresholds"}
    preprocessing = {"codes": [f"code{i}" for i in range(VOCAB - 2)]}
    loaded = build_encoder(old_config, preprocessing, encoder_state, "model.safetensors")
    batch = make_batch([3, 5])
    with torch.no_grad():
        assert not torch.allclose(make_model().features(batch), model.features(batch))
        torch.testing.assert_close(loaded.features(batch), model.features(batch))
    assert loaded.history_thresholds.numel() == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"history_thresholds": -1}, "expected a value >= 0"),
        ({"history_thresholds": 3, "history_weight": 0.0}, "needs the history decoder"),
        ({"seq_width": -4}, "seq_width: invalid width -4"),
        ({"seq_width": 30, "n_heads": 4}, "seq_width: expected a multiple"),
    ],
)
def test_invalid_model_config_rejected(overrides, message):
    from seqsetvae.errors import UserInputError

    with pytest.raises(UserInputError, match=message):
        ModelConfig(**overrides)
