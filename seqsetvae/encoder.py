"""Build the frozen encoder from pretrained weights and compute `[mu, std]` features."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seqsetvae.cache import SplitCache
from seqsetvae.checkpoint import load_weights_only, map_encoder_state, pretrained_hparams
from seqsetvae.config import ModelConfig
from seqsetvae.data import SetSequenceDataset, length_sorted_batches
from seqsetvae.model.core import SeqSetVAE
from seqsetvae.preprocess import Preprocessor

logger = logging.getLogger(__name__)


@dataclass
class PretrainedEncoder:
    """A frozen encoder with the configuration and preprocessing it was trained with."""

    model: SeqSetVAE
    model_config: dict
    preprocessing: dict

    @property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor.from_dict(self.preprocessing)


def build_encoder(model_config: dict, preprocessing: dict, state: dict[str, torch.Tensor], origin: str) -> SeqSetVAE:
    """Create a SeqSetVAE, load its encoder weights through the key mapping, and freeze it."""
    model = SeqSetVAE(ModelConfig(**model_config), vocab_size=len(preprocessing["codes"]) + 2)
    mapped = map_encoder_state(state, model.state_dict(), SeqSetVAE.encoder_state_prefixes, origin)
    # strict=False only because decoder weights are not needed; map_encoder_state
    # already raised if any encoder key is missing.
    model.load_state_dict(mapped, strict=False)
    model.requires_grad_(False)
    model.eval()
    return model


def load_pretrained_encoder(path: str | Path) -> PretrainedEncoder:
    """Load a pretraining checkpoint (Lightning `.ckpt` or `pretrained.pt`) without unpickling objects."""
    content = load_weights_only(path)
    hparams = pretrained_hparams(content, str(path))
    model = build_encoder(hparams["model_config"], hparams["preprocessing"], content["state_dict"], str(path))
    return PretrainedEncoder(model, dict(hparams["model_config"]), dict(hparams["preprocessing"]))


@torch.no_grad()
def compute_features(
    model: SeqSetVAE, cache: SplitCache, max_sets: int, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Encode every label of a cached split once.

    Returns `features` [n, 2Z] float32, `label` [n] bool, `subject_id` [n] and
    `prediction_time_us` [n] int64, in the cache's label order.
    """
    model.eval()
    dataset = SetSequenceDataset(cache, max_sets, labelled=True)
    features = np.zeros((len(dataset), 2 * model.config.latent_dim), dtype=np.float32)
    n_batches = math.ceil(len(dataset) / batch_size)
    for batch_index, (positions, batch) in enumerate(length_sorted_batches(dataset, batch_size)):
        features[positions] = model.features(batch).float().cpu().numpy()
        if (batch_index + 1) % 20 == 0 or batch_index + 1 == n_batches:
            logger.info("Encoded %d/%d batches of split '%s'", batch_index + 1, n_batches, cache.path.name)
    labels = cache.labels
    return {
        "features": features,
        "label": labels["value"].astype(bool),
        "subject_id": np.asarray(cache.subject_ids)[labels["subject_pos"]].astype(np.int64),
        "prediction_time_us": labels["prediction_time_us"].astype(np.int64),
    }


def save_features(features: dict[str, np.ndarray], path: str | Path) -> None:
    """Write features as an uncompressed npz (arrays only, no pickled objects), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + ".tmp.npz")
    np.savez(temporary, **features)
    temporary.replace(path)


def load_features(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as content:
        return {key: content[key] for key in content.files}
