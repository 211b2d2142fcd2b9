"""Tensorise a MEDS dataset once into a memory-mapped cache of flat arrays.

Layout of one split under `<cache_dir>/<split>/`:

    codes.npy            int32   [E]       vocabulary index per event
    values.npy           float32 [E]       normalised value, 0 without a value
    has_value.npy        bool    [E]
    set_offsets.npy      int64   [n_sets + 1]      events of set k: offsets[k]:offsets[k+1]
    set_hours.npy        float32 [n_sets]  hours since the subject's first set
    set_time_us.npy      int64   [n_sets]  absolute time in microseconds
    subject_offsets.npy  int64   [n_subjects + 1]  sets of subject j
    subject_ids.npy      int64   [n_subjects]
    labels_<task>/       subject_pos, n_sets, value, prediction_time_us per label
    report.json          counts of what was capped, dropped and mapped

Events of a subject are sorted by time, sets by time. Subjects are in the
order they are read, shard by shard, and subjects without events come last.
Building the cache reads each split in chunks of whole subjects with pyarrow
and numpy only and appends every chunk to the arrays, so its memory does not
grow with the split. Loading a batch indexes the memory maps and never
touches pandas.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seqsetvae import meds_io
from seqsetvae.config import DataConfig
from seqsetvae.errors import UserInputError
from seqsetvae.preprocess import VALUE_SAMPLE_SIZE, Preprocessor, ValueSample, fit_streaming

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
US_PER_HOUR = 3_600_000_000
ARRAY_NAMES = (
    "codes",
    "values",
    "has_value",
    "set_offsets",
    "set_hours",
    "set_time_us",
    "subject_offsets",
    "subject_ids",
)
LABEL_ARRAY_NAMES = ("subject_pos", "n_sets", "value", "prediction_time_us")
TRAINING_SPLITS = (meds_io.meds.train_split, meds_io.meds.tuning_split)
"""The splits that pretraining, finetuning and the sweep train and validate on."""

PREPARE_CHUNK_ROWS = 2_000_000
"""Events read and tensorised at a time; bounds the memory of fitting preprocessing and building the cache."""
READ_BATCH_ROWS = 262_144
"""Rows of one parquet read batch; batches are joined into chunks of whole subjects."""


@dataclass
class SplitReport:
    """What building one split kept, capped, dropped and mapped. Counts only, no identifiers.

    Attributes:
        n_subjects_static_only: Subjects whose only events are static; they get one set at time 0.
        values_clipped_per_code: Values outside their code's train-split clip bounds, by code.
        n_subjects_cut_by_max_sets: Subjects with more sets than max_sets; pretraining reads only their latest max_sets.
        n_sets_cut_by_max_sets: Sets of those subjects that pretraining does not see.
        n_labels_cut_by_max_sets: Labels with more than max_sets sets before the prediction time.
        n_labels_without_sets: Labels with no set at or before the prediction time; they are
            predicted from the prior alone.
        n_labels_outside_split: Labels whose subject is in no split of the subject splits; they are dropped.
        n_duplicate_labels_dropped: Exact repeats of (subject, prediction time, value).
    """

    n_subjects: int = 0
    n_subjects_without_events: int = 0
    n_subjects_static_only: int = 0
    n_events: int = 0
    n_sets: int = 0
    n_events_capped: int = 0
    n_sets_over_cap: int = 0
    n_subjects_cut_by_max_sets: int = 0
    n_sets_cut_by_max_sets: int = 0
    n_nonfinite_dropped: int = 0
    n_duplicates_dropped: int = 0
    n_unknown_code_events: int = 0
    n_values_clipped: int = 0
    values_clipped_per_code: dict = field(default_factory=dict)
    n_static_events: int = 0
    n_labels: int = 0
    n_positive_labels: int = 0
    n_labels_without_sets: int = 0
    n_labels_cut_by_max_sets: int = 0
    n_labels_outside_split: int = 0
    n_duplicate_labels_dropped: int = 0
    extra: dict = field(default_factory=dict)


def _source_signature(meds_root: Path, split: str) -> list[list]:
    files = meds_io.event_files(meds_root, split)
    return [[str(p.relative_to(meds_root)), p.stat().st_size, int(p.stat().st_mtime)] for p in files]


def split_signature(meds_root: Path, split: str, data_config: DataConfig, preprocessor: Preprocessor) -> dict:
    """Return what one cached split depends on; a split whose stored signature differs is rebuilt."""
    splits_file = meds_root / "metadata" / "subject_splits.parquet"
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "data_config": asdict(data_config),
        "preprocessor": preprocessor.fingerprint(),
        "sources": _source_signature(meds_root, split),
        "subject_splits": [splits_file.stat().st_size, int(splits_file.stat().st_mtime)],
    }


def fit_preprocessor(meds_root: str | Path, data_config: DataConfig) -> Preprocessor:
    """Fit the vocabulary and value statistics on the train split, reading it in chunks of PREPARE_CHUNK_ROWS events."""
    root = meds_io.check_meds_root(meds_root)
    ids = meds_io.split_subject_ids(root, meds_io.meds.train_split)
    files = meds_io.event_files(root, meds_io.meds.train_split)

    def chunks():
        for path in files:
            yield from meds_io.iter_events(path, ids, batch_rows=PREPARE_CHUNK_ROWS)

    preprocessor = fit_streaming(chunks, data_config.clip_quantile)
    if not preprocessor.codes:
        raise UserInputError(f"{root}: the train split has no events; a vocabulary cannot be fitted")
    return preprocessor


def ensure_cache(
    meds_root: str | Path,
    cache_dir: str | Path,
    data_config: DataConfig,
    preprocessor: Preprocessor,
    splits: tuple[str, ...] = meds_io.SPLITS,
    required: tuple[str, ...] = (),
    need_labels: bool = False,
) -> dict[str, SplitReport]:
    """Build each split of `splits` unless an identical cached one exists; return the per-split reports.

    Splits with no subjects in the subject splits are skipped, unless they are
    in `required`, which raises `UserInputError` before anything is built.
    With `need_labels`, a missing task raises before building, and a required
    split without labels raises after it. Each split is built in a staging
    directory and renamed into place, so an interrupted build leaves the
    previous cache intact.
    """
    root = meds_io.check_meds_root(meds_root)
    for split in required:
        meds_io.split_subject_ids(root, split)
    if need_labels:
        meds_io.label_files(root, data_config.task)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    for leftover in cache.glob(".staging-*"):
        # A killed build leaves its staging directory behind; builds of one cache run one at a time.
        shutil.rmtree(leftover, ignore_errors=True)
    reports = {}
    for split in [s for s in splits if _split_has_events_or_subjects(root, s)]:
        signature = split_signature(root, split, data_config, preprocessor)
        signature_path = cache / split / "signature.json"
        if signature_path.is_file() and json.loads(signature_path.read_text()) == signature:
            logger.info("Reusing cached split '%s' at %s", split, cache)
            reports[split] = SplitReport(**json.loads((cache / split / "report.json").read_text()))
            continue
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{split}-", dir=cache))
        try:
            logger.info("Tensorising split '%s'", split)
            reports[split] = _build_split(root, split, staging / split, data_config, preprocessor)
            (staging / split / "signature.json").write_text(json.dumps(signature))
            _log_report(split, reports[split])
            _replace_dir(staging / split, cache / split)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    temporary = cache / "preprocessor.json.tmp"
    temporary.write_text(json.dumps(preprocessor.to_dict()))
    temporary.replace(cache / "preprocessor.json")
    for split in required if need_labels else ():
        if reports[split].n_labels == 0:
            files = ", ".join(str(p) for p in meds_io.label_files(root, data_config.task))
            raise UserInputError(
                f"{files}: no label of task '{data_config.task}' names a subject of split '{split}' "
                f"({reports[split].n_subjects} subjects); add labels for this split or pass another --task"
            )
    return reports


def _split_has_events_or_subjects(root: Path, split: str) -> bool:
    table = meds_io.read_subject_splits(root)
    return bool(pc.any(pc.equal(table.column("split"), split)).as_py())


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; the old target stays until the new one is in place."""
    old = None
    if target.exists():
        old = target.with_name(target.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _log_report(split: str, report: SplitReport) -> None:
    logger.info(
        "Split '%s': %d subjects, %d sets, %d events; capped %d events in %d sets; dropped %d non-finite, "
        "%d duplicate; %d unknown-code events; %d values clipped in %d codes (per code in report.json)",
        split,
        report.n_subjects,
        report.n_sets,
        report.n_events,
        report.n_events_capped,
        report.n_sets_over_cap,
        report.n_nonfinite_dropped,
        report.n_duplicates_dropped,
        report.n_unknown_code_events,
        report.n_values_clipped,
        len(report.values_clipped_per_code),
    )
    logger.info(
        "Split '%s': %d subjects without events, %d with static events only; %d subjects have more than "
        "max_sets sets (%d older sets unseen in pretraining)",
        split,
        report.n_subjects_without_events,
        report.n_subjects_static_only,
        report.n_subjects_cut_by_max_sets,
        report.n_sets_cut_by_max_sets,
    )
    if report.n_labels or report.n_labels_outside_split:
        logger.info(
            "Split '%s': %d labels (%d positive); %d predicted from the prior alone (no set before the prediction "
            "time), %d with more than max_sets earlier sets; dropped %d duplicate labels and %d labels of "
            "subjects in no split",
            split,
            report.n_labels,
            report.n_positive_labels,
            report.n_labels_without_sets,
            report.n_labels_cut_by_max_sets,
            report.n_duplicate_labels_dropped,
            report.n_labels_outside_split,
        )


def _build_split(
    root: Path, split: str, out: Path, data_config: DataConfig, preprocessor: Preprocessor
) -> SplitReport:
    """Tensorise one split chunk by chunk, appending each chunk's arrays to the .npy files in `out`.

    Subjects are stored in the order they are read: shard by shard, sorted by
    id within a chunk. Subjects of the split without events come last, with
    no sets.
    """
    report = SplitReport()
    split_ids = np.sort(meds_io.split_subject_ids(root, split).to_numpy())
    seen = np.zeros(len(split_ids), dtype=bool)
    files = meds_io.event_files(root, split)
    out.mkdir(parents=True, exist_ok=True)
    with _SplitWriter(out) as writer:
        for shard_number, path in enumerate(files, start=1):
            for events in _subject_chunks(path, pa.array(split_ids)):
                arrays = _tensorise(events, data_config, preprocessor, report)
                positions = np.searchsorted(split_ids, arrays["subject_ids"])
                repeated = int(seen[positions].sum())
                if repeated:
                    raise UserInputError(
                        f"{path}: the events of {repeated} subject(s) of split '{split}' are not contiguous: they "
                        "appear in more than one shard, or between other subjects' events within a shard. MEDS "
                        "keeps each subject's events together in one shard; rewrite the shards sorted by "
                        "subject_id and time"
                    )
                seen[positions] = True
                writer.append(arrays)
            logger.info(
                "Split '%s': tensorised shard %d/%d (%d events so far)", split, shard_number, len(files), writer.n_events
            )
        writer.append_empty_subjects(split_ids[~seen])
    if writer.n_events == 0:
        raise UserInputError(
            f"{files[0].parent}: none of the {len(split_ids)} subjects of split '{split}' has events in its "
            f"{len(files)} parquet file(s); check that metadata/subject_splits.parquet and data/ describe the same subjects"
        )
    report.n_subjects = len(split_ids)
    report.n_subjects_without_events = int((~seen).sum())
    arrays = _load_arrays(out)
    sets_per_subject = np.diff(arrays["subject_offsets"])
    report.n_subjects_cut_by_max_sets = int((sets_per_subject > data_config.max_sets).sum())
    report.n_sets_cut_by_max_sets = int(np.maximum(sets_per_subject - data_config.max_sets, 0).sum())

    labels = meds_io.read_labels(root, data_config.task) if _has_labels(root, data_config.task) else None
    if labels is not None:
        all_ids = meds_io.read_subject_splits(root).column("subject_id")
        labels = _drop_labels_outside_splits(labels, all_ids, root, data_config.task, report)
        label_arrays = _pack_labels(labels, arrays, data_config.max_sets, report)
        label_dir = out / f"labels_{data_config.task}"
        label_dir.mkdir()
        for name, array in label_arrays.items():
            np.save(label_dir / f"{name}.npy", array)
    (out / "report.json").write_text(json.dumps(asdict(report), indent=1))
    return report


def _subject_chunks(path: Path, subject_ids: pa.Array, chunk_rows: int | None = None) -> Iterator[pa.Table]:
    """Yield the events of `subject_ids` in one shard as tables of whole subjects, about `chunk_rows` rows each.

    A chunk is cut after the last complete subject, which relies on MEDS
    keeping each subject's events contiguous within its shard. The caller
    detects a subject that appears in two chunks.
    """
    chunk_rows = chunk_rows or PREPARE_CHUNK_ROWS
    pending: list[pa.Table] = []
    n_pending = 0
    for batch in meds_io.iter_events(path, subject_ids, batch_rows=min(chunk_rows, READ_BATCH_ROWS)):
        pending.append(batch)
        n_pending += batch.num_rows
        if n_pending < chunk_rows:
            continue
        table = pa.concat_tables(pending)
        subject = table.column("subject_id").to_numpy()
        other = np.flatnonzero(subject != subject[-1])
        if not len(other):
            continue  # one subject fills the chunk so far; read on
        cut = int(other[-1]) + 1
        yield table.slice(0, cut)
        pending, n_pending = [table.slice(cut)], table.num_rows - cut
    if n_pending:
        yield pa.concat_tables(pending)


def _tensorise(events: pa.Table, data_config: DataConfig, preprocessor: Preprocessor, report: SplitReport) -> dict:
    """Sort, deduplicate, normalise and pack the events of whole subjects; add the counts to `report`."""
    subject = events.column("subject_id").to_numpy()
    time = _time_with_static_filled(events, subject, report)
    raw_code = pc.dictionary_encode(events.column("code")).combine_chunks().indices.to_numpy()
    value_column = events.column("numeric_value")
    value = value_column.to_numpy(zero_copy_only=False).astype(np.float64)
    is_null = value_column.is_null().to_numpy(zero_copy_only=False)

    # Non-finite values are measurement errors: the event is dropped and counted.
    nonfinite = ~is_null & ~np.isfinite(value)
    report.n_nonfinite_dropped += int(nonfinite.sum())
    keep = ~nonfinite

    # Sort by subject, time, vocabulary index, code and value so exact duplicates are adjacent and the
    # events of a set are in vocabulary order, whatever the chunking.
    codes_all = preprocessor.code_indices(events.column("code"))
    order = np.lexsort((np.nan_to_num(value, nan=np.inf), raw_code, codes_all, time, subject))
    order = order[keep[order]]
    subject, time, raw_code, value = subject[order], time[order], raw_code[order], value[order]
    codes_all = codes_all[order]

    duplicate = np.zeros(len(order), dtype=bool)
    if len(order) > 1:
        same_value = (value[1:] == value[:-1]) | (np.isnan(value[1:]) & np.isnan(value[:-1]))
        duplicate[1:] = (
            (subject[1:] == subject[:-1]) & (time[1:] == time[:-1]) & (raw_code[1:] == raw_code[:-1]) & same_value
        )
    report.n_duplicates_dropped += int(duplicate.sum())
    unique = ~duplicate
    subject, time, codes_all, value = subject[unique], time[unique], codes_all[unique], value[unique]

    report.n_unknown_code_events += int((codes_all == 1).sum())
    clipped = preprocessor.count_clipped_per_code(codes_all, value)
    report.n_values_clipped += sum(clipped.values())
    for code, count in clipped.items():
        report.values_clipped_per_code[code] = report.values_clipped_per_code.get(code, 0) + count
    values, has_value = preprocessor.normalise(codes_all, value)
    return _pack(np.unique(subject), subject, time, codes_all, values, has_value, data_config, report)


def _has_labels(root: Path, task: str) -> bool:
    try:
        meds_io.label_files(root, task)
    except UserInputError:
        return False
    return True


def _time_with_static_filled(events: pa.Table, subject: np.ndarray, report: SplitReport) -> np.ndarray:
    """Return event times in microseconds; static events (null time) move to the subject's first time."""
    time_column = events.column("time")
    null_time = time_column.is_null().to_numpy(zero_copy_only=False)
    time = time_column.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    n_static = int(null_time.sum())
    report.n_static_events += n_static
    if n_static:
        big = np.iinfo(np.int64).max
        ids, inverse = np.unique(subject, return_inverse=True)
        first = np.full(len(ids), big, dtype=np.int64)
        np.minimum.at(first, inverse[~null_time], time[~null_time])
        report.n_subjects_static_only += int((first == big).sum())
        first[first == big] = 0
        time = np.where(null_time, first[inverse], time)
    return time


def _pack(subject_ids, subject, time, codes, values, has_value, data_config, report) -> dict:
    """Group sorted events into sets of the subjects `subject_ids` (sorted), capping events per set."""
    n_events = len(subject)
    new_set = np.ones(n_events, dtype=bool)
    if n_events > 1:
        new_set[1:] = (subject[1:] != subject[:-1]) | (time[1:] != time[:-1])
    set_start = np.flatnonzero(new_set)
    set_id = np.cumsum(new_set) - 1

    # Keep the first max_events_per_set events of each set (in vocabulary order) and count the rest.
    rank = np.arange(n_events) - set_start[set_id]
    capped = rank >= data_config.max_events_per_set
    report.n_events_capped += int(capped.sum())
    report.n_sets_over_cap += int(len(np.unique(set_id[capped])))
    kept = ~capped
    set_counts = np.bincount(set_id[kept], minlength=len(set_start))
    set_offsets = np.concatenate([[0], np.cumsum(set_counts)]).astype(np.int64)

    set_subject = subject[set_start]
    set_time = time[set_start]
    subject_pos = np.searchsorted(subject_ids, set_subject)
    subject_counts = np.bincount(subject_pos, minlength=len(subject_ids))
    subject_offsets = np.concatenate([[0], np.cumsum(subject_counts)]).astype(np.int64)
    first_time = np.zeros(len(subject_ids), dtype=np.int64)
    has_sets = subject_counts > 0
    first_time[has_sets] = set_time[subject_offsets[:-1][has_sets]]
    set_hours = ((set_time - first_time[subject_pos]) / US_PER_HOUR).astype(np.float32)

    report.n_events += int(kept.sum())
    report.n_sets += len(set_start)
    return {
        "codes": codes[kept].astype(np.int32),
        "values": values[kept].astype(np.float32),
        "has_value": has_value[kept],
        "set_offsets": set_offsets,
        "set_hours": set_hours,
        "set_time_us": set_time.astype(np.int64),
        "subject_offsets": subject_offsets,
        "subject_ids": subject_ids.astype(np.int64),
    }


def _drop_labels_outside_splits(
    labels: pa.Table, all_ids: pa.ChunkedArray, root: Path, task: str, report: SplitReport
) -> pa.Table:
    """Drop and count the labels whose subject is in no split; raise if that is every label."""
    known = pc.is_in(labels.column("subject_id"), value_set=all_ids.combine_chunks())
    n_outside = labels.num_rows - int(pc.sum(known).as_py() or 0)
    if n_outside and n_outside == labels.num_rows:
        examples = ", ".join(str(i) for i in labels.column("subject_id").slice(0, 3).to_pylist())
        files = ", ".join(str(p) for p in meds_io.label_files(root, task))
        raise UserInputError(
            f"{files}: none of the {labels.num_rows} labels of task '{task}' names a subject of "
            f"{root / meds_io.meds.subject_splits_filepath} (first subject_id values: {examples}); "
            "pass the labels of this dataset"
        )
    report.n_labels_outside_split = n_outside
    return labels.filter(known)


def _pack_labels(labels: pa.Table, arrays: dict, max_sets: int, report: SplitReport) -> dict:
    """Map each label to its subject's position in the cache and to the number of its sets at or before the prediction time.

    Exact repeats of a label are dropped and counted.
    """
    cache_ids = np.asarray(arrays["subject_ids"])
    by_id = np.argsort(cache_ids)
    label_subject = labels.column("subject_id").to_numpy()
    in_split = np.isin(label_subject, cache_ids)
    labels = labels.filter(pa.array(in_split))
    label_subject = label_subject[in_split]
    prediction_us = labels.column("prediction_time").cast(pa.int64()).to_numpy()
    value = labels.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool)

    order = np.lexsort((value, prediction_us, label_subject))
    label_subject, prediction_us, value = label_subject[order], prediction_us[order], value[order]
    repeat = np.zeros(len(order), dtype=bool)
    repeat[1:] = (
        (label_subject[1:] == label_subject[:-1]) & (prediction_us[1:] == prediction_us[:-1]) & (value[1:] == value[:-1])
    )
    report.n_duplicate_labels_dropped = int(repeat.sum())
    label_subject, prediction_us, value = label_subject[~repeat], prediction_us[~repeat], value[~repeat]
    subject_pos = by_id[np.searchsorted(cache_ids, label_subject, sorter=by_id)]
    offsets = np.asarray(arrays["subject_offsets"])
    # Only sets at or before the prediction time reach the model.
    n_sets = _count_sets_until(arrays["set_time_us"], offsets[subject_pos], offsets[subject_pos + 1], prediction_us)

    report.n_labels = len(value)
    report.n_positive_labels = int(value.sum())
    report.n_labels_without_sets = int((n_sets == 0).sum())
    report.n_labels_cut_by_max_sets = int((n_sets > max_sets).sum())
    return {
        "subject_pos": subject_pos.astype(np.int64),
        "n_sets": n_sets,
        "value": value,
        "prediction_time_us": prediction_us.astype(np.int64),
    }


