"""Data quality of a window: per feature, the share of rows missing (NaN) and the share outside
the reference's range (out of support), and the share of rows with any feature out of support.

Out of support is where a model's behaviour, and the confidence-based accuracy estimate learned on
the reference, are extrapolations: the sidecar marks the estimate unreliable once the share of
such rows passes ``MAX_OUT_OF_SUPPORT_SHARE``. Events carry finite numbers or NaN only (ingest
refuses infinities), so there is no invalid-value share to count beyond these.

Example::

    quality = window_quality(names, lower, upper, window_matrix)
    quality.out_of_support_rows_share    # 0.12
    quality.features[3].missing_share    # 0.3
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FeatureQuality:
    feature: str
    missing_share: float
    """Share of the window's rows where the feature is missing (NaN)."""
    out_of_support_share: float
    """Share of the window's rows where the feature lies outside the reference's [min, max]."""


@dataclass
class DataQuality:
    rows: int
    features: list[FeatureQuality] = field(default_factory=list)
    out_of_support_rows_share: float = 0.0
    """Share of rows with at least one feature outside the reference's range."""

    @property
    def max_missing_share(self) -> float:
        return max((f.missing_share for f in self.features), default=0.0)

    def worst_missing(self) -> str:
        """The features with the largest missing share (for a policy firing's detail)."""
        top = self.max_missing_share
        return ", ".join(f.feature for f in self.features if top > 0 and f.missing_share == top)

    def out_of_support_features(self) -> str:
        return ", ".join(f.feature for f in self.features if f.out_of_support_share > 0)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["max_missing_share"] = self.max_missing_share
        return out


def window_quality(feature_names: list[str], lower: np.ndarray, upper: np.ndarray,
                   features: np.ndarray) -> DataQuality:
    """Missing and out-of-support shares of ``features`` (rows x features, NaN missing) against
    the reference's per-feature ``lower`` and ``upper`` bounds. An object matrix (a model with
    categorical features) holds strings in the columns whose bounds are NaN: a value there is
    missing when None, NaN or the empty string, and never out of support."""
    if features.dtype == object:
        return _object_quality(feature_names, lower, upper, features)
    x = np.asarray(features, dtype=np.float64)
    rows = len(x)
    if rows == 0:
        return DataQuality(rows=0)
    return _quality(feature_names, lower, upper, x, np.isnan(x))


def _is_missing(value: object) -> bool:
    return value is None or value != value or value == ""


_missing = np.frompyfunc(_is_missing, 1, 1)


def _object_quality(feature_names: list[str], lower: np.ndarray, upper: np.ndarray,
                    features: np.ndarray) -> DataQuality:
    if len(features) == 0:
        return DataQuality(rows=0)
    missing = _missing(features).astype(bool)
    x = np.full(features.shape, np.nan)
    numeric = ~np.isnan(lower)
    x[:, numeric] = np.where(missing[:, numeric], np.nan, features[:, numeric]).astype(np.float64)
    return _quality(feature_names, lower, upper, x, missing)


def _quality(feature_names: list[str], lower: np.ndarray, upper: np.ndarray, x: np.ndarray,
             missing: np.ndarray) -> DataQuality:
    rows = len(x)
    with np.errstate(invalid="ignore"):
        outside = (x < lower) | (x > upper)  # NaN compares False: missing is not out of support
    missing_share = missing.mean(axis=0)
    outside_share = outside.mean(axis=0)
    return DataQuality(
        rows=rows,
        features=[FeatureQuality(name, float(missing_share[j]), float(outside_share[j]))
                  for j, name in enumerate(feature_names)],
        out_of_support_rows_share=float(outside.any(axis=1).mean()),
    )
