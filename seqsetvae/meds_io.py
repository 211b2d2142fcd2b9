"""Read and validate a MEDS v0.4 dataset.

Expected layout under a MEDS root:

    data/<split>/*.parquet              events: subject_id, time, code, numeric_value
    metadata/subject_splits.parquet     subject_id, split
    labels/<task>/*.parquet             subject_id, prediction_time, boolean_value
                                        (tasks/<task>/ and labels/<task>.parquet also work)

Every table is checked with the schemas of the `meds` package. A failed check
raises `UserInputError` with one line that names the file, the column, what was
expected and what was found.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import meds
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from flexible_schema.exceptions import SchemaValidationError, TableValidationError

from seqsetvae.errors import UserInputError

logger = logging.getLogger(__name__)

EVENT_COLUMNS = ("subject_id", "time", "code", "numeric_value")
SPLITS = (meds.train_split, meds.tuning_split, meds.held_out_split)


def check_meds_root(root: str | Path) -> Path:
    """Return `root` as a Path after checking that it looks like a MEDS dataset."""
    path = Path(root)
    if not path.is_dir():
        raise UserInputError(f"{path}: MEDS directory not found; pass the output directory of `seqsetvae prepare`")
    if not (path / meds.data_subdirectory).is_dir():
        raise UserInputError(f"{path}: no '{meds.data_subdirectory}/' directory; expected a MEDS root with data/<split>/")
    if not (path / meds.subject_splits_filepath).is_file():
        raise UserInputError(
            f"{path / meds.subject_splits_filepath}: file not found; "
            "a MEDS root needs subject splits (subject_id, split)"
        )
    return path


def _read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserInputError(f"{path}: cannot read parquet ({first_line}); rewrite or remove the file") from None
    except KeyError as error:
        raise UserInputError(f"{path}: missing column {error}; expected columns {columns}") from None


# The columns of each MEDS table, as the one-line schema errors state them.
EXPECTED_COLUMNS = {
    "DataSchema": "subject_id int64, time timestamp[us] (null for static events), code string (not null), "
    "numeric_value float32 (nullable)",
    "SubjectSplitSchema": "subject_id int64, split string",
    "LabelSchema": "subject_id int64, prediction_time timestamp[us], boolean_value bool, none of them null",
}


def _align(schema: type, table: pa.Table, path: Path) -> pa.Table:
    try:
        return schema.align(table)
    except (SchemaValidationError, TableValidationError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserInputError(
            f"{path}: invalid MEDS {schema.__name__} ({first_line}); expected columns "
            f"{EXPECTED_COLUMNS.get(schema.__name__, 'of the MEDS schema')}; rewrite the file with these columns"
        ) from None


def read_subject_splits(root: Path) -> pa.Table:
    """Read `metadata/subject_splits.parquet` as a validated table."""
    path = root / meds.subject_splits_filepath
    table = _align(meds.SubjectSplitSchema, _read_parquet(path), path)
    ids = table.column("subject_id")
    if len(pc.unique(ids)) != len(ids):
        raise UserInputError(f"{path}: subject_id is not unique; each subject must belong to exactly one split")
    return table


def split_subject_ids(root: Path, split: str) -> pa.Array:
    """Return the subject ids assigned to `split`, or raise if there are none."""
    table = read_subject_splits(root)
    ids = table.filter(pc.equal(table.column("split"), split)).column("subject_id").combine_chunks()
    if len(ids) == 0:
        found = sorted(set(table.column("split").to_pylist()))
        shown = f"{found[:10]}" if len(found) <= 10 else f"{found[:10]} and {len(found) - 10} more"
        raise UserInputError(
            f"{root / meds.subject_splits_filepath}: split '{split}' has no subjects (splits found: {shown}); "
            "choose another split or re-run `seqsetvae prepare`"
        )
    return ids


def event_files(root: Path, split: str) -> list[Path]:
    """Return the parquet files that may hold events of `split`.

    MEDS lets shards be named freely; when `data/<split>/` exists only those
    files are read, otherwise every file under `data/` is read and filtered
    through the subject splits.
    """
    data_dir = root / meds.data_subdirectory
    split_dir = data_dir / split
    files = sorted(split_dir.rglob("*.parquet")) if split_dir.is_dir() else sorted(data_dir.rglob("*.parquet"))
    if not files:
        raise UserInputError(f"{split_dir if split_dir.is_dir() else data_dir}: no parquet files for split '{split}'")
    return files


def read_events(path: Path, subject_ids: pa.Array | None = None) -> pa.Table:
    """Read one MEDS data shard with the event columns, validated and filtered to `subject_ids`.

    Timezone-aware times are converted to naive UTC, which is what MEDS stores.
    A missing `numeric_value` column is added as nulls.
    """
    columns = _event_columns_of(path)
    return _normalise_events(_read_parquet(path, columns=columns), path, subject_ids)


def iter_events(path: Path, subject_ids: pa.Array | None = None, batch_rows: int = 1_000_000) -> Iterator[pa.Table]:
    """Read one MEDS data shard in tables of at most `batch_rows` rows, checked and filtered as in `read_events`.

    Only one batch of the shard is in memory at a time.
    """
    columns = _event_columns_of(path)
    try:
        parquet_file = pq.ParquetFile(path)
        for batch in parquet_file.iter_batches(batch_size=batch_rows, columns=columns):
            yield _normalise_events(pa.Table.from_batches([batch]), path, subject_ids)
    except (pa.ArrowInvalid, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserInputError(f"{path}: cannot read parquet ({first_line}); rewrite or remove the file") from None


def _event_columns_of(path: Path) -> list[str]:
    if not path.exists():
        raise UserInputError(f"{path}: file not found")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserInputError(f"{path}: cannot read parquet ({first_line}); rewrite or remove the file") from None
    return [c for c in EVENT_COLUMNS if c in schema.names]


def _normalise_events(table: pa.Table, path: Path, subject_ids: pa.Array | None) -> pa.Table:
    time_index = table.schema.get_field_index("time")
    if time_index >= 0:
        time_type = table.schema.field(time_index).type
        if pa.types.is_timestamp(time_type) and time_type.tz is not None:
            naive = table.column("time").cast(pa.timestamp("us", tz="UTC")).cast(pa.timestamp("us"))
            table = table.set_column(time_index, "time", naive)
    table = _align(meds.DataSchema, table, path)
    table = table.select(list(EVENT_COLUMNS))
    null_codes = table.column("code").null_count
    if null_codes:
        raise UserInputError(
            f"{path}: column 'code' has {null_codes} null values; every event needs a code, "
            "so give those rows a code or remove them"
        )
    if subject_ids is not None:
        table = table.filter(pc.is_in(table.column("subject_id"), value_set=subject_ids))
    return table


def label_files(root: Path, task: str) -> list[Path]:
    """Return the label parquet files of `task`."""
    candidates = [root / "labels" / task, root / "tasks" / task]
    for directory in candidates:
        if directory.is_dir():
            files = sorted(directory.rglob("*.parquet"))
            if files:
                return files
    for single in (root / "labels" / f"{task}.parquet", root / "tasks" / f"{task}.parquet"):
        if single.is_file():
            return [single]
    raise UserInputError(
        f"{root}: no labels for task '{task}' (looked in labels/{task}/ and tasks/{task}/); "
        "pass --task with an existing task name"
    )


def read_labels(root: Path, task: str, subject_ids: pa.Array | None = None) -> pa.Table:
    """Read the boolean labels of `task`, validated, filtered to `subject_ids`."""
    tables = []
    for path in label_files(root, task):
        table = _align(meds.LabelSchema, _read_parquet(path), path)
        if "boolean_value" not in table.column_names:
            raise UserInputError(f"{path}: column 'boolean_value' missing; seqsetvae trains binary classifiers")
        tables.append(table.select(["subject_id", "prediction_time", "boolean_value"]))
    labels = pa.concat_tables(tables)
    if subject_ids is not None:
        labels = labels.filter(pc.is_in(labels.column("subject_id"), value_set=subject_ids))
    return labels
