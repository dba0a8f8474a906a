"""The /predict answer built from byte pieces must be the dicts' JSON, byte for byte."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from serving.predictions import Predictions, records_json, request_ids, to_records


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
