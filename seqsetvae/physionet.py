"""Convert the PhysioNet/CinC Challenge 2012 raw files into a MEDS v0.4 dataset.

Input: one stay file ``<RecordID>.txt`` per ICU stay, a CSV with header ``Time,Parameter,Value``,
where ``Time`` is ``HH:MM`` since ICU admission (hours can exceed 24). Stay files come from a
``set-X`` directory or a ``set-X.tar.gz`` archive. In-hospital mortality comes from the
``Outcomes-X.txt`` files (``RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death``).

Mapping to MEDS:

- ``subject_id`` is the RecordID. One stay is one subject.
- PhysioNet gives no calendar dates, so every stay is admitted at the same synthetic time,
  `ADMISSION_TIME` (2012-01-01 00:00), and each row's time is admission + ``HH:MM``.
- The general descriptors (the first ``Age``, ``Gender``, ``Height``, ``ICUType`` and ``Weight``
  rows at 00:00) become events at admission with codes in the ``STATIC//`` namespace:
  ``STATIC//Age``, ``STATIC//Height`` and ``STATIC//Weight`` carry the value, and the categorical
  ``STATIC//Gender//<value>`` and ``STATIC//ICUType//<value>`` carry none. The namespace keeps the
  admission weight apart from the ``Weight`` time series, which PhysioNet records under the same
  name. A descriptor value of -1 means "not recorded": it becomes no event and is counted.
- The ``RecordID`` row is the subject id, not an event.
- Every other row becomes one event whose code is the parameter name (``HR``, ``Lactate``, ...).
  Repeated measurements at one time stay separate events. Physiologically impossible values are
  kept as recorded because the model's normalisation clips them.
- Rows that cannot be parsed (wrong field count, time not ``HH:MM``, non-numeric value, empty
  parameter) are counted and located in the `ConversionReport`, not converted.
- Label ``in_hospital_mortality``: one row per stay with an Outcomes row, predicted at
  admission + 48 h, ``boolean_value`` = ``In-hospital_death``.

NOTE: wall times of `convert_physionet2012`, timed with ``time.perf_counter`` on a 2-core AMD
EPYC VM (Python 3.11, pyarrow 26, numpy 2.4). set-a.tar.gz (4,000 stays, 1.76 M rows) took 2.2
to 3.7 s. set-a.tar.gz plus set-b.tar.gz (8,000 stays, 3.5 M rows) took 4.0 to 5.0 s.
"""

from __future__ import annotations

import logging
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import meds
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

import seqsetvae
from seqsetvae import meds_write
from seqsetvae.errors import UserInputError

logger = logging.getLogger(__name__)

DEMO_DATA_DIR = Path(__file__).resolve().parent / "demo" / "physionet2012_seta"
"""Bundled demo: PhysioNet 2012 training set A (4,000 stays) converted with split seed 0."""

ADMISSION_TIME = np.datetime64("2012-01-01T00:00:00", "us")
PREDICTION_DELAY = np.timedelta64(48, "h")
LABEL_TASK = "in_hospital_mortality"
STATIC_PREFIX = "STATIC//"

DESCRIPTOR_NAMES = ("RecordID", "Age", "Gender", "Height", "ICUType", "Weight")
CATEGORICAL_DESCRIPTORS = frozenset({"Gender", "ICUType"})
MISSING_DESCRIPTOR_VALUE = -1.0
STAY_HEADER = "Time,Parameter,Value"
OUTCOME_ID_COLUMN = "RecordID"
OUTCOME_LABEL_COLUMN = "In-hospital_death"

DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MAX_UNPARSEABLE_EXAMPLES = 5
STAYS_PER_CHUNK = 1000

# Hours are capped at five digits so that the integer cast cannot overflow.
_TIME_PATTERN = r"^\d{1,5}:[0-5]\d$"
_NUMBER_PATTERN = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_STAY_FILE_NAME = re.compile(r"^(\d+)\.txt$")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_FLOAT32_MAX = float(np.finfo(np.float32).max)

