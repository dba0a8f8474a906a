"""Data and prediction drift of a window against the model version's reference sample.

The statistics are Evidently's: each column goes through Evidently 0.7's own test (its legacy
``stattests`` registry), chosen the way Evidently chooses it (``get_stattest``: its default by
column type and reference size, or the method from settings) and cleaned the way its
``DataDriftPreset`` cleans it (infinities and NaN dropped). What makes a check fast is done around
those functions, without changing their results:

* the reference is profiled once per version: cleaned, sorted columns, and each column's test
  resolved up front wherever Evidently's choice does not depend on the current data;
* columns are handed over sorted (every test here is order-free; sorted input is what makes
  scipy's rank-based distances several times faster);
* only the tests run: none of the preset's histograms, correlations and widgets (the HTML report
  is rendered separately, off the hot path, see :mod:`monitoring.reports`).

The share of drifted features and the dataset flag (share >= ``drift_share``) follow
Evidently's ``DriftedColumnsCount``.

``method="calibrated"`` (the sidecar's default) makes every decision one with a known
false-alarm rate instead: each feature and the prediction go through Evidently's two-sample
Kolmogorov-Smirnov test, whose p-value accounts for the sizes of both the window and the
reference, and a feature drifts when its p-value is below ``false_alarm_rate / k`` over ``k``
features (Bonferroni). The dataset drifts when any feature does, so on a stationary window the
dataset flag is raised with probability at most ``false_alarm_rate`` whatever the window size,
and one strongly shifted feature of 20 is a dataset drift. KS on features with few distinct values
(ties) is conservative: it alarms less often than the rate, never more. Rabanser et al. (2019,
"Failing Loudly") found univariate tests with a Bonferroni correction among the best shift
detectors.

Categorical features (``categories``: the version's ``ModelMetadata.categories``, whose reference
columns hold strings) go through a chi-squared test of homogeneity on category counts instead
(window against reference, a 2 x K table: each category the reference holds often enough to
expect 5 rows in the smaller sample, and one cell for the rest, values the reference never had
among them). Its p-value accounts for both samples' sizes, as KS does, and takes the same
threshold. Each categorical column is also tested for a rise in its share of unknown values
(not in the model's vocabulary, which the graph codes 0): Fisher's exact test, one-sided, window
against reference, reported in ``DriftResult.unknown``. With ``calibrated`` both are members of
the Bonferroni family (``k`` counts a categorical column twice), so a stationary window still
raises the dataset flag with probability at most ``false_alarm_rate``; a rise in unknown values
drifts the dataset and names its column among ``drifted_features``.

Per-feature tests cannot see the features' joint distribution change while each keeps its own;
every check also runs :mod:`monitoring.multivariate` (pairwise dependence of the numeric
features at ``false_alarm_rate``, whatever the method), reported apart in
``DriftResult.multivariate`` (None for a model whose features are all categorical).

Example::

    profile = ReferenceProfile(reference_df, meta.feature_names, method=None, threshold=None)
    result = check_drift(profile, window.features, window.prediction, drift_share=0.5)
    result.drifted_features   # ["f03", "f07"]
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from modelloop.schemas import REF_PREDICTION
from monitoring.multivariate import DependenceProfile, MultivariateDrift

CALIBRATED = "calibrated"
"""Per-feature KS p-values against a Bonferroni-corrected false-alarm rate (see above)."""

# settings name -> Evidently's registered stattest name
METHODS = {"ks": "ks", "psi": "psi", "wasserstein": "wasserstein",
           "jensenshannon": "jensenshannon", "chisquare": "chisquare"}
CATEGORY_TEST = "chisquare"
"""The method name a categorical column's test reports (a chi-squared p-value)."""
DEFAULT_CATEGORY_THRESHOLD = 0.05
"""A categorical column's p-value threshold where the configured method is a distance."""
MIN_EXPECTED = 5
"""Rows a category must be expected to have in the smaller sample to keep its own cell."""
P_VALUE_TESTS = {"ks", "chisquare", "z", "t_test", "fisher_exact", "g_test", "anderson",
                 "cramer_von_mises", "epps_singleton", "mannw", "empirical_mmd"}


def stattests() -> Any:
    """Evidently's stattests module (imported on first use: it takes seconds)."""
    from evidently.legacy.calculations import stattests as st

    return st


