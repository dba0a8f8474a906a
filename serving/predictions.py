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
import orjson

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

    def rows(self, index: slice | np.ndarray) -> Predictions:
        """The predictions of some rows (a slice: views, no copy)."""
        return Predictions(self.prediction[index], None if self.labels is None else self.labels[index],
                           None if self.probabilities is None else self.probabilities[index],
                           self.class_labels)


def interpret(meta: ModelMetadata, outputs: dict[str, np.ndarray]) -> Predictions:
    """Read the model's graph outputs as predictions (see the module docstring)."""
    if meta.task == Task.classification:
        proba = np.asarray(outputs[PROBABILITIES], dtype=np.float32)
        labels = meta.class_labels_or_indices()
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


_ROW_SUFFIXES: list[bytes] = []
"""``-<i>"``, the end of row ``i``'s request id in JSON, for every row seen so far."""


def _row_suffixes(n: int) -> list[bytes]:
    if len(_ROW_SUFFIXES) < n:
        _ROW_SUFFIXES.extend(b'-%d"' % i for i in range(len(_ROW_SUFFIXES), n))
    return _ROW_SUFFIXES[:n]


def _numbers(values: np.ndarray) -> list[bytes]:
    """Each value of a 1-D array (n >= 1) as orjson writes it (float64, as from ``tolist()``):
    one orjson call, split at the commas (a JSON number holds none)."""
    return orjson.dumps(np.ascontiguousarray(values, dtype=np.float64),
                        option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")


COLUMNS_FROM_ROWS = 32
"""From this many rows on, :func:`records_json` writes columns; below it the dicts are quicker."""


def answer_json(model: str, version: int, request_id: str, preds: Predictions) -> bytes:
    """The ``/predict`` answer: ``orjson.dumps({"model": ..., "version": ..., "request_id": ...,
    "predictions": to_records(preds, request_ids(request_id, n))})``, with the records written
    by :func:`records_json`."""
    return orjson.dumps({"model": model, "version": version, "request_id": request_id,
                         "predictions": orjson.Fragment(records_json(preds, request_id))})


def records_json(preds: Predictions, base_id: str) -> bytes:
    """``orjson.dumps(to_records(preds, request_ids(base_id, n)))``, byte for byte (a test
    compares them over generated predictions). From :data:`COLUMNS_FROM_ROWS` rows on it is
    written without a dict per row: each value column by one orjson call, split, each class's
    ``"prediction"``/``"label"`` text once, and the rows one ``bytes.join`` of pieces placed by
    slice assignment (docs/serving.md). Duplicate class labels collapse in a dict, so such a
    classifier's rows are always the dicts."""
    n = len(preds)
    names = preds.class_labels or []
    if n < COLUMNS_FROM_ROWS or len(set(names)) != len(names):
        return orjson.dumps(to_records(preds, request_ids(base_id, n)))
    head = b'{"request_id":' + orjson.dumps(base_id)[:-1]
    if preds.probabilities is None:
        columns = [[head] * n, _row_suffixes(n), [b',"prediction":'] * n, _numbers(preds.prediction), [b"},"] * n]
    else:
        keys = [orjson.dumps(name) + b":" for name in names]
        # what follows the request id: the class's prediction, label and first probability key
        after_id = [b',"prediction":%d,"label":%s,"probabilities":{%s' % (j, orjson.dumps(label), keys[0])
                    for j, label in enumerate(names)]
        columns = [[head] * n, _row_suffixes(n), [after_id[j] for j in preds.prediction.tolist()]]
        for j in range(len(names)):
            columns.append(_numbers(preds.probabilities[:, j]))
            columns.append([b"," + keys[j + 1]] * n if j + 1 < len(names) else [b"}},"] * n)
    parts: list[bytes] = [b""] * (n * len(columns))
    for k, column in enumerate(columns):
        parts[k::len(columns)] = column
    return b"[" + b"".join(parts)[:-1] + b"]"


def request_ids(base_id: str, n: int) -> list[str]:
    """Per-row request ids of a request: ``<base>-<row>``; feedback joins on these."""
    return [f"{base_id}-{i}" for i in range(n)]


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
    labels = meta.class_labels_or_indices()
    proba = np.column_stack([table.column(f"{PROBABILITY_PREFIX}{c}").to_numpy() for c in labels])
    index = pred.astype(np.int64)
    return Predictions(index, np.asarray(labels, dtype=object)[index], proba.astype(np.float32), labels)