# Variable descriptions and units as listed by the challenge's data description.
# NOTE: the units are the published ones and were not checked against the values; Mg, for
# example, has a median near 2, which reads more like mg/dL than the published mmol/L.
CODE_DESCRIPTIONS = {
    "STATIC//Age": "Age at ICU admission (years)",
    "STATIC//Height": "Height at ICU admission (cm)",
    "STATIC//Weight": "Weight at ICU admission (kg)",
    "STATIC//Gender//0": "Gender: female",
    "STATIC//Gender//1": "Gender: male",
    "STATIC//ICUType//1": "ICU type: Coronary Care Unit",
    "STATIC//ICUType//2": "ICU type: Cardiac Surgery Recovery Unit",
    "STATIC//ICUType//3": "ICU type: Medical ICU",
    "STATIC//ICUType//4": "ICU type: Surgical ICU",
    "ALP": "Alkaline phosphatase (IU/L)",
    "ALT": "Alanine transaminase (IU/L)",
    "AST": "Aspartate transaminase (IU/L)",
    "Albumin": "Albumin (g/dL)",
    "BUN": "Blood urea nitrogen (mg/dL)",
    "Bilirubin": "Bilirubin (mg/dL)",
    "Cholesterol": "Cholesterol (mg/dL)",
    "Creatinine": "Serum creatinine (mg/dL)",
    "DiasABP": "Invasive diastolic arterial blood pressure (mmHg)",
    "FiO2": "Fractional inspired O2 (0-1)",
    "GCS": "Glasgow Coma Score (3-15)",
    "Glucose": "Serum glucose (mg/dL)",
    "HCO3": "Serum bicarbonate (mmol/L)",
    "HCT": "Hematocrit (%)",
    "HR": "Heart rate (bpm)",
    "K": "Serum potassium (mEq/L)",
    "Lactate": "Lactate (mmol/L)",
    "MAP": "Invasive mean arterial blood pressure (mmHg)",
    "MechVent": "Mechanical ventilation (0: false, 1: true)",
    "Mg": "Serum magnesium (mmol/L)",
    "NIDiasABP": "Non-invasive diastolic arterial blood pressure (mmHg)",
    "NIMAP": "Non-invasive mean arterial blood pressure (mmHg)",
    "NISysABP": "Non-invasive systolic arterial blood pressure (mmHg)",
    "Na": "Serum sodium (mEq/L)",
    "PaCO2": "Partial pressure of arterial CO2 (mmHg)",
    "PaO2": "Partial pressure of arterial O2 (mmHg)",
    "Platelets": "Platelets (cells/nL)",
    "RespRate": "Respiration rate (bpm)",
    "SaO2": "O2 saturation in hemoglobin (%)",
    "SysABP": "Invasive systolic arterial blood pressure (mmHg)",
    "Temp": "Temperature (°C)",
    "TroponinI": "Troponin-I (μg/L)",
    "TroponinT": "Troponin-T (μg/L)",
    "Urine": "Urine output (mL)",
    "WBC": "White blood cell count (cells/nL)",
    "Weight": "Weight (kg)",
    "pH": "Arterial pH (0-14)",
}


@dataclass
class ConversionReport:
    """Counts from one conversion. It contains no patient identifiers or measured values.

    `n_unparseable_rows` and `unparseable_examples` cover rows of stay files and of Outcomes files.
    """

    n_subjects: int
    n_events: int
    n_labels: int
    n_positive: int
    n_unparseable_rows: int
    n_missing_descriptors: int
    n_subjects_without_outcome: int
    split_counts: dict[str, int]
    unparseable_examples: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        """Return the report as human-readable lines for the command line."""
        positive_share = self.n_positive / self.n_labels if self.n_labels else 0.0
        splits = ", ".join(f"{name} {count:,}" for name, count in self.split_counts.items())
        lines = [
            f"Subjects (ICU stays): {self.n_subjects:,}",
            f"Events written: {self.n_events:,}",
            f"In-hospital mortality labels: {self.n_labels:,}, "
            f"of which {self.n_positive:,} positive ({positive_share:.1%})",
            f"Stays without a usable Outcomes row (kept as data, no label): "
            f"{self.n_subjects_without_outcome:,}",
            f"Descriptors recorded as -1 (not recorded, no event): {self.n_missing_descriptors:,}",
            f"Unparseable rows (not converted): {self.n_unparseable_rows:,}",
        ]
        if self.unparseable_examples:
            lines.append("  first at: " + ", ".join(self.unparseable_examples))
        lines.append(f"Splits: {splits}")
        return lines


@dataclass
class _StayText:
    location: str  # "<input name>/<member path>", used in error messages and the report
    file_stem: str
    text: str


