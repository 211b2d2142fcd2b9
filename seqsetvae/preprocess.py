"""Code vocabulary and per-code value normalisation, fitted on the train split only.

The fitted state is plain lists and floats, so it is stored in JSON next to the
tensor cache and inside every checkpoint and export.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seqsetvae.batch import N_SPECIAL_CODES, UNK_CODE

logger = logging.getLogger(__name__)

# A code whose clipped training values have a standard deviation below this is
# scaled by 1 instead, so constant codes do not divide by zero.
MIN_STD = 1e-6
# Normalised values are bounded to this many standard deviations.
MAX_ABS_NORMALISED = 10.0


@dataclass
class Preprocessor:
    """Vocabulary and robust per-code normalisation statistics.

    Attributes:
        codes: Known codes; code `codes[i]` has vocabulary index `i + N_SPECIAL_CODES`.
        lower: Per-code lower clip bound (train quantile q); NaN for codes without values.
        upper: Per-code upper clip bound (train quantile 1 - q).
        mean: Per-code mean of the clipped train values.
        std: Per-code standard deviation of the clipped train values, at least MIN_STD, else 1.
        clip_quantile: The q used for the bounds.
    """

    codes: list[str]
    lower: list[float]
    upper: list[float]
    mean: list[float]
    std: list[float]
    clip_quantile: float

    @property
    def vocab_size(self) -> int:
        return len(self.codes) + N_SPECIAL_CODES

    @classmethod
    def fit(cls, events: pa.Table, clip_quantile: float) -> "Preprocessor":
        """Fit the vocabulary and statistics on one train-split event table."""
        return fit_streaming(lambda: [events], clip_quantile)

    def code_indices(self, codes: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Map codes to vocabulary indices, unknown codes to UNK_CODE."""
        positions = pc.index_in(codes, value_set=pa.array(self.codes, pa.string()))
        indices = pc.add(positions, N_SPECIAL_CODES).to_numpy(zero_copy_only=False)
        # index_in gives null for unknown codes, which becomes NaN in the float view.
        return np.where(np.isnan(indices.astype(np.float64)), UNK_CODE, indices).astype(np.int32)

    def normalise(self, indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Clip and standardise values by code; returns (values, has_value).

        Unknown codes and codes without training values keep no value.
        """
        table_index = indices.astype(np.int64) - N_SPECIAL_CODES
        known = table_index >= 0
        safe_index = np.where(known, table_index, 0)
        lower = np.asarray(self.lower, dtype=np.float64)[safe_index]
        upper = np.asarray(self.upper, dtype=np.float64)[safe_index]
        mean = np.asarray(self.mean, dtype=np.float64)[safe_index]
        std = np.asarray(self.std, dtype=np.float64)[safe_index]
        has_value = known & np.isfinite(values) & np.isfinite(mean)
        clipped = np.clip(values, lower, upper)
        normalised = np.clip((clipped - mean) / std, -MAX_ABS_NORMALISED, MAX_ABS_NORMALISED)
        normalised = np.where(has_value, normalised, 0.0).astype(np.float32)
        return normalised, has_value

    def count_clipped(self, indices: np.ndarray, values: np.ndarray) -> int:
        """Count values outside their code's clip bounds."""
        return sum(self.count_clipped_per_code(indices, values).values())

    def count_clipped_per_code(self, indices: np.ndarray, values: np.ndarray) -> dict[str, int]:
        """Return the number of values outside the clip bounds of each code, for codes with at least one."""
        table_index = indices.astype(np.int64) - N_SPECIAL_CODES
        known = (table_index >= 0) & np.isfinite(values)
        safe_index = np.where(known, table_index, 0)
        lower = np.asarray(self.lower)[safe_index]
        upper = np.asarray(self.upper)[safe_index]
        with np.errstate(invalid="ignore"):
            outside = known & ((values < lower) | (values > upper))
        counts = np.bincount(table_index[outside], minlength=len(self.codes))
        return {self.codes[i]: int(counts[i]) for i in np.flatnonzero(counts)}

    def to_dict(self) -> dict:
        return {
            "codes": list(self.codes),
            "lower": _nan_to_none(self.lower),
            "upper": _nan_to_none(self.upper),
            "mean": _nan_to_none(self.mean),
            "std": list(self.std),
            "clip_quantile": self.clip_quantile,
        }

    @classmethod
    def from_dict(cls, state: dict) -> "Preprocessor":
        return cls(
            codes=list(state["codes"]),
            lower=_none_to_nan(state["lower"]),
            upper=_none_to_nan(state["upper"]),
            mean=_none_to_nan(state["mean"]),
            std=[float(x) for x in state["std"]],
            clip_quantile=float(state["clip_quantile"]),
        )

    def fingerprint(self) -> str:
        """Return a short hash that changes whenever the fitted state changes."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in values]


def _none_to_nan(values: list[float | None]) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


VALUE_SAMPLE_SIZE = 50_000
"""Values kept per code in the first fitting pass: all of them up to this count, a uniform sample beyond."""

QUANTILE_WINDOW_SE = 6.0
"""Half-width, in standard errors of the sample rank, of the value window that the exact quantile pass collects.

The rank of a sample q-quantile from K uniform draws has a standard error of
sqrt(q * (1 - q) * K) positions, so by the normal approximation a window of 6
of them misses the exact order statistic with a probability of about 2e-9.
"""


class _CodeIds:
    """Map code strings to dense ids in order of first appearance, one chunk at a time."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def encode(self, codes: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Return the id of each code as int64 [n], adding unseen codes."""
        encoded = pc.dictionary_encode(codes)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        new_ids = [self.ids.setdefault(code, len(self.ids)) for code in encoded.dictionary.to_pylist()]
        lookup = np.array(new_ids, dtype=np.int64)
        return lookup[encoded.indices.to_numpy(zero_copy_only=False)]


class ValueSample:
    """Exact per-code counts and a per-code bottom-k sample of values.

    Each value gets a random key and the K values with the smallest keys stay.
    A code keeps all its values while it has at most K of them, and beyond K
    the kept values are a uniform sample without replacement, so memory is at
    most K values per code.
    """

    def __init__(self, capacity: int = VALUE_SAMPLE_SIZE, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"expected a capacity of at least 1, got {capacity}")
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.count = np.zeros(0, dtype=np.int64)
        self.values: dict[int, np.ndarray] = {}
        self.keys: dict[int, np.ndarray] = {}

    def add(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Add finite `values` [n] of the codes `ids` [n]."""
        counts = np.bincount(ids, minlength=len(self.count))
        self.count = np.r_[self.count, np.zeros(len(counts) - len(self.count), dtype=np.int64)] + counts
        order = np.argsort(ids, kind="stable")
        ids, values = ids[order], values[order]
        keys = self.rng.random(len(values))
        for code, start, end in _runs(ids):
            kept_values = np.concatenate([self.values.get(code, values[:0]), values[start:end]])
            kept_keys = np.concatenate([self.keys.get(code, keys[:0]), keys[start:end]])
            if len(kept_values) > self.capacity:
                smallest = np.argpartition(kept_keys, self.capacity - 1)[: self.capacity]
                kept_values, kept_keys = kept_values[smallest], kept_keys[smallest]
            self.values[code], self.keys[code] = kept_values, kept_keys

    def sorted_values(self, code: int) -> np.ndarray:
        return np.sort(self.values[code])

    def sampled_codes(self) -> list[int]:
        """Return the codes with more values than the sample keeps, whose sample quantiles are estimates."""
        return [code for code in self.values if self.count[code] > self.capacity]


def _runs(sorted_ids: np.ndarray):
    """Yield (id, start, end) for each run of equal values in `sorted_ids`."""
    if not len(sorted_ids):
        return
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    ends = np.r_[starts[1:], len(sorted_ids)]
    for start, end in zip(starts.tolist(), ends.tolist()):
        yield int(sorted_ids[start]), start, end


def _order_statistic_ranks(n: int, q: float) -> tuple[int, int, float]:
    """Return the two 0-based ranks and the weight of the upper one in the linear-interpolation q-quantile of n values.

    This is the default method of numpy.quantile and pandas: position (n - 1) * q.
    """
    position = (n - 1) * q
    low = int(np.floor(position))
    return low, min(low + 1, n - 1), position - low


def _lerp(a: float, b: float, weight: float) -> float:
    """Interpolate from a to b as numpy.quantile does, so the result matches it to the last bit."""
    if weight >= 0.5:
        return b - (b - a) * (1 - weight)
    return a + (b - a) * weight


class ClippedMoments:
    """Exact per-code count, mean and sum of squared deviations of clipped values, merged chunk by chunk.

    Chunks are merged with the pairwise update of Chan, Golub and LeVeque
    (1979), which avoids the cancellation of a running sum of squares.
    """

    def __init__(self, n_codes: int) -> None:
        self.count = np.zeros(n_codes)
        self.mean = np.zeros(n_codes)
        self.m2 = np.zeros(n_codes)

    def add(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Add clipped finite `values` [n] of the codes `ids` [n]."""
        n_codes = len(self.count)
        count = np.bincount(ids, minlength=n_codes).astype(np.float64)
        total = np.bincount(ids, weights=values, minlength=n_codes)
        mean = np.divide(total, count, out=np.zeros(n_codes), where=count > 0)
        m2 = np.bincount(ids, weights=(values - mean[ids]) ** 2, minlength=n_codes)
        merged = self.count + count
        delta = mean - self.mean
        share = np.divide(count, merged, out=np.zeros(n_codes), where=merged > 0)
        self.m2 += m2 + delta**2 * self.count * share
        self.mean += delta * share
        self.count = merged

    def mean_and_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the mean and the sample standard deviation (ddof 1) per code, NaN where undefined."""
        mean = np.where(self.count > 0, self.mean, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.where(self.count > 1, np.sqrt(self.m2 / (self.count - 1)), np.nan)
        return mean, std


def fit_streaming(
    chunks: Callable[[], Iterable[pa.Table]], clip_quantile: float, sample_size: int = VALUE_SAMPLE_SIZE
) -> Preprocessor:
    """Fit a Preprocessor over chunks of train events, holding one chunk at a time.

    `chunks` returns a fresh iterable of tables with `code` and `numeric_value`
    columns on each call. The first pass collects the vocabulary, the count of
    values per code and a value sample per code. Codes with more values than
    the sample keeps get a second pass that collects only the values near their
    sample quantiles, so every clip bound is the exact linear-interpolation
    quantile of numpy and pandas. The last pass computes the exact mean and
    standard deviation of the clipped values.
    """
    code_ids = _CodeIds()
    sample = ValueSample(sample_size)
    for events in chunks():
        sample.add(*_finite_values(events, code_ids))
    n_codes = len(code_ids.ids)
    quantiles = (clip_quantile, 1.0 - clip_quantile)

    bounds = np.full((n_codes, 2), np.nan)
    for code in sample.values:
        bounds[code] = np.quantile(sample.values[code], quantiles)
    sampled = sample.sampled_codes()
    if sampled:
        logger.info("Refining the clip quantiles of %d codes with more than %d values", len(sampled), sample_size)
        bounds[sampled] = _exact_quantiles(chunks, code_ids, sample, sampled, quantiles)

    moments = ClippedMoments(n_codes)
    for events in chunks():
        ids, values = _finite_values(events, code_ids)
        moments.add(ids, np.clip(values, bounds[ids, 0], bounds[ids, 1]))
    mean, std = moments.mean_and_std()
    std = np.where(np.isfinite(std) & (std >= MIN_STD), std, 1.0)

    # Ids follow first appearance; the vocabulary is sorted.
    codes = sorted(code_ids.ids)
    order = np.array([code_ids.ids[code] for code in codes], dtype=np.int64)
    logger.info("Fitted vocabulary of %d codes, %d with numeric values", n_codes, int(np.isfinite(mean).sum()))
    return Preprocessor(
        codes=codes,
        lower=bounds[order, 0].tolist(),
        upper=bounds[order, 1].tolist(),
        mean=mean[order].tolist(),
        std=std[order].tolist(),
        clip_quantile=float(clip_quantile),
    )


def _exact_quantiles(
    chunks: Callable[[], Iterable[pa.Table]],
    code_ids: _CodeIds,
    sample: ValueSample,
    codes: list[int],
    quantiles: tuple[float, float],
) -> np.ndarray:
    """Return the exact quantiles [len(codes), 2] of `codes` from one more pass over the chunks.

    For each code and quantile, the sample gives a value window [low, high]
    that contains the exact order statistics with near certainty. The pass counts
    the values below the window and keeps the values inside it. Where the
    window misses, which QUANTILE_WINDOW_SE makes very unlikely, the sample
    quantile is kept and a warning is logged.
    """
    n_codes = len(code_ids.ids)
    low = np.full((n_codes, 2), np.inf)
    high = np.full((n_codes, 2), -np.inf)
    for code in codes:
        values = sample.sorted_values(code)
        k = len(values)
        for j, q in enumerate(quantiles):
            spread = QUANTILE_WINDOW_SE * np.sqrt(q * (1 - q) * k) + 2
            first, last = int(np.floor(q * (k - 1) - spread)), int(np.ceil(q * (k - 1) + spread))
            low[code, j] = values[first] if first >= 0 else -np.inf
            high[code, j] = values[last] if last < k else np.inf

    below = np.zeros((n_codes, 2), dtype=np.int64)
    inside: list[list[tuple[np.ndarray, np.ndarray]]] = [[], []]
    for events in chunks():
        ids, values = _finite_values(events, code_ids)
        for j in range(2):
            below[:, j] += np.bincount(ids, weights=values < low[ids, j], minlength=n_codes).astype(np.int64)
            kept = (values >= low[ids, j]) & (values <= high[ids, j])
            inside[j].append((ids[kept], values[kept]))

    result = np.full((len(codes), 2), np.nan)
    row_of = {code: row for row, code in enumerate(codes)}
    n_missed = 0
    for j, q in enumerate(quantiles):
        ids = np.concatenate([part[0] for part in inside[j]])
        values = np.concatenate([part[1] for part in inside[j]])
        order = np.lexsort((values, ids))
        ids, values = ids[order], values[order]
        for code, start, end in _runs(ids):
            first, second, weight = _order_statistic_ranks(int(sample.count[code]), q)
            first, second = first - below[code, j], second - below[code, j]
            if first < 0 or second >= end - start:
                continue
            result[row_of[code], j] = _lerp(values[start + first], values[start + second], weight)
        missed = [code for code in codes if np.isnan(result[row_of[code], j])]
        for code in missed:
            result[row_of[code], j] = np.quantile(sample.values[code], q)
        n_missed += len(missed)
    if n_missed:
        logger.warning("%d clip quantiles fell outside their sample window; kept the sample estimates", n_missed)
    return result


def _finite_values(events: pa.Table, code_ids: _CodeIds) -> tuple[np.ndarray, np.ndarray]:
    """Return the code ids and float64 values [n] of the events that have a finite value."""
    ids = code_ids.encode(events.column("code"))
    values = events.column("numeric_value").to_numpy(zero_copy_only=False).astype(np.float64)
    finite = np.isfinite(values)
    return ids[finite], values[finite]
