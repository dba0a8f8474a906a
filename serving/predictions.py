"""Turn raw ONNX outputs into predictions, one way for every route.

``/predict``, the Open Inference Protocol extras, batch scoring and the prediction events all read
the graph's outputs through :func:`interpret`, so a row scored by ``modelloop batch score`` and the
same row sent to ``/predict`` give the same prediction, label and probabilities.

Graph conventions (``modelloop.schemas``): a classifier outputs ``probabilities [batch, classes]``
(prediction = argmax, label = ``class_labels[argmax]``); a regressor ``prediction [batch, 1]``;
an anomaly detector ``score [batch]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloop.schemas import PREDICTION, PROBABILITIES, SCORE, ModelMetadata, Task

PROBABILITY_PREFIX = "probability_"


@dataclass(frozen=True)
class Predictions:
    """Predictions for ``n`` rows: values, and for classifiers labels and probabilities."""

    prediction: np.ndarray
    """``[n]``: class index (int64), regression value or anomaly score (float64)."""
    labels: np.ndarray | None
    """``[n]`` class label strings (classifiers only)."""
    probabilities: np.ndarray | None
    """``[n, classes]`` float32 (classifiers only)."""
    class_labels: list[str] | None

    def __len__(self) -> int:
        return len(self.prediction)


def class_labels_of(meta: ModelMetadata) -> list[str]:
    """The class labels of a classifier; class indices as strings when the metadata has none."""
    if meta.class_labels:
        return list(meta.class_labels)
    spec = next((o for o in meta.outputs if o.name == PROBABILITIES), None)
    n = spec.shape[-1] if spec is not None and isinstance(spec.shape[-1], int) else 0
    return [str(i) for i in range(n)]


def interpret(meta: ModelMetadata, outputs: dict[str, np.ndarray]) -> Predictions:
    """Read the model's graph outputs as predictions (see the module docstring)."""
    if meta.task == Task.classification:
        proba = np.asarray(outputs[PROBABILITIES], dtype=np.float32)
        labels = class_labels_of(meta)
        if len(labels) != proba.shape[1]:
            labels = [str(i) for i in range(proba.shape[1])]
        index = proba.argmax(axis=1)
        return Predictions(index.astype(np.int64), np.asarray(labels, dtype=object)[index], proba, labels)
    key = PREDICTION if meta.task == Task.regression else SCORE
    value = np.asarray(outputs[key], dtype=np.float64).reshape(-1)
    return Predictions(value, None, None, None)


def to_records(preds: Predictions, request_ids: list[str]) -> list[dict[str, Any]]:
    """One JSON-ready dict per row: request id, prediction, and label and probabilities."""
    values = preds.prediction.tolist()
    if preds.probabilities is None:
        return [{"request_id": rid, "prediction": v} for rid, v in zip(request_ids, values, strict=True)]
    assert preds.labels is not None and preds.class_labels is not None
    names = preds.class_labels
    labels = preds.labels.tolist()
    if len(names) == 2:  # binary: a dict literal per row, a third of the cost of dict(zip(...))
        a, b = names
        p0, p1 = preds.probabilities[:, 0].tolist(), preds.probabilities[:, 1].tolist()
        return [{"request_id": rid, "prediction": v, "label": label, "probabilities": {a: x, b: y}}
                for rid, v, label, x, y in zip(request_ids, values, labels, p0, p1, strict=True)]
    return [
        {"request_id": rid, "prediction": v, "label": label, "probabilities": dict(zip(names, p, strict=True))}
        for rid, v, label, p in zip(request_ids, values, labels, preds.probabilities.tolist(), strict=True)
    ]


def to_columns(preds: Predictions) -> dict[str, Any]:
    """The output columns of batch scoring: ``prediction``, ``label``, ``probability_<label>``."""
    cols: dict[str, Any] = {"prediction": preds.prediction}
    if preds.probabilities is not None:
        assert preds.labels is not None and preds.class_labels is not None
        import pyarrow as pa

        # dictionary-encoded: the class index points into the labels, no string per row
        cols["label"] = pa.DictionaryArray.from_arrays(
            pa.array(preds.prediction.astype(np.int32)), pa.array(preds.class_labels, pa.string()))
        for j, name in enumerate(preds.class_labels):
            cols[f"{PROBABILITY_PREFIX}{name}"] = preds.probabilities[:, j]
    return cols


def from_columns(meta: ModelMetadata, table: Any) -> Predictions:
    """Predictions back from batch output columns (a pyarrow Table made by :func:`to_columns`)."""
    pred = table.column("prediction").to_numpy()
    if "label" not in table.column_names:
        return Predictions(pred.astype(np.float64), None, None, None)
    labels = class_labels_of(meta)
    proba = np.column_stack([table.column(f"{PROBABILITY_PREFIX}{c}").to_numpy() for c in labels])
    index = pred.astype(np.int64)
    return Predictions(index, np.asarray(labels, dtype=object)[index], proba.astype(np.float32), labels)
