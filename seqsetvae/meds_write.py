"""Write a MEDS v0.4 dataset directory, validating every table against the `meds` schemas.

Layout written under the dataset root:

- ``data/<split>/0.parquet``: events, one shard per split
- ``metadata/subject_splits.parquet``, ``metadata/codes.parquet``, ``metadata/dataset.json``
- ``labels/<task>/0.parquet``: one label table per prediction task

The dataset is assembled in a hidden staging directory beside the output directory and renamed into
place at the end, so a failed conversion leaves no half-written dataset at the output path. A killed
process can leave the hidden ``.<name>.partial-*`` staging directory behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import meds
import pyarrow as pa
import pyarrow.parquet as pq

from seqsetvae.errors import UserInputError

if TYPE_CHECKING:
    from flexible_schema import PyArrowSchema

# zstd makes the bundled set-A demo data 4.3 MB instead of 5.0 MB with the snappy default.
PARQUET_COMPRESSION = "zstd"

SPLIT_NAMES = (meds.train_split, meds.tuning_split, meds.held_out_split)


def check_output_dir(out_dir: Path) -> None:
    """Raise `UserInputError` unless `out_dir` is missing or an empty directory."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserInputError(f"output path {out_dir} is a file; choose a directory path instead")
    if any(out_dir.iterdir()):
        raise UserInputError(
            f"output directory {out_dir} is not empty; choose an empty directory or remove it first"
        )


@contextlib.contextmanager
def staged_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a staging directory that replaces `out_dir` when the block finishes without error.

    The staging directory sits beside `out_dir` so that the final rename stays on one file system.
    It is removed if the block raises.
    """
    check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
        # Checked again because another process may have written there during the conversion.
        check_output_dir(out_dir)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _write_validated(schema: type[PyArrowSchema], table: pa.Table, path: Path) -> Path:
    """Align `table` to `schema`, which raises `SchemaValidationError` on a mismatch, and write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.align(table), path, compression=PARQUET_COMPRESSION)
    return path


def write_data_shard(root: Path, split: str, events: pa.Table) -> Path:
    """Validate `events` against `meds.DataSchema` and write it as ``data/<split>/0.parquet``.

    The caller must pass rows sorted by subject and time, because MEDS requires each subject's
    events to be contiguous and in time order within one file.
    """
    path = root / meds.data_subdirectory / split / "0.parquet"
    return _write_validated(meds.DataSchema, events, path)


def write_subject_splits(root: Path, splits: pa.Table) -> Path:
    """Validate `splits` against `meds.SubjectSplitSchema` and write ``metadata/subject_splits.parquet``."""
    return _write_validated(meds.SubjectSplitSchema, splits, root / meds.subject_splits_filepath)


def write_labels(root: Path, task: str, labels: pa.Table) -> Path:
    """Validate `labels` against `meds.LabelSchema` and write ``labels/<task>/0.parquet``."""
    return _write_validated(meds.LabelSchema, labels, root / "labels" / task / "0.parquet")


def write_codes(root: Path, codes: pa.Table) -> Path:
    """Validate `codes` against `meds.CodeMetadataSchema` and write ``metadata/codes.parquet``."""
    return _write_validated(meds.CodeMetadataSchema, codes, root / meds.code_metadata_filepath)


def write_dataset_metadata(root: Path, metadata: dict[str, Any]) -> Path:
    """Validate `metadata` against `meds.DatasetMetadataSchema` and write ``metadata/dataset.json``."""
    meds.DatasetMetadataSchema.validate(metadata)
    path = root / meds.dataset_metadata_filepath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