def _count_sets_until(set_time: np.ndarray, start: np.ndarray, end: np.ndarray, cutoff: np.ndarray) -> np.ndarray:
    """Count, for each row, the sets in [start, end) with time <= cutoff; times within each range are sorted.

    A vectorised binary search: every row halves its range once per step.
    """
    low, high = start.astype(np.int64), end.astype(np.int64)
    while True:
        active = low < high
        if not active.any():
            return low - start
        middle = (low + high) // 2
        at_or_before = np.zeros(len(low), dtype=bool)
        at_or_before[active] = np.asarray(set_time[middle[active]]) <= cutoff[active]
        low = np.where(active & at_or_before, middle + 1, low)
        high = np.where(active & ~at_or_before, middle, high)


class _NpyAppender:
    """A 1-D .npy file written by appending; the header is rewritten with the final length on close.

    numpy pads every .npy header with room for a length of up to 21 digits, so
    the rewritten header has the same size as the first one.
    """

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.length = 0
        self.file = open(path, "wb")
        self.data_start = self._write_header()

    def _write_header(self) -> int:
        self.file.seek(0)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.length,)}
        np.lib.format.write_array_header_1_0(self.file, header)
        return self.file.tell()

    def append(self, array: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(array, dtype=self.dtype).tobytes())
        self.length += len(array)

    def close(self) -> None:
        if self._write_header() != self.data_start:
            raise RuntimeError(f"{self.file.name}: the .npy header changed size when its length was written")
        self.file.close()


