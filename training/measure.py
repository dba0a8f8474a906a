"""A registered version measured and fed again: the rules every step that derives a version from
it (quantize, prune, ensemble) reads from the version instead of recomputing training's.

Training measures a model through its net's hooks (``TabularNet.layout``, ``evaluation_set``,
``evaluate``); a later step holds only the version (its ONNX graph, metadata and reference
sample), so this module applies the same rules from what the version records: the input shape,
the task, the complete ``config`` (split seed, an anomaly detector's ``anomaly_ratio``), the
metrics (an anomaly detector's ``threshold``) and the dataset indices of its reference rows
(``lineage.reference_rows``, written by :mod:`training.pipeline`)::

    ds = training_data(meta)                       # training.quantize
    split = split_dataset(ds, ...)                 # as the version's config says
    x, y = evaluation_set(meta, config, layout(ds.features[split.test], meta.inputs[0].shape),
                          ds.target[split.test])
    metrics = evaluate_outputs(meta, y, run_onnx(session, x)[output]).metrics  # == meta.metrics
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from modelloop.schemas import REF_SPLIT, ModelMetadata, Task
from training.anomaly import AutoencoderParams, anomaly_metrics, with_injected_anomalies
from training.config import TrainingConfig
from training.data import DataError, Split
from training.evaluate import Evaluation, evaluate
from training.pipeline import REFERENCE_ROWS, subsample, with_outputs

KEPT_LINEAGE = ("dataset_rows", "original_dataset", REFERENCE_ROWS)
"""Lineage a derived version keeps from its source: what reproduces its data and reference."""


def layout(rows: np.ndarray, input_shape: Sequence[int | None]) -> np.ndarray:
    """Dataset rows as the model's input: reshaped to the input's non-batch dims when they are
    fixed (an image ``[1, 8, 8]``), as they are when one is dynamic (a sequence's time axis)."""
    rows = np.asarray(rows, dtype=np.float32)
    dims = list(input_shape[1:])
    if any(d is None for d in dims):
        if rows.ndim != len(input_shape):
            raise DataError(f"the data has {rows.ndim} axes, the model's input "
                            f"{list(input_shape)} has {len(input_shape)}")
        return np.ascontiguousarray(rows)
    return np.ascontiguousarray(rows.reshape(len(rows), *dims))


def evaluation_set(meta: ModelMetadata, config: TrainingConfig, x_test: np.ndarray,
                   y_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows the version's test metrics were measured on: the test split, plus the injected
    anomalies for an anomaly detector (same seed and ratio, so the same ones)."""
    if meta.task is Task.anomaly:
        # the autoencoder's parameter (a complete config holds it), its default otherwise
        ratio = float(config.model.get("anomaly_ratio",
                                       AutoencoderParams.model_fields["anomaly_ratio"].default))
        return with_injected_anomalies(x_test, seed=config.seed, ratio=ratio)
    return x_test, y_test


def evaluate_outputs(meta: ModelMetadata, y: np.ndarray, outputs: np.ndarray) -> Evaluation:
    """The version's test metrics from a model's outputs (as training measured them)."""
    if meta.task is Task.anomaly:
        evaluation = anomaly_metrics(y, outputs)
        if "threshold" in meta.metrics:  # a constant of the graph, the same in int8
            evaluation.metrics["threshold"] = meta.metrics["threshold"]
        return evaluation
    return evaluate(meta.task, y, outputs, meta.class_labels)


def nan_probes(x: np.ndarray, at_most: int = 64) -> np.ndarray:
    """Copies of the first row of ``x`` with one value missing each (up to ``at_most``)."""
    flat = x[:1].reshape(1, -1)
    n = min(flat.shape[1], at_most)
    probes = np.repeat(flat, n, axis=0)
    probes[np.arange(n), np.arange(n)] = np.nan
    return probes.reshape(n, *x.shape[1:])


def reference_with_outputs(reference: pd.DataFrame, task: Task, outputs: np.ndarray) -> pd.DataFrame:
    """A copy of ``reference`` with its prediction (and probability) columns from ``outputs``."""
    return with_outputs(reference.copy(), task, outputs)


def kept_lineage(meta: ModelMetadata) -> dict[str, Any]:
    """The lineage a version derived from ``meta`` keeps (:data:`KEPT_LINEAGE`)."""
    return {k: meta.lineage[k] for k in KEPT_LINEAGE if k in meta.lineage}


def reference_rows(reference: pd.DataFrame, meta: ModelMetadata, split: Split) -> np.ndarray:
    """The dataset indices of the reference rows: as the version records them; for a version
    registered before they were recorded, found again the one way the pipeline chose them then
    (a seeded :func:`~training.pipeline.subsample` of the training split, then of the held-out
    rows, as many as the reference holds of each)."""
    if REFERENCE_ROWS in meta.lineage:
        return np.asarray(meta.lineage[REFERENCE_ROWS], dtype=np.int64)
    seed = TrainingConfig.model_validate(meta.config).seed
    is_train = (reference[REF_SPLIT] == "train").to_numpy() if REF_SPLIT in reference else \
        np.ones(len(reference), bool)
    rows = subsample(split.train, int(is_train.sum()), seed)
    if (~is_train).any():
        held = np.concatenate([split.val, split.test])
        rows = np.concatenate([rows, subsample(held, int((~is_train).sum()), seed)])
    return rows
