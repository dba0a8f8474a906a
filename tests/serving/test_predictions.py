"""The /predict answer built from byte pieces must be the dicts' JSON, byte for byte."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.predictions import (
    COLUMNS_FROM_ROWS,
    Predictions,
    answer_json,
    records_json,
    request_ids,
    to_records,
)


def classifier(n: int, names: list[str], seed: int = 0) -> Predictions:
    rng = np.random.default_rng(seed)
    # powers spread the probabilities over many magnitudes (exponent notation included)
    p = (rng.random((n, len(names))) ** rng.integers(1, 40, size=(n, len(names)))).astype(np.float32)
    p[0, 0] = 0.0
    index = p.argmax(axis=1)
    return Predictions(index.astype(np.int64), np.asarray(names, dtype=object)[index], p, names)


def regressor(n: int, seed: int = 0) -> Predictions:
    v = np.random.default_rng(seed).normal(scale=1e6, size=n)
    v[:4] = [np.nan, 1e300, -0.0, 5e-324][:n]
    return Predictions(v, None, None, None)


def dicts_answer(model: str, version: int, base: str, preds: Predictions) -> bytes:
    """The answer as the dicts give it: what answer_json must write, byte for byte."""
    return orjson.dumps({"model": model, "version": version, "request_id": base,
                         "predictions": to_records(preds, request_ids(base, len(preds)))})


@pytest.mark.parametrize("n", [1, 31, 32, 1024])
@pytest.mark.parametrize("kind", ["binary", "three classes", "odd labels", "duplicate labels", "regression"])
def test_records_json_is_the_dicts_json(n: int, kind: str) -> None:
    names = {"binary": ["no", "yes"], "three classes": ["a", "b", "c"],
             "odd labels": ['say "hi"', "naïve\\", "\u2028", "1"], "duplicate labels": ["x", "x", "y"]}
    preds = regressor(n) if kind == "regression" else classifier(n, names[kind])
    base = 'req-"7"' if kind == "odd labels" else "ab12cd34"
    expected = orjson.dumps(to_records(preds, request_ids(base, n)))
    assert records_json(preds, base) == expected
    assert len(orjson.loads(expected)) == n
    assert answer_json("m", 3, base, preds) == dicts_answer("m", 3, base, preds)


ROWS = st.integers(1, 3 * COLUMNS_FROM_ROWS)  # both sides of the switch to columns
FLOATS = st.floats(width=32) | st.sampled_from([0.0, -0.0, 1e-45, 3.4028235e38, 1.1754944e-38])
LABELS = st.text(max_size=6) | st.sampled_from(["no", "yes", '"', "\\", "\u2028", "1", ""])
IDS = st.from_regex(r"[A-Za-z0-9._:-]{1,20}", fullmatch=True)


@st.composite
def classifiers(draw: st.DrawFn) -> Predictions:
    n = draw(ROWS)
    names = draw(st.lists(LABELS, min_size=1, max_size=5))  # duplicates too: the dicts collapse them
    p = np.asarray(draw(st.lists(st.lists(FLOATS, min_size=len(names), max_size=len(names)),
                                 min_size=n, max_size=n)), dtype=np.float32)
    index = np.asarray(draw(st.lists(st.integers(0, len(names) - 1), min_size=n, max_size=n)), np.int64)
    return Predictions(index, np.asarray(names, dtype=object)[index], p, names)


@st.composite
def regressors(draw: st.DrawFn) -> Predictions:
    values = draw(st.lists(st.floats() | st.sampled_from([5e-324, -0.0, 1e300]), min_size=1,
                           max_size=3 * COLUMNS_FROM_ROWS))
    return Predictions(np.asarray(values, dtype=np.float64), None, None, None)


@given(classifiers() | regressors(), IDS, st.integers(1, 10**6))
@settings(max_examples=300, deadline=None, database=None, derandomize=True)
def test_the_answer_is_the_dicts_json_for_generated_predictions(preds: Predictions, base: str, version: int) -> None:
    assert answer_json("churn", version, base, preds) == dicts_answer("churn", version, base, preds)