def column_types() -> Any:
    from evidently.legacy.core import ColumnType

    return ColumnType


@dataclass(frozen=True)
class ColumnDrift:
    """One column's test: Evidently's stattest name, its threshold, score and decision."""

    column: str
    method: str
    threshold: float
    score: float
    drifted: bool
    p_value: bool
    """True when the score is a p-value (drift when low), False for a distance (drift when high)."""


@dataclass(frozen=True)
class UnknownShare:
    """A categorical column's share of values the model's vocabulary lacks, in the window and in
    the reference (missing values not counted), and whether the window's share rose."""

    column: str
    share: float
    reference_share: float
    p_value: float
    """One-sided Fisher's exact test: the window's share is no higher than the reference's."""
    threshold: float
    risen: bool


@dataclass
class DriftResult:
    """A judged (or, below the minimum window, unjudged) drift check of one model version."""

    model: str
    version: int
    rows: int
    reference_rows: int
    judged: bool
    features: list[ColumnDrift] = field(default_factory=list)
    share: float = 0.0
    drift_share: float = 0.5
    dataset_drift: bool = False
    prediction: ColumnDrift | None = None
    multivariate: MultivariateDrift | None = None
    """The joint-distribution check (pairs of features), at its own stated false-alarm rate."""
    unknown: list[UnknownShare] = field(default_factory=list)
    """Per categorical column: the share of values the model does not know, and its rise."""
    checked_at: float = field(default_factory=time.time)
    duration_s: float = 0.0
    note: str = ""

    @property
    def drifted_features(self) -> list[str]:
        """Columns whose distribution drifted, then those whose unknown values rose."""
        out = [c.column for c in self.features if c.drifted]
        return out + [u.column for u in self.unknown if u.risen and u.column not in out]

    @property
    def unknown_risen(self) -> list[str]:
        return [u.column for u in self.unknown if u.risen]

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["drifted_features"] = self.drifted_features
        return out


