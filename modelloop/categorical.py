"""Rows of a model with categorical features, as serving, monitoring and retraining hold them.

A categorical feature's raw values (strings) go into the ONNX graph, which codes them itself
(ONNX-ML ``LabelEncoder``, training/export.py), so no Python code decides a code that the model
sees. Outside the graph a row is a list in ``feature_names`` order: a float (NaN missing) per
numeric feature, a ``str`` (None missing) per categorical one; many rows are an object matrix
``[rows, n_features]``. A model without categorical features keeps float32 matrices everywhere.

The graph's two inputs (modelloop.schemas ``INPUT_NAME`` and ``CATEGORIES_INPUT``)::

    feeds(meta, rows)   # {"input": float32 [n, n_numeric], "categories": str [n, n_categorical]}

A missing categorical value is fed as the empty string, which no vocabulary holds: code 0, the
model's "unknown", like a value it never saw (counted by :func:`unknown_counts`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from modelloop.schemas import CATEGORIES_INPUT, INPUT_NAME, ModelMetadata

MISSING = ""
"""What a missing categorical value is fed as (no vocabulary holds it: code 0)."""


def is_categorical(meta: ModelMetadata) -> bool:
    """Whether the model takes categorical features (rows are object matrices)."""
    return bool(meta.categories)


@lru_cache(maxsize=64)
def _columns(feature_names: tuple[str, ...], categorical: frozenset[str]) -> tuple[list[int], list[int]]:
    numeric = [j for j, f in enumerate(feature_names) if f not in categorical]
    cats = [j for j, f in enumerate(feature_names) if f in categorical]
    return numeric, cats


def columns(meta: ModelMetadata) -> tuple[list[int], list[int]]:
    """The positions in ``feature_names`` of the numeric features and of the categorical ones."""
    return _columns(tuple(meta.feature_names), frozenset(meta.categories))


def feeds(meta: ModelMetadata, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's inputs for ``rows`` (object ``[n, n_features]``): the numeric columns as
    float32 (None read as NaN), the categorical ones as strings (None as :data:`MISSING`)."""
    numeric, cats = columns(meta)
    x = np.asarray(rows[:, numeric], dtype=np.float32) if numeric else np.empty((len(rows), 0), np.float32)
    text = rows[:, cats]
    missing: np.ndarray = np.equal(text, None)  # type: ignore[call-overload]  # elementwise, in C
    if missing.any():
        text = text.copy()
        text[missing] = MISSING
    return {INPUT_NAME: x, CATEGORIES_INPUT: text.astype(object)}


def unknown_counts(meta: ModelMetadata, rows: np.ndarray) -> dict[str, int]:
    """Per categorical feature, the rows whose value the model's vocabulary does not hold
    (missing values not counted): what takes the graph's unknown code."""
    _, cats = columns(meta)
    out: dict[str, int] = {}
    for j in cats:
        name = meta.feature_names[j]
        known = _vocabulary(meta, name)
        out[name] = sum(1 for v in rows[:, j] if v is not None and v != MISSING and v not in known)
    return out


def _vocabulary(meta: ModelMetadata, name: str) -> frozenset[str]:
    return _frozen(tuple(meta.categories[name]))


@lru_cache(maxsize=256)
def _frozen(values: tuple[str, ...]) -> frozenset[str]:
    return frozenset(values)

