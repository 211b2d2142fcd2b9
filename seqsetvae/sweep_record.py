"""The record a sweep keeps in its storage, and the export of its best head from that storage alone.

Before the first trial, a sweep writes `seqsetvae_sweep.json` and a copy of the
pretrained encoder (`pretrained.pt`) into its Tune experiment directory, where
Tune writes the trial checkpoints too. When the sweep finishes, the record
gains the path of the best checkpoint. `seqsetvae best` reads only these
files, so the best model can be exported later from the storage alone: a
local path, a `file://` URI, or any URI that pyarrow.fs opens (`s3://`, `gs://`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from seqsetvae.config import DataConfig, FinetuneConfig
from seqsetvae.encoder import load_pretrained_encoder
from seqsetvae.errors import UserInputError
from seqsetvae.export import export_model
from seqsetvae.head import HEAD_FILE, load_head_state
from seqsetvae.storage import download, exists, filesystem_and_path, join_location, read_text, upload_file, write_text

logger = logging.getLogger(__name__)

RECORD_FILE = "seqsetvae_sweep.json"
PRETRAINED_COPY = "pretrained.pt"
RECORD_FORMAT = "seqsetvae-sweep/1"
# Each trial checkpoint contains the head and this file with its params and metrics.
PARAMS_FILE = "params.json"

# Subdirectories searched for the record below the location given to
# `seqsetvae best`: the Tune experiment directory itself, the --storage of
# `tune`, the --storage of `run`, and the --out directories of `tune` and `run`
# when they had no --storage.
SEARCH_SUBDIRS = ("", "sweep", "sweep/sweep", "ray_results/sweep", "sweep/ray_results/sweep")


def start_record(
    experiment: str,
    pretrained_ckpt: str | Path,
    data_config: DataConfig,
    finetune_config: FinetuneConfig,
    metric: str,
) -> None:
    """Copy the pretrained encoder into the experiment directory and write the record without a best head."""
    upload_file(pretrained_ckpt, join_location(experiment, PRETRAINED_COPY))
    record = {
        "format": RECORD_FORMAT,
        "metric": metric,
        "mode": "max",
        "pretrained": PRETRAINED_COPY,
        "pretrained_sha256": _sha256(pretrained_ckpt),
        "data_config": asdict(data_config),
        "finetune_config": asdict(finetune_config),
        "best": None,
    }
    write_text(join_location(experiment, RECORD_FILE), json.dumps(record, indent=2))
    logger.info("Sweep record and pretrained encoder written to %s", experiment)


def finish_record(experiment: str, checkpoint_path: str, saved: dict[str, Any], n_trials: int) -> None:
    """Add the best checkpoint, as a path relative to the experiment directory, to the record.

    `checkpoint_path` is the path Tune reports, inside the storage's filesystem
    or as a URI. `saved` is the checkpoint's params.json (`params` and `metrics`).
    """
    record = _read_record(experiment)
    _, experiment_path = filesystem_and_path(experiment)
    if "://" in checkpoint_path:
        _, checkpoint_path = filesystem_and_path(checkpoint_path)
    relative = PurePosixPath(checkpoint_path).relative_to(PurePosixPath(experiment_path))
    record["best"] = {
        "checkpoint": str(relative),
        "params": saved["params"],
        "metrics": saved["metrics"],
        "n_trials": n_trials,
    }
    write_text(join_location(experiment, RECORD_FILE), json.dumps(record, indent=2))


def locate_experiment(location: str) -> str:
    """Return the experiment directory whose record lies at or below `location`.

    Raises:
        UserInputError: no record is found in any of the known layouts.
    """
    for subdir in SEARCH_SUBDIRS:
        candidate = join_location(location, subdir) if subdir else location
        if exists(join_location(candidate, RECORD_FILE)):
            return candidate
    searched = ", ".join(f"{subdir or '.'}/{RECORD_FILE}" for subdir in SEARCH_SUBDIRS)
    raise UserInputError(
        f"--sweep {location}: no sweep record found (looked for {searched}); "
        "pass the --storage or --out of a finished `seqsetvae tune` or `seqsetvae run`"
    )


@dataclass
class BestHead:
    experiment: str
    checkpoint: str
    val_auprc: float
    params: dict[str, Any]
    export_dir: str


def export_best(location: str, export_dir: str | Path) -> BestHead:
    """Export the best head of the finished sweep stored at `location`, with its pretrained encoder."""
    experiment = locate_experiment(location)
    record = _read_record(experiment)
    best = record.get("best")
    if not best:
        raise UserInputError(
            f"{join_location(experiment, RECORD_FILE)}: the sweep has no best checkpoint yet, so it did not finish; "
            "resume it with `seqsetvae tune --resume`"
        )
    checkpoint = join_location(experiment, best["checkpoint"])
    with tempfile.TemporaryDirectory(prefix="seqsetvae-best-") as scratch:
        local_checkpoint = download(checkpoint, Path(scratch) / "checkpoint")
        local_pretrained = download(join_location(experiment, record["pretrained"]), Path(scratch) / PRETRAINED_COPY)
        if _sha256(local_pretrained) != record["pretrained_sha256"]:
            raise UserInputError(
                f"{join_location(experiment, record['pretrained'])}: SHA-256 differs from the one in {RECORD_FILE}; "
                "the pretrained copy was replaced after the sweep, so run the sweep again"
            )
        saved = json.loads((local_checkpoint / PARAMS_FILE).read_text())
        encoder = load_pretrained_encoder(local_pretrained)
        params = {**record["finetune_config"], **saved["params"]}
        metrics = saved["metrics"]
        target = export_model(
            encoder,
            load_head_state(local_checkpoint / HEAD_FILE),
            DataConfig(**record["data_config"]),
            params,
            {"val_auprc": metrics[record["metric"]], "val_auroc": metrics.get("val/auroc", float("nan"))},
            export_dir,
        )
    return BestHead(
        experiment=experiment,
        checkpoint=checkpoint,
        val_auprc=float(metrics[record["metric"]]),
        params=params,
        export_dir=str(target),
    )


def _read_record(experiment: str) -> dict[str, Any]:
    location = join_location(experiment, RECORD_FILE)
    try:
        record = json.loads(read_text(location))
    except json.JSONDecodeError as error:
        raise UserInputError(f"{location}: invalid JSON ({error}); the record is damaged, so run the sweep again") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise UserInputError(f"{location}: expected format {RECORD_FORMAT}, got {found!r}; write it with this version of seqsetvae")
    return record


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