@dataclass
class _Inputs:
    stay_sources: list[Path]
    outcome_paths: list[Path]


@dataclass
class _RowProblems:
    """Unparseable rows: a total count and the first few "file:line" locations."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, locations: Sequence[str], count: int) -> None:
        self.count += count
        room = MAX_UNPARSEABLE_EXAMPLES - len(self.examples)
        self.examples.extend(locations[:room])


@dataclass
class _ParsedStays:
    subject_ids: np.ndarray  # int64, one per stay in input order
    locations: list[str]
    events: pa.Table  # subject_id, minutes, line, code, numeric_value
    n_missing_descriptors: int


# ---------------------------------------------------------------------------------------------
# Finding the input files


def _is_archive(path: Path) -> bool:
    return path.name.endswith(_ARCHIVE_SUFFIXES)


def _is_outcomes_file(path: Path) -> bool:
    return path.name.startswith("Outcomes") and path.suffix == ".txt"


def _has_stay_files(directory: Path) -> bool:
    return any(_STAY_FILE_NAME.match(child.name) for child in directory.iterdir() if child.is_file())


def _stay_directories(directory: Path) -> list[Path]:
    """Return `directory` if it contains stay files, else its ``set-*`` subdirectories that do."""
    if _has_stay_files(directory):
        return [directory]
    subdirectories = sorted(p for p in directory.glob("set-*") if p.is_dir() and _has_stay_files(p))
    if subdirectories:
        return subdirectories
    hint = ""
    if any(_is_archive(child) for child in directory.iterdir()):
        hint = " It contains archives: pass the set-X.tar.gz archive itself."
    raise UserInputError(
        f"no stay files found in {directory}: expected <RecordID>.txt files in it or in a "
        f"set-X subdirectory.{hint}"
    )


def _resolve_inputs(raw_paths: Sequence[str | Path]) -> _Inputs:
    """Sort raw paths into stay sources and Outcomes files, adding the Outcomes files found beside them."""
    if not raw_paths:
        raise UserInputError("no raw input given: pass a set-X directory or set-X.tar.gz archive")
    stay_sources: list[Path] = []
    outcome_paths: list[Path] = []
    for raw in raw_paths:
        path = Path(raw)
        if not path.exists():
            raise UserInputError(
                f"raw input not found: {path}; expected a set-X directory, a set-X.tar.gz archive "
                "or an Outcomes-X.txt file"
            )
        if path.is_dir():
            stay_sources.extend(_stay_directories(path))
            outcome_paths.extend(sorted(path.glob("Outcomes*.txt")))
            outcome_paths.extend(sorted(path.parent.glob("Outcomes*.txt")))
        elif _is_archive(path):
            stay_sources.append(path)
            outcome_paths.extend(sorted(path.parent.glob("Outcomes*.txt")))
        elif _is_outcomes_file(path):
            outcome_paths.append(path)
        else:
            raise UserInputError(
                f"unsupported raw input {path}: expected a set-X directory, a .tar.gz archive or "
                "an Outcomes-X.txt file"
            )
    if not stay_sources:
        raise UserInputError(
            "only Outcomes files were given: also pass the set-X directory or set-X.tar.gz archive"
        )
    return _Inputs(
        stay_sources=_unique_paths(stay_sources), outcome_paths=_unique_paths(outcome_paths)
    )


def _unique_paths(paths: list[Path]) -> list[Path]:
    seen: set[Path] = set()
    unique = []
    for path in paths:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(path)
    return unique


# ---------------------------------------------------------------------------------------------
# Reading stay files


def _decode(data: bytes) -> str:
    # Undecodable bytes become U+FFFD. In a time or value that fails the row's check, so the row
    # is counted as unparseable. In a parameter name it becomes part of the code.
    return data.decode("utf-8", errors="replace")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise UserInputError(f"cannot read {path}: {error.strerror}; check its permissions") from error


def _iter_directory_stays(directory: Path) -> Iterator[_StayText]:
    for path in sorted(directory.iterdir()):
        match = _STAY_FILE_NAME.match(path.name)
        if match and path.is_file():
            yield _StayText(
                location=f"{directory.name}/{path.name}",
                file_stem=match.group(1),
                text=_decode(_read_bytes(path)),
            )


def _iter_archive_stays(archive: Path) -> Iterator[_StayText]:
    """Yield the stay files of a tar archive in archive order, reading it in one pass."""
    found = 0
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                match = _STAY_FILE_NAME.match(Path(member.name).name)
                if not (match and member.isfile()):
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                found += 1
                yield _StayText(
                    location=f"{archive.name}/{member.name}",
                    file_stem=match.group(1),
                    text=_decode(handle.read()),
                )
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise UserInputError(
            f"cannot read archive {archive}: {error}; download it again or pass the extracted "
            "set-X directory"
        ) from error
    if found == 0:
        raise UserInputError(
            f"archive {archive} contains no stay files: expected set-X/<RecordID>.txt members as "
            "in the PhysioNet 2012 set-a.tar.gz and set-b.tar.gz archives"
        )


def _iter_stays(source: Path) -> Iterator[_StayText]:
    if source.is_dir():
        return _iter_directory_stays(source)
    return _iter_archive_stays(source)


def _iter_chunks(stays: Iterator[_StayText], size: int) -> Iterator[list[_StayText]]:
    chunk: list[_StayText] = []
    for stay in stays:
        chunk.append(stay)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------
# Parsing stay rows


def _split_lines(stays: list[_StayText]) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Return every non-header line of the stays with its stay position and 1-based line number."""
    lines: list[str] = []
    positions = []
    numbers = []
    for position, stay in enumerate(stays):
        rows = stay.text.splitlines()
        first = 1 if rows and rows[0].lstrip("\ufeff").replace(" ", "") == STAY_HEADER else 0
        lines.extend(rows[first:])
        positions.append(np.full(len(rows) - first, position, dtype=np.int64))
        numbers.append(np.arange(first + 1, len(rows) + 1, dtype=np.int64))
    return (
        pa.array(lines, pa.string()),
        np.concatenate(positions) if positions else np.zeros(0, np.int64),
        np.concatenate(numbers) if numbers else np.zeros(0, np.int64),
    )