class ReferenceProfile:
    """A version's reference sample, prepared once for many drift checks."""

    def __init__(self, reference: pd.DataFrame, feature_names: list[str], *,
                 method: str | None = None, threshold: float | None = None,
                 prediction_categorical: bool = True, false_alarm_rate: float = 0.01,
                 categories: Mapping[str, Sequence[str]] | None = None) -> None:
        missing = [f for f in feature_names if f not in reference.columns]
        if missing:
            raise ValueError(f"reference sample lacks features {missing}")
        if not feature_names:
            raise ValueError("no features to watch")
        ct = column_types()
        self.feature_names = list(feature_names)
        self.vocabulary = {f: frozenset(v) for f, v in (categories or {}).items() if f in feature_names}
        """Categorical feature -> the values the model knows (a value not in it is unknown)."""
        self.numeric = [f for f in self.feature_names if f not in self.vocabulary]
        self.calibrated = method == CALIBRATED
        self.prediction_threshold = threshold
        if self.calibrated:
            if not 0 < false_alarm_rate < 1:
                raise ValueError(f"false_alarm_rate must be in (0, 1), not {false_alarm_rate}")
            # every test is KS (a p-value), numerical; each feature at rate / k, so any of the k
            # features drifting on a stationary window has probability <= rate
            self.method: str | None = "ks"
            # a categorical column has two tests: its categories and its unknown values
            threshold = false_alarm_rate / (len(self.feature_names) + len(self.vocabulary))
            self.prediction_threshold = false_alarm_rate
            prediction_categorical = False
        else:
            self.method = METHODS[method] if method and method != "auto" else None
        self.threshold = threshold
        self.category_threshold = (threshold if threshold is not None and (
            self.calibrated or self.method in P_VALUE_TESTS) else DEFAULT_CATEGORY_THRESHOLD)
        """The p-value below which a categorical column drifts (or its unknown values rose)."""
        self.rows = len(reference)
        self.columns: dict[str, pd.Series] = {}
        self._tests: dict[str, Any] = {}
        for name in self.numeric:
            col = _clean_sorted(reference[name].to_numpy(dtype=np.float64))
            if col.empty:
                raise ValueError(f"reference column {name!r} has no finite values")
            self.columns[name] = col
            self._tests[name] = self._resolve(col, None, ct.Numerical, self.method)
        self.counts: dict[str, Counter[str]] = {}
        """Categorical feature -> its reference values' counts (missing values left out)."""
        for name in self.vocabulary:
            self.counts[name] = Counter(present_values(reference[name].to_numpy(dtype=object)))
            if not self.counts[name]:
                raise ValueError(f"reference column {name!r} has no values")
        sorted_columns = [self.columns[n].to_numpy() for n in self.numeric]
        bounds = {n: (c[0], c[-1]) for n, c in zip(self.numeric, sorted_columns, strict=True)}
        self.lower = np.array([bounds.get(n, (np.nan, np.nan))[0] for n in self.feature_names])
        """Each feature's smallest reference value (its support's lower end; NaN for a
        categorical feature, which has no range)."""
        self.upper = np.array([bounds.get(n, (np.nan, np.nan))[1] for n in self.feature_names])
        self._numeric_at = [self.feature_names.index(n) for n in self.numeric]
        self.dependence = DependenceProfile(
            sorted_columns, reference[self.numeric].to_numpy(dtype=np.float64),
            self.numeric, false_alarm_rate) if self.numeric else None
        self.prediction_type = ct.Categorical if prediction_categorical else ct.Numerical
        self.prediction: pd.Series | None = None
        if REF_PREDICTION in reference.columns:
            self.prediction = _clean_sorted(reference[REF_PREDICTION].to_numpy(dtype=np.float64))

    def _resolve(self, ref: pd.Series, cur: pd.Series | None, col_type: Any,
                 method: str | None) -> Any:
        """Evidently's test for the column, or None while it depends on the current data."""
        st = stattests()
        if method is not None:
            try:
                return st.get_stattest(ref, ref.iloc[:0], col_type, method)
            except ValueError:
                method = None  # not defined for this column type: Evidently's default instead
        if cur is None:
            # Evidently's default counts distinct values of reference and current together; with
            # more than 5 in the reference alone, the current data cannot change the choice.
            if ref.nunique() <= 5:
                return None
            cur = ref.iloc[:0]
        return st.get_stattest(ref, cur, col_type, None)

    def threshold_for(self, test: Any, threshold: float | None = None) -> float | None:
        """The configured threshold (the features', or ``threshold``) where the configured method
        runs (or with ``auto``); a fallback test keeps its own default."""
        if self.method is None or test.name == self.method:
            return self.threshold if threshold is None else threshold
        return None

    def test_for(self, name: str, cur: pd.Series) -> Any:
        test = self._tests[name]
        if test is None:
            test = self._resolve(self.columns[name], cur, column_types().Numerical, None)
        return test


def _clean_sorted(values: np.ndarray) -> pd.Series:
    values = values[np.isfinite(values)]
    return pd.Series(np.sort(values), copy=False)


def _run(test: Any, name: str, ref: pd.Series, cur: pd.Series, col_type: Any,
         threshold: float | None) -> ColumnDrift:
    res = test(ref, cur, col_type, threshold)
    return ColumnDrift(column=name, method=test.name, threshold=float(res.actual_threshold),
                       score=float(res.drift_score), drifted=bool(res.drifted),
                       p_value=test.name in P_VALUE_TESTS)


