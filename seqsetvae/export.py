"""A self-contained model directory that loads without Ray or pickles.

Layout:

    encoder.safetensors     frozen encoder weights (no decoder)
    head.safetensors        the linear head
    config.json             model_config, data_config, finetune_config (the chosen hyperparameters)
    preprocessing.json      vocabulary and normalisation statistics fitted on the train split
    metrics.json            validation metrics of the chosen head
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from seqsetvae.config import DataConfig
from seqsetvae.encoder import PretrainedEncoder, build_encoder
from seqsetvae.errors import UserInputError
from seqsetvae.model.core import SeqSetVAE
from seqsetvae.preprocess import Preprocessor

logger = logging.getLogger(__name__)

EXPORT_FILES = ("encoder.safetensors", "head.safetensors", "config.json", "preprocessing.json", "metrics.json")


def export_model(
    encoder: PretrainedEncoder,
    head_state: dict[str, torch.Tensor],
    data_config: DataConfig,
    finetune_config: dict,
    metrics: dict,
    out_dir: str | Path,
) -> Path:
    """Write the export directory; it is built under a temporary name and renamed into place."""
    target = Path(out_dir).resolve()
    staging = target.with_name(target.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    encoder_state = {
        key: value.detach().cpu().contiguous()
        for key, value in encoder.model.state_dict().items()
        if key.startswith(SeqSetVAE.encoder_state_prefixes)
    }
    save_file(encoder_state, str(staging / "encoder.safetensors"))
    save_file({key: value.detach().cpu().contiguous() for key, value in head_state.items()}, str(staging / "head.safetensors"))
    config = {
        "model_config": encoder.model_config,
        "data_config": asdict(data_config),
        "finetune_config": finetune_config,
    }
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    (staging / "preprocessing.json").write_text(json.dumps(encoder.preprocessing))
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))

    old = target.with_name(target.name + ".old")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        target.replace(old)
    staging.replace(target)
    if old.exists():
        shutil.rmtree(old)
    logger.info("Exported model to %s", target)
    return target


@dataclass
class ExportedModel:
    encoder: SeqSetVAE
    head: nn.Linear
    preprocessor: Preprocessor
    data_config: DataConfig
    config: dict

    @torch.no_grad()
    def predict_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return logits [B] for a packed batch."""
        return self.head(self.encoder.features(batch)).squeeze(-1)


def load_export(directory: str | Path) -> ExportedModel:
    """Load an export directory written by `export_model`."""
    root = Path(directory)
    missing = [name for name in EXPORT_FILES if not (root / name).is_file()]
    if missing:
        raise UserInputError(
            f"{root}: not a seqsetvae export, missing {', '.join(missing)}; pass the export directory of a run"
        )
    config = json.loads((root / "config.json").read_text())
    preprocessing = json.loads((root / "preprocessing.json").read_text())
    encoder = build_encoder(
        config["model_config"], preprocessing, load_file(str(root / "encoder.safetensors")), str(root)
    )
    head_state = load_file(str(root / "head.safetensors"))
    head = nn.Linear(head_state["weight"].shape[1], 1)
    head.load_state_dict(head_state)
    head.eval()
    return ExportedModel(
        encoder=encoder,
        head=head,
        preprocessor=Preprocessor.from_dict(preprocessing),
        data_config=DataConfig(**config["data_config"]),
        config=config,
    )