ARRAY_DTYPES = {
    "codes": np.int32,
    "values": np.float32,
    "has_value": np.bool_,
    "set_offsets": np.int64,
    "set_hours": np.float32,
    "set_time_us": np.int64,
    "subject_offsets": np.int64,
    "subject_ids": np.int64,
}


class _SplitWriter:
    """Appends packed chunks of whole subjects to the arrays of one split, shifting their offsets."""

    def __init__(self, out: Path) -> None:
        self.files = {name: _NpyAppender(out / f"{name}.npy", ARRAY_DTYPES[name]) for name in ARRAY_NAMES}
        self.n_events = 0
        self.n_sets = 0
        self.files["set_offsets"].append(np.zeros(1, dtype=np.int64))
        self.files["subject_offsets"].append(np.zeros(1, dtype=np.int64))

    def __enter__(self) -> "_SplitWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        for appender in self.files.values():
            appender.close()

    def append(self, arrays: dict) -> None:
        for name in ("codes", "values", "has_value", "set_hours", "set_time_us", "subject_ids"):
            self.files[name].append(arrays[name])
        self.files["set_offsets"].append(arrays["set_offsets"][1:] + self.n_events)
        self.files["subject_offsets"].append(arrays["subject_offsets"][1:] + self.n_sets)
        self.n_events += int(arrays["set_offsets"][-1])
        self.n_sets += int(arrays["subject_offsets"][-1])

    def append_empty_subjects(self, subject_ids: np.ndarray) -> None:
        self.files["subject_ids"].append(subject_ids)
        self.files["subject_offsets"].append(np.full(len(subject_ids), self.n_sets, dtype=np.int64))


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    return {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAY_NAMES}


