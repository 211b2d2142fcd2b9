"""The head's feature standardisation, and its folding into one linear layer on raw `[mu, std]`."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from seqsetvae.config import FinetuneConfig, ModelConfig
from seqsetvae.head import train_head
from seqsetvae.lit import FinetuneModule

MODEL = ModelConfig(d_model=16, latent_dim=4, n_inducing=4, n_heads=2, n_set_layers=1, n_seq_layers=1)
PREPROCESSING = {"codes": [f"C{i}" for i in range(10)]}


def folded_linear(module: FinetuneModule) -> nn.Linear:
    state = module.head_state()
    linear = nn.Linear(state["weight"].shape[1], 1)
    linear.load_state_dict(state)
    return linear


def test_folded_head_gives_the_same_logits():
    generator = np.random.default_rng(0)
    scales = np.array([1e-3, 1e-2, 0.1, 1.0, 3.0, 10.0, 100.0, 0.5])
    features = (generator.normal(size=(500, 8)) * scales + generator.normal(size=8)).astype(np.float32)
    module = FinetuneModule(asdict(MODEL), asdict(FinetuneConfig()), PREPROCESSING, 0.2, with_encoder=False)
    module.set_feature_scaling(features)
    torch.nn.init.normal_(module.head.weight)
    torch.nn.init.normal_(module.head.bias)
    raw = torch.tensor(features)
    with torch.no_grad():
        expected = module.logits(raw)
        folded = folded_linear(module)(raw).squeeze(-1)
    assert torch.allclose(folded, expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(module.feature_scale.numpy(), features.std(axis=0), rtol=1e-4)


def test_constant_feature_keeps_unit_scale():
    features = np.random.default_rng(1).normal(size=(100, 8)).astype(np.float32)
    features[:, 3] = 7.0
    module = FinetuneModule(asdict(MODEL), asdict(FinetuneConfig()), PREPROCESSING, 0.2, with_encoder=False)
    module.set_feature_scaling(features)
    assert module.feature_scale[3] == 1.0
    assert module.feature_mean[3] == 7.0
    assert torch.isfinite(module.head_state()["weight"]).all()


def synthetic_split(n: int, seed: int) -> dict[str, np.ndarray]:
    """Labels that depend on one feature a thousand times narrower than seven noise features."""
    generator = np.random.default_rng(seed)
    signal = generator.normal(size=n)
    noise = generator.normal(size=(n, 7))
    label = signal + 0.3 * generator.normal(size=n) > 1.0
    features = np.column_stack([1e-3 * signal, 5.0 * noise]).astype(np.float32)
    return {"features": features, "label": label}


def test_standardised_head_uses_a_narrow_feature():
    train, val = synthetic_split(2000, 0), synthetic_split(1000, 1)
    config = FinetuneConfig(max_epochs=5, head_lr=3e-3, focal_gamma=0.0)
    module = train_head(train, val, config, asdict(MODEL), PREPROCESSING)
    with torch.no_grad():
        scores = folded_linear(module)(torch.tensor(val["features"])).squeeze(-1).numpy()
    # The exported layer, on raw features, ranks the tuning split by the narrow feature.
    assert roc_auc_score(val["label"], scores) > 0.9
    np.testing.assert_allclose(module.feature_mean.numpy(), train["features"].mean(axis=0), atol=1e-5)
