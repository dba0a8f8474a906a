"""The confidence-based estimate is calibrated on the reference rows the model never saw."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from modelloop.schemas import REF_LABEL, REF_PROBA_PREFIX, REF_SPLIT
from monitoring.evaluate import _calibration


def _rows(n: int, confidence: float, accuracy: float, split: str, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 2, n)
    right = rng.random(n) < accuracy
    label = np.where(right, pred, 1 - pred)
    p1 = np.where(pred == 1, confidence, 1 - confidence)
    return pd.DataFrame({REF_PROBA_PREFIX + "0": 1 - p1, REF_PROBA_PREFIX + "1": p1,
                         REF_LABEL: label, REF_SPLIT: split})


@pytest.mark.parametrize(
    ("holdout_rows", "expected"),
    [
        # enough holdout rows: the estimate follows what the model does on unseen rows (0.7)
        (400, 0.7),
        # too few holdout rows to calibrate on: all rows are used (mostly training rows, 0.99)
        (20, 0.97),
    ],
)
def test_calibrates_on_holdout_rows(holdout_rows: int, expected: float) -> None:
    # the same confidence (0.9) on both splits, but the model is right far more often on the
    # rows it was trained on: calibrating on those would promise too much
    ref = pd.concat([_rows(2000, 0.9, 0.99, "train", 0), _rows(holdout_rows, 0.9, 0.7, "holdout", 1)])
    cal = _calibration(ref, [REF_PROBA_PREFIX + "0", REF_PROBA_PREFIX + "1"])
    window = _rows(1000, 0.9, 0.7, "train", 2)[[REF_PROBA_PREFIX + "0", REF_PROBA_PREFIX + "1"]]
    assert cal.expected_accuracy(window.to_numpy()) == pytest.approx(expected, abs=0.04)


def test_without_split_column_uses_every_row() -> None:
    ref = _rows(1000, 0.8, 0.8, "train", 3).drop(columns=[REF_SPLIT])
    cal = _calibration(ref, [REF_PROBA_PREFIX + "0", REF_PROBA_PREFIX + "1"])
    assert cal.reference_accuracy == pytest.approx(0.8, abs=0.04)