def check_drift(profile: ReferenceProfile, features: np.ndarray,
                prediction: np.ndarray | None = None, *, model: str = "", version: int = 0,
                drift_share: float = 0.5, min_rows: int = 1) -> DriftResult:
    """Test every feature (and the prediction) of ``features`` (rows x features, NaN missing)."""
    started = time.perf_counter()
    rows = 0 if features is None else len(features)
    result = DriftResult(model=model, version=version, rows=rows, reference_rows=profile.rows,
                         judged=False, drift_share=drift_share)
    if rows < min_rows:
        result.note = f"{rows} rows in the window, fewer than the {min_rows} needed to judge drift"
        return result
    if features.shape[1] != len(profile.feature_names):
        raise ValueError(f"window has {features.shape[1]} features, the reference "
                         f"{len(profile.feature_names)}")
    num = column_types().Numerical
    for j, name in enumerate(profile.feature_names):
        if name in profile.vocabulary:
            values = present_values(features[:, j])
            result.features.append(_category_drift(profile, name, values))
            result.unknown.append(_unknown_share(profile, name, values))
            continue
        cur = _clean_sorted(np.asarray(features[:, j], dtype=np.float64))
        if cur.empty:  # Evidently refuses an empty column; report it undecided, not drifted
            result.features.append(ColumnDrift(name, "none", float("nan"), float("nan"),
                                               False, False))
            continue
        test = profile.test_for(name, cur)
        result.features.append(_run(test, name, profile.columns[name], cur, num,
                                    profile.threshold_for(test)))
    n = len(result.features)
    result.share = sum(c.drifted for c in result.features) / n if n else 0.0
    if profile.calibrated:  # the Bonferroni family: any drifted feature is a dataset drift
        result.drift_share = 1 / n
    result.dataset_drift = result.share >= result.drift_share or bool(result.unknown_risen)
    if prediction is not None and profile.prediction is not None and len(profile.prediction):
        cur = _clean_sorted(np.asarray(prediction, dtype=np.float64))
        if not cur.empty:
            test = profile._resolve(profile.prediction, cur, profile.prediction_type,
                                    profile.method)
            result.prediction = _run(test, "prediction", profile.prediction, cur,
                                     profile.prediction_type,
                                     profile.threshold_for(test, profile.prediction_threshold))
    if profile.dependence is not None:
        numeric = (features if not profile.vocabulary
                   else np.asarray(features[:, profile._numeric_at], dtype=np.float64))
        result.multivariate = profile.dependence.check(numeric)
    result.judged = True
    result.duration_s = time.perf_counter() - started
    return result


def present_values(column: np.ndarray) -> list[str]:
    """A categorical column's values, missing ones (None, NaN, the empty string) left out."""
    return [v if type(v) is str else str(v) for v in column.tolist()
            if v is not None and v == v and v != ""]


def category_p_value(reference: Mapping[str, int], current: Sequence[str]) -> float:
    """Chi-squared test of homogeneity of ``current``'s categories and the ``reference``
    counts: one cell per reference category expected to hold ``MIN_EXPECTED`` rows in the
    smaller sample, one for every other value (a value the reference never had among them). That
    cell joins the smallest kept one when both samples together put fewer than ``MIN_EXPECTED``
    rows in it at the smaller sample's size: a stray new value then counts for little, as the
    chi-squared approximation needs (one value in 500 rows against 3000 would add 6 to the
    statistic), while a surge of new values keeps its own cell and is seen."""
    from scipy.stats import chi2_contingency

    n_ref, n_cur = sum(reference.values()), len(current)
    if not n_ref or not n_cur:
        return 1.0
    smaller = min(n_ref, n_cur)
    kept = sorted((c for c, k in reference.items() if k * smaller >= MIN_EXPECTED * n_ref),
                  key=lambda c: -reference[c])
    seen = Counter(current)
    ref = [reference[c] for c in kept]
    cur = [seen.get(c, 0) for c in kept]
    ref_other, cur_other = n_ref - sum(ref), n_cur - sum(cur)
    if kept and (ref_other + cur_other) * smaller < MIN_EXPECTED * (n_ref + n_cur):
        ref[-1] += ref_other
        cur[-1] += cur_other
    else:
        ref.append(ref_other)
        cur.append(cur_other)
    table = np.array([ref, cur], dtype=np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return float(chi2_contingency(table, correction=False).pvalue)


def _category_drift(profile: ReferenceProfile, name: str, values: list[str]) -> ColumnDrift:
    if not values:  # like an empty numeric column: undecided, not drifted
        return ColumnDrift(name, "none", float("nan"), float("nan"), False, False)
    p = category_p_value(profile.counts[name], values)
    t = profile.category_threshold
    return ColumnDrift(name, CATEGORY_TEST, t, p, p < t, True)


def _unknown_share(profile: ReferenceProfile, name: str, values: list[str]) -> UnknownShare:
    from scipy.stats import fisher_exact

    known = profile.vocabulary[name]
    ref = profile.counts[name]
    ref_unknown = sum(k for c, k in ref.items() if c not in known)
    ref_n = sum(ref.values())
    cur_unknown = sum(1 for v in values if v not in known)
    t = profile.category_threshold
    if not values:
        return UnknownShare(name, float("nan"), ref_unknown / ref_n, 1.0, t, False)
    p = float(fisher_exact([[cur_unknown, len(values) - cur_unknown],
                            [ref_unknown, ref_n - ref_unknown]], alternative="greater").pvalue)
    return UnknownShare(name, cur_unknown / len(values), ref_unknown / ref_n, p, t, p < t)