def _to_numpy(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False))


def _parse_fields(lines: pa.Array) -> tuple[np.ndarray, pa.Array, np.ndarray, pa.Array, np.ndarray]:
    """Parse ``Time,Parameter,Value`` lines.

    Returns the indices of the valid lines, then for those lines the parameter names, the minutes
    since admission and the values, and last the indices of the unparseable lines. Blank lines are
    in neither index list because they contain no data.
    """
    trimmed = pc.utf8_trim_whitespace(lines)
    blank = _to_numpy(pc.equal(pc.utf8_length(trimmed), 0))
    three_fields = _to_numpy(pc.equal(pc.count_substring(trimmed, ","), 2)) & ~blank
    candidates = np.flatnonzero(three_fields)

    fields = pc.split_pattern(trimmed.take(candidates), ",")
    times = pc.utf8_trim_whitespace(pc.list_element(fields, 0))
    parameters = pc.utf8_trim_whitespace(pc.list_element(fields, 1))
    value_texts = pc.utf8_trim_whitespace(pc.list_element(fields, 2))

    valid = (
        _to_numpy(pc.match_substring_regex(times, _TIME_PATTERN))
        & _to_numpy(pc.greater(pc.utf8_length(parameters), 0))
        & _to_numpy(pc.match_substring_regex(value_texts, _NUMBER_PATTERN))
    )
    keep = np.flatnonzero(valid)
    values = _to_numpy(pc.cast(value_texts.take(keep), pa.float64()))
    # A value outside the float32 range cannot be stored in numeric_value without becoming inf.
    in_range = np.abs(values) <= _FLOAT32_MAX
    keep, values = keep[in_range], values[in_range]

    time_parts = pc.split_pattern(times.take(keep), ":")
    hours = _to_numpy(pc.cast(pc.list_element(time_parts, 0), pa.int64()))
    minutes = _to_numpy(pc.cast(pc.list_element(time_parts, 1), pa.int64()))

    valid_lines = candidates[keep]
    unparseable = np.setdiff1d(np.flatnonzero(~blank), valid_lines, assume_unique=True)
    return valid_lines, parameters.take(keep), hours * 60 + minutes, values, unparseable


