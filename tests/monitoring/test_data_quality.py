"""Data quality of a window against a reference: missing and out-of-support shares per feature,
and the share of rows with any feature out of support."""

from __future__ import annotations

import numpy as np
import pytest

from modelloop.synthetic import SyntheticTask
from monitoring.data_quality import window_quality

NAMES = ["a", "b", "c"]
LOWER = np.array([0.0, -1.0, 10.0])
UPPER = np.array([1.0, 1.0, 20.0])
NAN = np.nan


@pytest.mark.parametrize(
    ("rows", "missing", "outside", "rows_outside"),
    [
        # all inside, the bounds themselves included
        ([[0.0, -1.0, 10.0], [1.0, 1.0, 20.0]], [0, 0, 0], [0, 0, 0], 0.0),
        # one value below, one above: two rows of four out of support
        ([[-0.1, 0, 15], [0.5, 0, 15], [0.5, 1.5, 15], [0.5, 0, 15]], [0, 0, 0],
         [0.25, 0.25, 0], 0.5),
        # missing values are missing, never out of support
        ([[NAN, 0, 15], [NAN, NAN, 15], [0.5, 0, 15], [0.5, 0, 15]], [0.5, 0.25, 0], [0, 0, 0],
         0.0),
        # one row with every feature outside counts once among the rows
        ([[5, 5, 5], [0.5, 0, 15]], [0, 0, 0], [0.5, 0.5, 0.5], 0.5),
    ],
)
def test_shares_per_feature_and_per_row(rows: list[list[float]], missing: list[float],
                                        outside: list[float], rows_outside: float) -> None:
    quality = window_quality(NAMES, LOWER, UPPER, np.array(rows, dtype=np.float64))
    assert quality.rows == len(rows)
    assert [f.missing_share for f in quality.features] == pytest.approx(missing)
    assert [f.out_of_support_share for f in quality.features] == pytest.approx(outside)
    assert quality.out_of_support_rows_share == pytest.approx(rows_outside)
    assert quality.max_missing_share == pytest.approx(max(missing))


def test_an_empty_window_has_no_shares() -> None:
    quality = window_quality(NAMES, LOWER, UPPER, np.zeros((0, 3)))
    assert quality.rows == 0 and quality.features == [] and quality.max_missing_share == 0.0


def test_unchanged_data_stays_in_support_and_a_moved_feature_leaves_it(
        task: SyntheticTask) -> None:
    names = task.feature_names
    ref = task.sample(2000, seed=1)[names]
    lower, upper = ref.min().to_numpy(), ref.max().to_numpy()
    same = window_quality(names, lower, upper, task.sample(1000, seed=2)[names].to_numpy())
    # by chance about 2 x 20 features / 2001 reference rows of new rows lie outside: 2%
    assert same.out_of_support_rows_share < 0.05
    moved = window_quality(names, lower, upper,
                           task.sample(1000, seed=3, shift={"f02": 6.0})[names].to_numpy())
    f02 = next(f for f in moved.features if f.feature == "f02")
    assert f02.out_of_support_share > 0.9 and moved.out_of_support_rows_share > 0.9
    assert "f02" in moved.out_of_support_features().split(", ")
    assert moved.worst_missing() == ""
    missing = task.sample(1000, seed=4, missing=0.2)[names].to_numpy()
    q = window_quality(names, lower, upper, missing)
    assert q.max_missing_share == pytest.approx(0.2, abs=0.05)
