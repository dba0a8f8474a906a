"""Drift results are Evidently's: the same tests, scores and decisions as its DataDriftPreset."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from modelloop.schemas import REF_PREDICTION
from modelloop.synthetic import SyntheticTask
from monitoring.drift import ReferenceProfile, check_drift, stattests

FEATURES = [f"f{i:02d}" for i in range(20)]


def frame(task: SyntheticTask, n: int, seed: int, shift: dict[str, float] | None = None) -> pd.DataFrame:
    df = task.sample(n, seed=seed, shift=shift)[FEATURES].astype(np.float64)
    # a discrete feature (three values, none rare) makes Evidently pick another test for it
    z = (df["f19"] - df["f19"].mean()) / df["f19"].std()
    df["f19"] = np.digitize(z, [-0.5, 0.5]).astype(np.float64)
    return df


def evidently_preset(ref: pd.DataFrame, cur: pd.DataFrame, method: str | None,
                     threshold: float | None) -> tuple[dict[str, tuple[str, float]], dict[str, Any]]:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    dd = DataDefinition(numerical_columns=list(ref.columns))
    snap = Report([DataDriftPreset(method=method, threshold=threshold)]).run(
        Dataset.from_pandas(cur, data_definition=dd), Dataset.from_pandas(ref, data_definition=dd))
    metrics = snap.dict()["metrics"]
    per_column = {m["config"]["column"]: (m["config"]["method"], float(m["value"]))
                  for m in metrics[1:]}
    return per_column, metrics[0]["value"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ref_rows", "method", "threshold", "shift"),
    [
        (2000, None, None, {"f03": 0.5, "f07": -0.5}),   # Evidently's default: Wasserstein > 1000 rows
        (800, None, None, {"f03": 0.5, "f07": -0.5}),    # its default for small references: K-S
        (2000, "psi", None, {"f01": 0.3}),               # PSI from settings
        (2000, "jensenshannon", 0.15, {"f05": 0.5}),     # a method and a threshold from settings
        (2000, "ks", 0.01, {}),                          # K-S on stationary data
    ],
)
def test_same_scores_and_decisions_as_evidentlys_preset(
        task: SyntheticTask, ref_rows: int, method: str | None, threshold: float | None,
        shift: dict[str, float]) -> None:
    ref = frame(task, ref_rows, seed=1)
    cur = frame(task, 1500, seed=3, shift=shift)
    profile = ReferenceProfile(ref, FEATURES, method=method, threshold=threshold)
    ours = check_drift(profile, cur.to_numpy(), drift_share=0.5)
    theirs, count = evidently_preset(ref, cur, method, threshold)
    st = stattests()
    registered = {t.name: t.display_name for t in vars(st).values() if isinstance(t, st.StatTest)}
    for col in ours.features:
        display, score = theirs[col.column]
        # Evidently names an automatic choice by its display name, a configured one as given
        assert display in (registered[col.method], method), col.column
        assert col.score == pytest.approx(score, rel=1e-9, abs=1e-12), col.column
    drifted_theirs = {c for c, (_, s) in theirs.items()
                      if _drifted(next(f for f in ours.features if f.column == c), s)}
    assert set(ours.drifted_features) == drifted_theirs
    assert ours.share == pytest.approx(count["share"])
    assert len(ours.drifted_features) == count["count"]
    expected = set(shift)
    if expected:
        assert set(ours.drifted_features) == expected


def _drifted(col: Any, score: float) -> bool:
    return score <= col.threshold if col.p_value else score >= col.threshold


def test_stationary_windows_flag_nothing_and_two_shifted_features_are_found(
        task: SyntheticTask) -> None:
    ref = frame(task, 3000, seed=1)
    profile = ReferenceProfile(ref, FEATURES)
    for seed in (10, 11, 12):
        result = check_drift(profile, frame(task, 2000, seed=seed).to_numpy())
        assert result.judged and result.drifted_features == [] and result.share == 0.0
    shifted = check_drift(profile, frame(task, 2000, seed=13, shift={"f03": 1.0, "f07": -1.0}).to_numpy(),
                          drift_share=0.1)
    assert shifted.drifted_features == ["f03", "f07"]
    assert shifted.share == pytest.approx(0.1) and shifted.dataset_drift
    methods = {c.column: c.method for c in shifted.features}
    assert methods["f00"] == "wasserstein" and methods["f19"] == "jensenshannon"


def test_a_window_below_the_minimum_is_not_judged(task: SyntheticTask) -> None:
    profile = ReferenceProfile(frame(task, 2000, seed=1), FEATURES)
    result = check_drift(profile, frame(task, 99, seed=2).to_numpy(), min_rows=100)
    assert not result.judged and result.features == []
    assert result.note == "99 rows in the window, fewer than the 100 needed to judge drift"


def test_missing_values_are_dropped_like_evidently_does(task: SyntheticTask) -> None:
    ref = frame(task, 2000, seed=1)
    cur = frame(task, 1500, seed=2)
    cur.loc[cur.index[:300], "f02"] = np.nan
    cur["f04"] = np.nan  # a column with no value left: undecided, not drifted
    ours = check_drift(ReferenceProfile(ref, FEATURES), cur.to_numpy())
    by_col = {c.column: c for c in ours.features}
    expected = stattests().wasserstein_stat_test(ref["f02"], cur["f02"].dropna(),
                                                 _numerical(), None)
    assert by_col["f02"].score == pytest.approx(expected.drift_score)
    assert by_col["f04"].method == "none" and not by_col["f04"].drifted


def _numerical() -> Any:
    from evidently.legacy.core import ColumnType

    return ColumnType.Numerical


def test_prediction_drift_uses_evidentlys_categorical_test(task: SyntheticTask) -> None:
    ref = frame(task, 2000, seed=1)
    rng = np.random.default_rng(0)
    ref[REF_PREDICTION] = (rng.random(len(ref)) < 0.3).astype(int)
    profile = ReferenceProfile(ref, FEATURES)
    cur = frame(task, 1500, seed=2).to_numpy()
    same = check_drift(profile, cur, (rng.random(1500) < 0.3).astype(float))
    moved = check_drift(profile, cur, (rng.random(1500) < 0.6).astype(float))
    assert same.prediction is not None and moved.prediction is not None
    assert same.prediction.method == "jensenshannon" and not same.prediction.drifted
    assert moved.prediction.drifted


def test_a_method_that_does_not_fit_numbers_falls_back_to_the_default(task: SyntheticTask) -> None:
    # chi-squared is defined for categorical columns only; numerical features keep Evidently's
    # default (with its own threshold), the categorical prediction gets chi-squared
    ref = frame(task, 2000, seed=1)
    ref[REF_PREDICTION] = np.arange(len(ref)) % 2
    profile = ReferenceProfile(ref, FEATURES, method="chisquare", threshold=0.01)
    result = check_drift(profile, frame(task, 1500, seed=2).to_numpy(),
                         (np.arange(1500) % 2).astype(float))
    assert {c.method for c in result.features[:19]} == {"wasserstein"}
    assert result.features[0].threshold == 0.1
    assert result.prediction is not None
    assert (result.prediction.method, result.prediction.threshold) == ("chisquare", 0.01)


def test_reference_problems_are_named(task: SyntheticTask) -> None:
    ref = frame(task, 100, seed=1)
    with pytest.raises(ValueError, match=r"reference sample lacks features \['zz'\]"):
        ReferenceProfile(ref, [*FEATURES, "zz"])
    ref["f00"] = np.nan
    with pytest.raises(ValueError, match="reference column 'f00' has no finite values"):
        ReferenceProfile(ref, FEATURES)


def mixed(n: int, rng: np.random.Generator, shift: dict[int, float] | None = None,
          correlate: float = 0.0) -> np.ndarray:
    """20 features of mixed kinds, as real tables have them: normal, lognormal, uniform,
    Poisson counts and small integers (four of each); ``shift`` adds to columns (in sd of a
    standard normal); ``correlate`` makes the standard normal columns 0 and 5 correlated by that
    much, each keeping its distribution."""
    kinds = [lambda: rng.normal(size=n), lambda: rng.lognormal(size=n),
             lambda: rng.uniform(size=n), lambda: rng.poisson(3, size=n).astype(float),
             lambda: rng.integers(0, 4, size=n).astype(float)]
    x = np.column_stack([kinds[j % 5]() for j in range(20)])
    for j, d in (shift or {}).items():
        x[:, j] += d
    if correlate:
        x[:, 0] = correlate * x[:, 5] + np.sqrt(1 - correlate**2) * x[:, 0]
    return x


@pytest.mark.slow
def test_calibrated_drift_alarms_at_the_stated_rate_and_finds_real_shifts() -> None:
    rng = np.random.default_rng(7)
    reference = pd.DataFrame(mixed(4000, rng), columns=FEATURES)
    profile = ReferenceProfile(reference, FEATURES, method="calibrated", false_alarm_rate=0.01)
    assert profile.threshold == pytest.approx(0.01 / 20)
    windows = 60
    for n in (200, 500, 1000, 2000):
        alarms = sum(check_drift(profile, mixed(n, rng)).dataset_drift for _ in range(windows))
        # at most 1% expected: 0.6 of 60; 3 or more would be a rate the setting does not state
        assert alarms <= 2, (n, alarms)
    # the same windows judged on Evidently's fixed thresholds alarm on noise at small sizes
    fixed = ReferenceProfile(reference, FEATURES, method="auto")
    noisy = sum(check_drift(fixed, mixed(200, rng), drift_share=0.05).dataset_drift
                for _ in range(20))
    assert noisy >= 15, noisy
    # one feature of 20 shifted by 1 sd is a dataset drift at 1000 rows, naming that feature
    one = check_drift(profile, mixed(1000, rng, {0: 1.0}))
    assert one.dataset_drift and one.drifted_features == ["f00"]
    # 0.5 sd on 2 of 20 at 500 rows
    two = check_drift(profile, mixed(500, rng, {0: 0.5, 5: 0.5}))
    assert two.dataset_drift and set(two.drifted_features) >= {"f00", "f05"}
    assert all(c.p_value and c.method == "ks" for c in two.features)


def test_calibrated_drift_refuses_a_rate_outside_0_1(task: SyntheticTask) -> None:
    ref = frame(task, 500, seed=1)
    with pytest.raises(ValueError, match="false_alarm_rate"):
        ReferenceProfile(ref, FEATURES, method="calibrated", false_alarm_rate=1.5)


@pytest.mark.slow
def test_joint_drift_alarms_at_the_stated_rate_and_finds_a_new_correlation() -> None:
    rng = np.random.default_rng(11)
    reference = pd.DataFrame(mixed(4000, rng), columns=FEATURES)
    profile = ReferenceProfile(reference, FEATURES, method="calibrated", false_alarm_rate=0.01)
    dependence = profile.dependence
    assert dependence.threshold == pytest.approx(0.01 / 190)  # 190 pairs of 20 features
    for n in (200, 500, 1000, 2000):
        alarms = sum(dependence.check(mixed(n, rng)).drifted for _ in range(60))
        assert alarms <= 2, (n, alarms)  # 0.6 expected of 60
    # f00 and f05 become correlated (0.9), each keeping its distribution: the per-feature tests
    # see nothing, the joint check names the pair in each of two 1000-row windows
    for _ in range(2):
        result = check_drift(profile, mixed(1000, rng, correlate=0.9))
        assert result.drifted_features == [] and not result.dataset_drift
        assert result.multivariate is not None and result.multivariate.drifted
        assert result.multivariate.pairs == ["f00~f05"]
        assert result.multivariate.statistic < result.multivariate.threshold
    # a correlation the reference has, lost in the window, is found too
    correlated = ReferenceProfile(pd.DataFrame(mixed(4000, rng, correlate=0.6), columns=FEATURES),
                                  FEATURES, method="calibrated")
    assert not correlated.dependence.check(mixed(1000, rng, correlate=0.6)).drifted
    assert correlated.dependence.check(mixed(1000, rng)).pairs == ["f00~f05"]


def test_joint_drift_leaves_missing_values_out_pair_by_pair(task: SyntheticTask) -> None:
    ref = frame(task, 2000, seed=1)
    ref.loc[ref.index[:200], "f01"] = np.nan  # the reference may miss values too
    profile = ReferenceProfile(ref, FEATURES, method="calibrated")
    cur = frame(task, 1500, seed=2)
    cur.loc[cur.index[:600], "f02"] = np.nan
    cur["f04"] = np.nan  # no value left: its pairs are not tested
    result = check_drift(profile, cur.to_numpy())
    assert result.multivariate is not None and not result.multivariate.drifted
    assert result.multivariate.tested_pairs == 190 - 19
    assert 0 < result.multivariate.statistic <= 1


def test_reports_render_on_drift_onset_or_at_the_interval_not_on_flicker(tmp_path) -> None:
    from prometheus_client import CollectorRegistry

    from modelloop.registry import Registry
    from monitoring.drift import ColumnDrift, DriftResult
    from monitoring.evaluate import Evaluator
    from monitoring.ingest import ModelCatalog
    from monitoring.metrics import MonitorMetrics
    from monitoring.policy import PolicyEngine, load_policy
    from monitoring.settings import MonitorSettings
    from monitoring.store import open_store

    settings = MonitorSettings(home=tmp_path, report_interval_s=600)
    store = open_store(settings.store_dsn, "t_", "NORMAL")
    evaluator = Evaluator(settings, store, ModelCatalog(Registry(tmp_path / "registry"), []),
                          PolicyEngine(load_policy(settings.policy_file)),
                          MonitorMetrics(CollectorRegistry()), on_fire=lambda f, v: None)

    def result(*drifted: str) -> DriftResult:
        cols = [ColumnDrift(f, "ks", 0.0005, 0.0 if f in drifted else 0.5, f in drifted, True)
                for f in ("f00", "f01", "f02")]
        return DriftResult("m", 1, 1000, 2000, True, cols, len(drifted) / 3, 1 / 3,
                           bool(drifted))
    try:
        assert evaluator._report_due("m", result(), now=0)  # the first judged window
        assert not evaluator._report_due("m", result(), now=60)
        assert evaluator._report_due("m", result("f01"), now=120)  # drift sets in: at once
        # the drifted features change while drifted, or drift goes away: within the interval, no
        assert not evaluator._report_due("m", result("f01", "f02"), now=180)
        assert not evaluator._report_due("m", result(), now=240)
        assert not evaluator._report_due("m", result("f00"), now=300)
        assert evaluator._report_due("m", result(), now=120 + 600)  # the interval
    finally:
        evaluator.close(5)
        store.close()