def _descriptor_rows(
    positions: np.ndarray, parameters: pa.Array, minutes: np.ndarray
) -> np.ndarray:
    """Return a mask of the rows that are general descriptors.

    A descriptor is the first row of each descriptor name at 00:00 in a stay. Later rows with the
    same name, such as the ``Weight`` time series, are ordinary measurements.
    """
    named = _to_numpy(pc.is_in(parameters, value_set=pa.array(DESCRIPTOR_NAMES))) & (minutes == 0)
    candidates = np.flatnonzero(named)
    frame = pd.DataFrame(
        {"position": positions[candidates], "parameter": parameters.take(candidates).to_pylist()}
    )
    first = ~frame.duplicated(keep="first").to_numpy()
    mask = np.zeros(len(minutes), dtype=bool)
    mask[candidates[first]] = True
    return mask


def _format_category(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _subject_ids(stays: list[_StayText], record_ids: dict[int, float]) -> np.ndarray:
    """Return each stay's RecordID: its ``RecordID`` row, else the number in its file name."""
    ids = np.empty(len(stays), dtype=np.int64)
    for position, stay in enumerate(stays):
        value = record_ids.get(position)
        if value is not None and value.is_integer() and value >= 0:
            ids[position] = int(value)
        elif stay.file_stem.isdigit():
            ids[position] = int(stay.file_stem)
        else:
            raise UserInputError(
                f"cannot find the RecordID of {stay.location}: expected a '00:00,RecordID,<integer>' "
                "row or a file named <RecordID>.txt"
            )
    return ids


def _descriptor_events(
    positions: np.ndarray, parameters: list[str], values: np.ndarray, lines: np.ndarray
) -> tuple[dict[str, list], int]:
    """Turn descriptor rows other than RecordID into event columns; return them and the -1 count."""
    columns: dict[str, list] = {"position": [], "line": [], "code": [], "numeric_value": []}
    missing = 0
    for position, parameter, value, line in zip(positions, parameters, values, lines):
        if parameter == "RecordID":
            continue
        if value == MISSING_DESCRIPTOR_VALUE:
            missing += 1
            continue
        if parameter in CATEGORICAL_DESCRIPTORS:
            code, numeric = f"{STATIC_PREFIX}{parameter}//{_format_category(value)}", None
        else:
            code, numeric = f"{STATIC_PREFIX}{parameter}", float(value)
        columns["position"].append(position)
        columns["line"].append(line)
        columns["code"].append(code)
        columns["numeric_value"].append(numeric)
    return columns, missing


def _parse_stays(stays: list[_StayText], problems: _RowProblems) -> _ParsedStays:
    """Parse one chunk of stays into event rows, counting unparseable rows in `problems`."""
    lines, line_positions, line_numbers = _split_lines(stays)
    valid, parameters, minutes, values, unparseable = _parse_fields(lines)

    locations = [stays[p].location for p in line_positions[unparseable[:MAX_UNPARSEABLE_EXAMPLES]]]
    numbers = line_numbers[unparseable[:MAX_UNPARSEABLE_EXAMPLES]]
    problems.add([f"{loc}:{n}" for loc, n in zip(locations, numbers)], len(unparseable))

    positions = line_positions[valid]
    row_lines = line_numbers[valid]
    is_descriptor = _descriptor_rows(positions, parameters, minutes)
    is_record_id = _to_numpy(pc.equal(parameters, "RecordID"))

    descriptor_index = np.flatnonzero(is_descriptor)
    descriptor_names = parameters.take(descriptor_index).to_pylist()
    record_ids = {
        int(positions[i]): float(values[i])
        for i, name in zip(descriptor_index, descriptor_names)
        if name == "RecordID"
    }
    subject_ids = _subject_ids(stays, record_ids)
    static, n_missing = _descriptor_events(
        positions[descriptor_index], descriptor_names, values[descriptor_index],
        row_lines[descriptor_index],
    )

    # RecordID rows repeated later in a stay are identifiers too, never measurements.
    measurement = np.flatnonzero(~is_descriptor & ~is_record_id)
    measurements = pa.table(
        {
            "subject_id": subject_ids[positions[measurement]],
            "minutes": minutes[measurement],
            "line": row_lines[measurement],
            "code": parameters.take(measurement),
            "numeric_value": pa.array(values[measurement], pa.float64()).cast(pa.float32()),
        }
    )
    return _ParsedStays(
        subject_ids=subject_ids,
        locations=[stay.location for stay in stays],
        events=pa.concat_tables([_static_events_table(static, subject_ids), measurements]),
        n_missing_descriptors=n_missing,
    )


def _static_events_table(static: dict[str, list], subject_ids: np.ndarray) -> pa.Table:
    """Build the event rows of the descriptors, all at admission (minute 0)."""
    positions = np.asarray(static["position"], dtype=np.int64)
    return pa.table(
        {
            "subject_id": subject_ids[positions],
            "minutes": np.zeros(len(positions), np.int64),
            "line": np.asarray(static["line"], np.int64),
            "code": pa.array(static["code"], pa.string()),
            "numeric_value": pa.array(static["numeric_value"], pa.float32()),
        }
    )


def _read_all_stays(sources: list[Path], problems: _RowProblems) -> list[_ParsedStays]:
    parsed: list[_ParsedStays] = []
    for source in sources:
        logger.info("Reading stays from %s", source)
        n_read = 0
        for chunk in _iter_chunks(_iter_stays(source), STAYS_PER_CHUNK):
            parsed.append(_parse_stays(chunk, problems))
            n_read += len(chunk)
            logger.info("Parsed %d stays from %s", n_read, source.name)
    return parsed


def _check_unique_subjects(parsed: list[_ParsedStays]) -> None:
    """Raise `UserInputError` if one RecordID comes from two stay files."""
    first_location: dict[int, str] = {}
    for chunk in parsed:
        for subject_id, location in zip(chunk.subject_ids.tolist(), chunk.locations):
            earlier = first_location.setdefault(subject_id, location)
            if earlier != location:
                raise UserInputError(
                    f"{location} and {earlier} have the same RecordID; pass each set of stays once"
                )


# ---------------------------------------------------------------------------------------------
# Outcomes


def _read_outcomes(paths: list[Path], problems: _RowProblems) -> dict[int, bool]:
    """Read ``In-hospital_death`` per RecordID from all Outcomes files.

    Unparseable rows are counted in `problems`. The same RecordID with two different outcomes
    raises `UserInputError`.
    """
    outcomes: dict[int, bool] = {}
    origin: dict[int, str] = {}
    for path in paths:
        rows = _decode(_read_bytes(path)).splitlines()
        header = [name.strip() for name in rows[0].lstrip("\ufeff").split(",")] if rows else []
        if OUTCOME_ID_COLUMN not in header or OUTCOME_LABEL_COLUMN not in header:
            raise UserInputError(
                f"{path}: expected a header with {OUTCOME_ID_COLUMN} and {OUTCOME_LABEL_COLUMN}, "
                f"got {rows[0][:80] if rows else 'an empty file'!r}; pass an Outcomes-X.txt file "
                "of the challenge or move this file away from the stay files"
            )
        id_column = header.index(OUTCOME_ID_COLUMN)
        label_column = header.index(OUTCOME_LABEL_COLUMN)
        for number, row in enumerate(rows[1:], start=2):
            if not row.strip():
                continue
            location = f"{path.name}:{number}"
            fields = [value.strip() for value in row.split(",")]
            if (
                len(fields) != len(header)
                or not fields[id_column].isdigit()
                or fields[label_column] not in ("0", "1")
            ):
                problems.add([location], 1)
                continue
            record_id, died = int(fields[id_column]), fields[label_column] == "1"
            if outcomes.setdefault(record_id, died) != died:
                raise UserInputError(
                    f"{location} and {origin[record_id]} give different {OUTCOME_LABEL_COLUMN} "
                    "values for one RecordID; keep only the correct row"
                )
            origin.setdefault(record_id, location)
    return outcomes


# ---------------------------------------------------------------------------------------------
# Splits


def _check_split_options(
    split_seed: int, all_to_split: str | None, split_fractions: Sequence[float]
) -> tuple[float, float, float]:
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise UserInputError(f"invalid split seed: expected a non-negative integer, got {split_seed!r}")
    if all_to_split is not None and all_to_split not in meds_write.SPLIT_NAMES:
        raise UserInputError(
            f"invalid split name {all_to_split!r}: expected one of {', '.join(meds_write.SPLIT_NAMES)}"
        )
    fractions = tuple(float(f) for f in split_fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise UserInputError(
            "invalid split fractions: expected three non-negative numbers for train, tuning and "
            f"held_out that sum to 1, got {tuple(split_fractions)!r}"
        )
    return fractions[0], fractions[1], fractions[2]


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split `n` subjects by `fractions` with the largest-remainder method.

    When `n` is at least the number of splits with a non-zero fraction, each of those splits gets
    at least one subject, so that a rare stratum such as the positive labels reaches every split.
    """
    exact = [n * f for f in fractions]
    counts = [int(np.floor(x)) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    used = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(used):
        for i in used:
            if counts[i] == 0:
                donor = max(used, key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _assign_splits(
    subject_ids: np.ndarray,
    outcomes: dict[int, bool],
    seed: int,
    fractions: Sequence[float],
) -> dict[int, str]:
    """Assign each subject to a split, stratified by label, deterministic for `seed`.

    The strata are positive, negative and unlabelled subjects. Each stratum is sorted by
    subject id, shuffled with its own generator seeded from (`seed`, stratum index) and cut by
    `_allocate`, so the result does not depend on the input order.
    NOTE: numpy does not promise to keep the stream of its PCG64 `Generator` across releases.
    So the same seed can give a different split under another numpy version.
    """
    ordered = np.sort(subject_ids)
    labels = [outcomes.get(int(s)) for s in ordered]
    strata = [
        ordered[[label is True for label in labels]],
        ordered[[label is False for label in labels]],
        ordered[[label is None for label in labels]],
    ]
    assignment: dict[int, str] = {}
    for index, stratum in enumerate(strata):
        shuffled = np.random.default_rng([seed, index]).permutation(stratum)
        start = 0
        for split, count in zip(meds_write.SPLIT_NAMES, _allocate(len(stratum), fractions)):
            for subject_id in shuffled[start : start + count].tolist():
                assignment[subject_id] = split
            start += count
    return assignment


# ---------------------------------------------------------------------------------------------
# Output tables


def _events_table(parsed: list[_ParsedStays]) -> pa.Table:
    """Concatenate the chunks and sort by subject, time and line in the stay file."""
    events = pa.concat_tables([chunk.events for chunk in parsed])
    order = pc.sort_indices(
        events,
        sort_keys=[("subject_id", "ascending"), ("minutes", "ascending"), ("line", "ascending")],
    )
    events = events.take(order)
    minutes = _to_numpy(events["minutes"]).astype("timedelta64[m]")
    return pa.table(
        {
            "subject_id": events["subject_id"],
            "time": pa.array(ADMISSION_TIME + minutes, pa.timestamp("us")),
            "code": events["code"],
            "numeric_value": events["numeric_value"],
        }
    )


def _labels_table(subject_ids: np.ndarray, outcomes: dict[int, bool]) -> pa.Table:
    labelled = [int(s) for s in np.sort(subject_ids) if int(s) in outcomes]
    prediction_times = np.full(len(labelled), ADMISSION_TIME + PREDICTION_DELAY)
    return pa.table(
        {
            "subject_id": pa.array(labelled, pa.int64()),
            "prediction_time": pa.array(prediction_times, pa.timestamp("us")),
            "boolean_value": pa.array([outcomes[s] for s in labelled], pa.bool_()),
        }
    )


def _codes_table(events: pa.Table) -> pa.Table:
    codes = sorted(pc.unique(events["code"]).to_pylist())
    return pa.table(
        {
            "code": pa.array(codes, pa.string()),
            "description": pa.array([CODE_DESCRIPTIONS.get(c) for c in codes], pa.string()),
            "parent_codes": pa.array([None] * len(codes), pa.list_(pa.string())),
        }
    )


def _dataset_metadata() -> dict[str, str]:
    return {
        "dataset_name": "PhysioNet/CinC Challenge 2012",
        "dataset_version": "1.0.0",
        "etl_name": "seqsetvae.physionet",
        "etl_version": seqsetvae.__version__,
        "meds_version": _meds_version(),
        "license": "ODC-By-1.0",
    }


def _meds_version() -> str:
    # The tables are validated against the installed `meds` schemas, so that release is the
    # format version: "0.4" for meds 0.4.x.
    return ".".join(meds.__version__.split(".")[:2])


def _write_dataset(
    out_dir: Path,
    events: pa.Table,
    assignment: dict[int, str],
    labels: pa.Table,
) -> dict[str, int]:
    """Write all tables into a staging directory that becomes `out_dir`; return subjects per split."""
    subject_ids = sorted(assignment)
    split_of_subject = pa.array([assignment[s] for s in subject_ids], pa.string())
    split_counts = {name: 0 for name in meds_write.SPLIT_NAMES}
    for name in split_of_subject.to_pylist():
        split_counts[name] += 1

    event_splits = pc.index_in(events["subject_id"], value_set=pa.array(subject_ids, pa.int64()))
    event_splits = split_of_subject.take(event_splits)
    with meds_write.staged_output_dir(out_dir) as root:
        for name in meds_write.SPLIT_NAMES:
            if split_counts[name]:
                shard = events.filter(pc.equal(event_splits, name))
                meds_write.write_data_shard(root, name, shard)
        meds_write.write_subject_splits(
            root,
            pa.table({"subject_id": pa.array(subject_ids, pa.int64()), "split": split_of_subject}),
        )
        meds_write.write_labels(root, LABEL_TASK, labels)
        meds_write.write_codes(root, _codes_table(events))
        meds_write.write_dataset_metadata(root, _dataset_metadata())
    return split_counts


# ---------------------------------------------------------------------------------------------
# Public entry points


def convert_physionet2012(
    raw_paths: list[str | Path],
    out_dir: str | Path,
    split_seed: int = 0,
    all_to_split: str | None = None,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
) -> ConversionReport:
    """Convert PhysioNet 2012 stay files and Outcomes files into a MEDS dataset at `out_dir`.

    Each raw path is a directory (containing ``<RecordID>.txt`` files or ``set-X`` subdirectories),
    a ``.tar.gz`` archive, or an ``Outcomes*.txt`` file. ``Outcomes*.txt`` files beside an archive
    or directory, or inside a directory, are read as well. `all_to_split` puts every subject into
    that one split (for an external test set) instead of the seeded train/tuning/held_out split.
    `out_dir` must be missing or empty.

    Raises `UserInputError` for a missing or unreadable input, a non-empty `out_dir`, duplicate
    RecordIDs, conflicting outcomes and invalid split options.
    """
    out_path = Path(out_dir)
    fractions = _check_split_options(split_seed, all_to_split, split_fractions)
    meds_write.check_output_dir(out_path)
    inputs = _resolve_inputs(raw_paths)

    problems = _RowProblems()
    parsed = _read_all_stays(inputs.stay_sources, problems)
    _check_unique_subjects(parsed)
    outcomes = _read_outcomes(inputs.outcome_paths, problems)

    subject_ids = np.concatenate([chunk.subject_ids for chunk in parsed])
    subject_outcomes = {int(s): outcomes[int(s)] for s in subject_ids if int(s) in outcomes}
    if all_to_split is None:
        assignment = _assign_splits(subject_ids, subject_outcomes, split_seed, fractions)
    else:
        assignment = {int(s): all_to_split for s in subject_ids}

    events = _events_table(parsed)
    n_without_events = len(subject_ids) - len(pc.unique(events["subject_id"]))
    if n_without_events:
        # NOTE: such subjects stay in the splits and labels although no event row names them.
        logger.warning("%d stays have no convertible rows and no events", n_without_events)
    labels = _labels_table(subject_ids, subject_outcomes)
    split_counts = _write_dataset(out_path, events, assignment, labels)

    report = ConversionReport(
        n_subjects=len(subject_ids),
        n_events=events.num_rows,
        n_labels=labels.num_rows,
        n_positive=sum(subject_outcomes.values()),
        n_unparseable_rows=problems.count,
        n_missing_descriptors=sum(chunk.n_missing_descriptors for chunk in parsed),
        n_subjects_without_outcome=len(subject_ids) - len(subject_outcomes),
        split_counts=split_counts,
        unparseable_examples=problems.examples,
    )
    logger.info(
        "Wrote %d subjects and %d events to %s (%d unparseable rows)",
        report.n_subjects, report.n_events, out_path, report.n_unparseable_rows,
    )
    return report


PREPARERS = {"physionet2012": convert_physionet2012}


def prepare(
    dataset: str,
    raw_paths: list[str | Path],
    out_dir: str | Path,
    split_seed: int = 0,
    all_to_split: str | None = None,
) -> ConversionReport:
    """Convert the raw files of `dataset` (a key of `PREPARERS`) into a MEDS dataset at `out_dir`.

    This backs ``seqsetvae prepare <dataset> --raw ... --out ...``.
    """
    converter = PREPARERS.get(dataset)
    if converter is None:
        raise UserInputError(
            f"unknown dataset {dataset!r}: expected one of {', '.join(sorted(PREPARERS))}"
        )
    return converter(raw_paths, out_dir, split_seed=split_seed, all_to_split=all_to_split)
