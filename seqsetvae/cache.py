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

Events of a subject are sorted by time, sets by time. Building the cache reads
each split with pyarrow and numpy only; loading a batch indexes the memory
maps and never touches pandas.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seqsetvae import meds_io
from seqsetvae.config import DataConfig
from seqsetvae.errors import UserInputError
from seqsetvae.preprocess import Preprocessor

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
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


@dataclass
class SplitReport:
    """What building one split kept, capped, dropped and mapped. Counts only, no identifiers."""

    n_subjects: int = 0
    n_subjects_without_events: int = 0
    n_events: int = 0
    n_sets: int = 0
    n_events_capped: int = 0
    n_sets_over_cap: int = 0
    n_nonfinite_dropped: int = 0
    n_duplicates_dropped: int = 0
    n_unknown_code_events: int = 0
    n_values_clipped: int = 0
    n_static_events: int = 0
    n_labels: int = 0
    n_positive_labels: int = 0
    n_labels_without_sets: int = 0
    n_labels_outside_split: int = 0
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
    """Fit the vocabulary and value statistics on the train split."""
    root = meds_io.check_meds_root(meds_root)
    ids = meds_io.split_subject_ids(root, meds_io.meds.train_split)
    tables = [meds_io.read_events(path, ids) for path in meds_io.event_files(root, meds_io.meds.train_split)]
    events = pa.concat_tables(tables)
    if events.num_rows == 0:
        raise UserInputError(f"{root}: the train split has no events; a vocabulary cannot be fitted")
    # NOTE: fitting holds the train split's code and value columns in memory.
    return Preprocessor.fit(events, data_config.clip_quantile)


def ensure_cache(
    meds_root: str | Path,
    cache_dir: str | Path,
    data_config: DataConfig,
    preprocessor: Preprocessor,
    splits: tuple[str, ...] = meds_io.SPLITS,
) -> dict[str, SplitReport]:
    """Build each split of `splits` unless an identical cached one exists; return the per-split reports.

    Splits with no subjects in the subject splits are skipped. Each split is
    built in a staging directory and renamed into place, so an interrupted
    build leaves the previous cache intact.
    """
    root = meds_io.check_meds_root(meds_root)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
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
    (cache / "preprocessor.json").write_text(json.dumps(preprocessor.to_dict()))
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
        "%d duplicate; %d unknown-code events; %d values clipped",
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
    )


def _read_split(root: Path, split: str, subject_ids: pa.Array) -> pa.Table:
    tables = [meds_io.read_events(path, subject_ids) for path in meds_io.event_files(root, split)]
    return pa.concat_tables(tables)


def _build_split(
    root: Path, split: str, out: Path, data_config: DataConfig, preprocessor: Preprocessor
) -> SplitReport:
    report = SplitReport()
    split_ids = np.sort(meds_io.split_subject_ids(root, split).to_numpy())
    events = _read_split(root, split, pa.array(split_ids))

    subject = events.column("subject_id").to_numpy()
    time = _time_with_static_filled(events, subject, report)
    raw_code = pc.dictionary_encode(events.column("code")).combine_chunks().indices.to_numpy()
    value_column = events.column("numeric_value")
    value = value_column.to_numpy(zero_copy_only=False).astype(np.float64)
    is_null = value_column.is_null().to_numpy(zero_copy_only=False)

    # Non-finite values are measurement errors: the event is dropped and counted.
    nonfinite = ~is_null & ~np.isfinite(value)
    report.n_nonfinite_dropped = int(nonfinite.sum())
    keep = ~nonfinite

    # Sort by subject, time, code and value so exact duplicates are adjacent.
    order = np.lexsort((np.nan_to_num(value, nan=np.inf), raw_code, time, subject))
    order = order[keep[order]]
    subject, time, raw_code, value = subject[order], time[order], raw_code[order], value[order]
    codes_all = preprocessor.code_indices(events.column("code").take(pa.array(order)))

    duplicate = np.zeros(len(order), dtype=bool)
    if len(order) > 1:
        same_value = (value[1:] == value[:-1]) | (np.isnan(value[1:]) & np.isnan(value[:-1]))
        duplicate[1:] = (
            (subject[1:] == subject[:-1]) & (time[1:] == time[:-1]) & (raw_code[1:] == raw_code[:-1]) & same_value
        )
    report.n_duplicates_dropped = int(duplicate.sum())
    unique = ~duplicate
    subject, time, codes_all, value = subject[unique], time[unique], codes_all[unique], value[unique]

    report.n_unknown_code_events = int((codes_all == 1).sum())
    report.n_values_clipped = preprocessor.count_clipped(codes_all, value)
    values, has_value = preprocessor.normalise(codes_all, value)

    arrays, label_arrays = _pack(split_ids, subject, time, codes_all, values, has_value, data_config, report)
    labels = meds_io.read_labels(root, data_config.task) if _has_labels(root, data_config.task) else None
    if labels is not None:
        label_arrays = _pack_labels(labels, split_ids, arrays, report)

    out.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(out / f"{name}.npy", array)
    if label_arrays is not None:
        label_dir = out / f"labels_{data_config.task}"
        label_dir.mkdir()
        for name, array in label_arrays.items():
            np.save(label_dir / f"{name}.npy", array)
    (out / "report.json").write_text(json.dumps(asdict(report), indent=1))
    return report


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
    report.n_static_events = int(null_time.sum())
    if report.n_static_events:
        big = np.iinfo(np.int64).max
        ids, inverse = np.unique(subject, return_inverse=True)
        first = np.full(len(ids), big, dtype=np.int64)
        np.minimum.at(first, inverse[~null_time], time[~null_time])
        first[first == big] = 0
        time = np.where(null_time, first[inverse], time)
    return time


