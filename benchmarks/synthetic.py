"""Generate a MEDS dataset of any size with the shape of the PhysioNet 2012 demo: hourly sets of a few lab values.

Each subject has about 80 sets of about 6 events, so about 500 events: 200,000
subjects make about 100 million events. Subjects are split 80/10/10 into train,
tuning and held_out, and every split is written in shards of
`subjects_per_shard` subjects, sorted by subject and time as MEDS requires.

    python -m benchmarks.synthetic --subjects 10000 --out /tmp/meds-10k
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seqsetvae.meds_write import write_labels, write_subject_splits
from seqsetvae.physionet import DEMO_DATA_DIR

N_CODES = 120
VALUED_FRACTION = 0.85
MIN_SETS, EXTRA_SETS_MEAN = 20, 60
EXTRA_EVENTS_PER_SET_MEAN = 5.25
MEAN_GAP_HOURS = 0.6
PREDICTION_HOURS = 48
POSITIVE_FRACTION = 0.14
SPLIT_FRACTIONS = {"train": 0.8, "tuning": 0.1, "held_out": 0.1}
EVENT_SCHEMA = pa.schema(
    [
        ("subject_id", pa.int64()),
        ("time", pa.timestamp("us")),
        ("code", pa.string()),
        ("numeric_value", pa.float32()),
    ]
)
US_PER_HOUR = 3_600_000_000
BASE_TIME_US = 1_600_000_000 * 1_000_000  # September 2020


def code_table(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw the code names, their frequencies and the value distribution of each code."""
    frequency = 1.0 / np.arange(1, N_CODES + 1) ** 0.8
    return {
        "name": np.array([f"LAB//{i:03d}" for i in range(N_CODES)]),
        "probability": frequency / frequency.sum(),
        "valued": rng.random(N_CODES) < VALUED_FRACTION,
        "mean": rng.normal(50.0, 30.0, N_CODES),
        "scale": rng.uniform(1.0, 20.0, N_CODES),
    }


def subject_events(subject_ids: np.ndarray, codes: dict, rng: np.random.Generator) -> pa.Table:
    """Generate the events of `subject_ids`, sorted by subject and time."""
    n_sets = MIN_SETS + rng.poisson(EXTRA_SETS_MEAN, len(subject_ids))
    set_subject = np.repeat(subject_ids, n_sets)
    gaps_us = (rng.exponential(MEAN_GAP_HOURS, len(set_subject)) * US_PER_HOUR).astype(np.int64) + 60_000_000
    first_of_subject = np.r_[0, np.cumsum(n_sets)[:-1]]
    gaps_us[first_of_subject] = rng.integers(0, 365 * 24 * US_PER_HOUR, len(subject_ids))
    # Times restart at each subject: a cumulative sum minus the subject's running total before it.
    cumulative = np.cumsum(gaps_us)
    before_subject = np.repeat(cumulative[first_of_subject] - gaps_us[first_of_subject], n_sets)
    set_time = BASE_TIME_US + cumulative - before_subject

    n_events = 1 + rng.poisson(EXTRA_EVENTS_PER_SET_MEAN, len(set_subject))
    event_subject = np.repeat(set_subject, n_events)
    event_time = np.repeat(set_time, n_events)
    code = rng.choice(N_CODES, size=len(event_subject), p=codes["probability"])
    value = codes["mean"][code] + codes["scale"][code] * rng.standard_normal(len(code))
    outlier = rng.random(len(code)) < 0.002
    value[outlier] *= 25.0
    value = np.where(codes["valued"][code], value, np.nan).astype(np.float32)

    dictionary = pa.array(codes["name"])
    return pa.table(
        {
            "subject_id": pa.array(event_subject, pa.int64()),
            "time": pa.array(event_time, pa.timestamp("us")),
            "code": pa.DictionaryArray.from_arrays(pa.array(code.astype(np.int32)), dictionary).cast(pa.string()),
            "numeric_value": pa.array(value, pa.float32(), from_pandas=True),
        },
        schema=EVENT_SCHEMA,
    )


def generate(out: str | Path, n_subjects: int, subjects_per_shard: int = 5000, seed: int = 0) -> dict:
    """Write a MEDS dataset of `n_subjects` subjects to `out` and return its counts and the seconds it took."""
    start = time.perf_counter()
    out = Path(out)
    rng = np.random.default_rng(seed)
    codes = code_table(rng)
    subject_ids = np.arange(1, n_subjects + 1, dtype=np.int64) * 7
    split_of = rng.choice(list(SPLIT_FRACTIONS), size=n_subjects, p=list(SPLIT_FRACTIONS.values()))

    n_events = 0
    first_times = {}
    for split in SPLIT_FRACTIONS:
        ids = subject_ids[split_of == split]
        (out / "data" / split).mkdir(parents=True, exist_ok=True)
        for shard, shard_start in enumerate(range(0, len(ids), subjects_per_shard)):
            events = subject_events(ids[shard_start : shard_start + subjects_per_shard], codes, rng)
            pq.write_table(events, out / "data" / split / f"{shard}.parquet", row_group_size=1_000_000)
            n_events += events.num_rows
            subject = events.column("subject_id").to_numpy()
            first = np.r_[True, subject[1:] != subject[:-1]]
            times = events.column("time").cast(pa.int64()).to_numpy()
            first_times.update(zip(subject[first].tolist(), times[first].tolist()))

    write_subject_splits(out, pa.table({"subject_id": pa.array(subject_ids), "split": pa.array(split_of.tolist())}))
    prediction_us = np.array([first_times[s] for s in subject_ids.tolist()]) + PREDICTION_HOURS * US_PER_HOUR
    labels = pa.table(
        {
            "subject_id": pa.array(subject_ids),
            "prediction_time": pa.array(prediction_us, pa.timestamp("us")),
            "boolean_value": pa.array(rng.random(n_subjects) < POSITIVE_FRACTION),
        }
    )
    write_labels(out, "in_hospital_mortality", labels)
    return {"subjects": n_subjects, "events": n_events, "seconds": time.perf_counter() - start}


def demo_or_generated(out: Path, n_subjects: int) -> Path:
    """Return the bundled demo dataset when `n_subjects` is 0, else generate `n_subjects` subjects at `out`."""
    if not n_subjects:
        return DEMO_DATA_DIR
    generate(out, n_subjects)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, required=True, help="number of subjects")
    parser.add_argument("--out", required=True, help="output MEDS directory; use a temporary directory")
    parser.add_argument("--subjects-per-shard", type=int, default=5000, help="subjects per parquet shard")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()
    print(generate(args.out, args.subjects, args.subjects_per_shard, args.seed))


if __name__ == "__main__":
    main()
