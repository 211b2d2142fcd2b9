"""Load pretrained weights safely and map their keys onto the encoder.

Every file is read with `torch.load(weights_only=True)`, which rejects pickled
objects other than tensors and plain containers, so a planted pickle cannot run
code. A pretrained checkpoint is either a Lightning checkpoint written by
`seqsetvae pretrain` or the `pretrained.pt` file it exports; both are dicts
with `state_dict` and `hyper_parameters`.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from seqsetvae.errors import UserInputError

logger = logging.getLogger(__name__)

# Prefixes that wrappers add to parameter names: DDP (`module.`), torch.compile
# (`_orig_mod.`) and a LightningModule attribute (`model.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def load_weights_only(path: str | Path) -> dict[str, Any]:
    """Read a torch file without unpickling arbitrary objects.

    Raises:
        UserInputError: the file is missing, corrupt, or contains objects other than weights.
    """
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"{file}: checkpoint not found; pass the path of a pretraining checkpoint")
    try:
        content = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[0][:200]
        raise UserInputError(
            f"{file}: rejected, the file contains objects other than weights ({reason}); "
            "use a checkpoint written by seqsetvae"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        reason = str(error).splitlines()[0][:200]
        raise UserInputError(f"{file}: cannot read checkpoint ({reason}); the file may be truncated") from None
    if not isinstance(content, dict) or "state_dict" not in content:
        raise UserInputError(f"{file}: expected a dict with 'state_dict', got {type(content).__name__}")
    return content


def strip_wrapper_prefixes(key: str) -> str:
    """Remove every leading wrapper prefix from a parameter name."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def map_encoder_state(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], encoder_prefixes: tuple[str, ...], origin: str
) -> dict[str, torch.Tensor]:
    """Map a pretrained state dict onto the encoder keys of `target`.

    Keys are matched after removing wrapper prefixes. Logs the number of mapped
    keys and names every skipped one.

    Raises:
        UserInputError: an encoder key of `target` is missing from `source` or has another shape.
    """
    renamed = {strip_wrapper_prefixes(key): value for key, value in source.items()}
    wanted = [key for key in target if key.startswith(encoder_prefixes)]
    missing = [key for key in wanted if key not in renamed]
    if missing:
        raise UserInputError(
            f"{origin}: encoder keys missing from the pretrained weights: {', '.join(missing)}; "
            "the checkpoint does not match this model configuration"
        )
    wrong_shape = [
        f"{key} (expected {tuple(target[key].shape)}, got {tuple(renamed[key].shape)})"
        for key in wanted
        if renamed[key].shape != target[key].shape
    ]
    if wrong_shape:
        raise UserInputError(f"{origin}: encoder weights with the wrong shape: {'; '.join(wrong_shape)}")
    skipped = sorted(set(renamed) - set(wanted))
    logger.info("Mapped %d encoder keys from %s; skipped %d keys", len(wanted), origin, len(skipped))
    for key in skipped:
        logger.info("Skipped pretrained key %s", key)
    return {key: renamed[key] for key in wanted}


def pretrained_hparams(content: dict[str, Any], origin: str) -> dict[str, Any]:
    """Return the model config and preprocessing stored with a pretraining checkpoint."""
    hparams = content.get("hyper_parameters") or {}
    for key in ("model_config", "preprocessing"):
        if key not in hparams:
            raise UserInputError(
                f"{origin}: hyper_parameters has no '{key}'; expected a checkpoint written by `seqsetvae pretrain`"
            )
    return hparams
