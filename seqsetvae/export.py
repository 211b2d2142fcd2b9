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
from safetensors import SafetensorError
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
    """Write the export directory; it is built under a temporary name and renamed into place.

    A crash while writing leaves the previous export in place. The swap is two
    renames: a crash between them leaves the previous export at `<out_dir>.old`,
    and the next export_model call moves it back first.
    """
    target = Path(out_dir).resolve()
    staging = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    if old.exists() and not target.exists():
        old.replace(target)
        logger.warning("Restored the previous export from %s, which an interrupted export left there", old)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        _write_export(staging, encoder, head_state, data_config, finetune_config, metrics)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        target.replace(old)
    staging.replace(target)
    if old.exists():
        shutil.rmtree(old)
    logger.info("Exported model to %s", target)
    return target


def _write_export(
    staging: Path,
    encoder: PretrainedEncoder,
    head_state: dict[str, torch.Tensor],
    data_config: DataConfig,
    finetune_config: dict,
    metrics: dict,
) -> None:
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


def _read_export_file(path: Path, reader):
    """Return reader(path), turning a corrupt or unreadable file into one UserInputError line."""
    try:
        return reader(path)
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserInputError(f"{path}: cannot read this export file ({reason}); export the model again") from None


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
    """Load an export directory written by `export_model`.

    Weights are read with safetensors and settings with json, so no file of
    the directory can run code when loaded.

    Raises:
        UserInputError: the directory is not a complete export, or a file is corrupt.
    """
    root = Path(directory)
    interrupted = root.with_name(root.name + ".old")
    if not root.exists() and interrupted.is_dir():
        raise UserInputError(
            f"{root}: not found, but {interrupted} contains the export before an interrupted one; "
            "rename it back or export again"
        )
    missing = [name for name in EXPORT_FILES if not (root / name).is_file()]
    if missing:
        raise UserInputError(
            f"{root}: not a seqsetvae export, missing {', '.join(missing)}; pass the export directory of a run"
        )
    config = _read_export_file(root / "config.json", lambda path: json.loads(path.read_text()))
    preprocessing = _read_export_file(root / "preprocessing.json", lambda path: json.loads(path.read_text()))
    encoder_state = _read_export_file(root / "encoder.safetensors", lambda path: load_file(str(path)))
    encoder = build_encoder(config["model_config"], preprocessing, encoder_state, str(root))
    head_state = _read_export_file(root / "head.safetensors", lambda path: load_file(str(path)))
    if set(head_state) != {"weight", "bias"}:
        raise UserInputError(
            f"{root / 'head.safetensors'}: expected the tensors weight and bias of a linear head, "
            f"got {', '.join(sorted(head_state)) or 'none'}; export the model again"
        )
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
