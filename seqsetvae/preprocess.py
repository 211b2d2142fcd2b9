"""Code vocabulary and per-code value normalisation, fitted on the train split only.

The fitted state is plain lists and floats, so it is stored in JSON next to the
tensor cache and inside every checkpoint and export.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
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
        """Fit the vocabulary and statistics on a train-split event table."""
        frame = pd.DataFrame(
            {
                "code": events.column("code").to_numpy(zero_copy_only=False),
                "value": events.column("numeric_value").to_numpy(zero_copy_only=False).astype(np.float64),
            }
        )
        codes = sorted(frame["code"].unique().tolist())
        finite = frame[np.isfinite(frame["value"])]
        grouped = finite.groupby("code")["value"]
        lower = grouped.quantile(clip_quantile)
        upper = grouped.quantile(1.0 - clip_quantile)
        bounds = pd.DataFrame({"lower": lower, "upper": upper})
        clipped = finite.join(bounds, on="code")
        clipped["value"] = clipped["value"].clip(clipped["lower"], clipped["upper"])
        stats = clipped.groupby("code")["value"].agg(["mean", "std"])
        stats = stats.join(bounds).reindex(codes)
        std = stats["std"].to_numpy()
        std = np.where(np.isfinite(std) & (std >= MIN_STD), std, 1.0)
        logger.info("Fitted vocabulary of %d codes, %d with numeric values", len(codes), int(stats["mean"].notna().sum()))
        return cls(
            codes=codes,
            lower=stats["lower"].astype(float).tolist(),
            upper=stats["upper"].astype(float).tolist(),
            mean=stats["mean"].astype(float).tolist(),
            std=std.astype(float).tolist(),
            clip_quantile=float(clip_quantile),
        )

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
        table_index = indices.astype(np.int64) - N_SPECIAL_CODES
        known = (table_index >= 0) & np.isfinite(values)
        safe_index = np.where(known, table_index, 0)
        lower = np.asarray(self.lower)[safe_index]
        upper = np.asarray(self.upper)[safe_index]
        with np.errstate(invalid="ignore"):
            outside = known & ((values < lower) | (values > upper))
        return int(outside.sum())

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