class SplitCache:
    """Memory-mapped arrays of one cached split."""

    def __init__(self, cache_dir: str | Path, split: str, task: str | None = None):
        self.path = Path(cache_dir) / split
        if not (self.path / "codes.npy").is_file():
            raise UserInputError(f"{self.path}: cached split not found; build the cache first")
        for name in ARRAY_NAMES:
            setattr(self, name, np.load(self.path / f"{name}.npy", mmap_mode="r"))
        self.task = task
        self.labels = None
        if task is not None:
            label_dir = self.path / f"labels_{task}"
            if not label_dir.is_dir():
                raise UserInputError(f"{self.path}: no labels for task '{task}' in this split")
            self.labels = {name: np.load(label_dir / f"{name}.npy") for name in LABEL_ARRAY_NAMES}

    @property
    def n_subjects(self) -> int:
        return len(self.subject_ids)

    def report(self) -> dict:
        return json.loads((self.path / "report.json").read_text())


def load_preprocessor(cache_dir: str | Path) -> Preprocessor:
    return Preprocessor.from_dict(json.loads((Path(cache_dir) / "preprocessor.json").read_text()))


QUANTILE_CHUNK_EVENTS = 10_000_000
"""Events read from the memory maps at a time by `value_quantiles`."""


def value_quantiles(
    cache_dir: str | Path, split: str, vocab_size: int, levels: tuple[float, ...], sample_size: int = VALUE_SAMPLE_SIZE
) -> np.ndarray:
    """Return each code's quantiles [vocab_size, len(levels)] of the normalised values of one cached split.

    Rows of codes without a value in the split are NaN. Each code keeps a
    seeded random sample of at most `sample_size` values, as in preprocessing,
    so the quantiles of codes with more values are estimates and every code
    with a value gets a row.
    """
    split_cache = SplitCache(cache_dir, split)
    sample = ValueSample(sample_size)
    for start in range(0, len(split_cache.codes), QUANTILE_CHUNK_EVENTS):
        chunk = slice(start, start + QUANTILE_CHUNK_EVENTS)
        valued = np.asarray(split_cache.has_value[chunk])
        codes = np.asarray(split_cache.codes[chunk])[valued].astype(np.int64)
        sample.add(codes, np.asarray(split_cache.values[chunk])[valued].astype(np.float64))
    result = np.full((vocab_size, len(levels)), np.nan)
    for code, values in sample.values.items():
        result[code] = np.quantile(values, levels)
    return result