def _pack(split_ids, subject, time, codes, values, has_value, data_config, report):
    """Group sorted events into sets and subjects, capping events per set."""
    n_events = len(subject)
    new_set = np.ones(n_events, dtype=bool)
    if n_events > 1:
        new_set[1:] = (subject[1:] != subject[:-1]) | (time[1:] != time[:-1])
    set_start = np.flatnonzero(new_set)
    set_id = np.cumsum(new_set) - 1

    # Keep the first max_events_per_set events of each set (in code order) and count the rest.
    rank = np.arange(n_events) - set_start[set_id]
    capped = rank >= data_config.max_events_per_set
    report.n_events_capped = int(capped.sum())
    report.n_sets_over_cap = int(len(np.unique(set_id[capped])))
    kept = ~capped
    set_counts = np.bincount(set_id[kept], minlength=len(set_start))
    set_offsets = np.concatenate([[0], np.cumsum(set_counts)]).astype(np.int64)

    set_subject = subject[set_start]
    set_time = time[set_start]
    subject_pos = np.searchsorted(split_ids, set_subject)
    subject_counts = np.bincount(subject_pos, minlength=len(split_ids))
    subject_offsets = np.concatenate([[0], np.cumsum(subject_counts)]).astype(np.int64)
    first_time = np.zeros(len(split_ids), dtype=np.int64)
    has_sets = subject_counts > 0
    first_time[has_sets] = set_time[subject_offsets[:-1][has_sets]]
    set_hours = ((set_time - first_time[subject_pos]) / US_PER_HOUR).astype(np.float32)

    report.n_subjects = len(split_ids)
    report.n_subjects_without_events = int((subject_counts == 0).sum())
    report.n_events = int(kept.sum())
    report.n_sets = len(set_start)
    arrays = {
        "codes": codes[kept].astype(np.int32),
        "values": values[kept].astype(np.float32),
        "has_value": has_value[kept],
        "set_offsets": set_offsets,
        "set_hours": set_hours,
        "set_time_us": set_time.astype(np.int64),
        "subject_offsets": subject_offsets,
        "subject_ids": split_ids.astype(np.int64),
    }
    return arrays, None


def _pack_labels(labels: pa.Table, split_ids: np.ndarray, arrays: dict, report: SplitReport) -> dict:
    """Map each label to its subject and to the number of its sets at or before the prediction time."""
    label_subject = labels.column("subject_id").to_numpy()
    in_split = np.isin(label_subject, split_ids)
    labels = labels.filter(pa.array(in_split))
    label_subject = label_subject[in_split]
    prediction_us = labels.column("prediction_time").cast(pa.int64()).to_numpy()
    value = labels.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool)

    order = np.lexsort((prediction_us, label_subject))
    label_subject, prediction_us, value = label_subject[order], prediction_us[order], value[order]
    subject_pos = np.searchsorted(split_ids, label_subject)
    offsets = arrays["subject_offsets"]
    set_time = arrays["set_time_us"]
    n_sets = np.empty(len(subject_pos), dtype=np.int64)
    for i, (pos, cutoff) in enumerate(zip(subject_pos, prediction_us)):
        start, end = offsets[pos], offsets[pos + 1]
        # Only sets at or before the prediction time reach the model.
        n_sets[i] = np.searchsorted(set_time[start:end], cutoff, side="right")

    report.n_labels = len(value)
    report.n_positive_labels = int(value.sum())
    report.n_labels_without_sets = int((n_sets == 0).sum())
    return {
        "subject_pos": subject_pos.astype(np.int64),
        "n_sets": n_sets,
        "value": value,
        "prediction_time_us": prediction_us.astype(np.int64),
    }


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
