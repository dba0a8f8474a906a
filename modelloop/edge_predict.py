"""The predictor of a modelloop edge bundle: ONNX Runtime and NumPy, nothing else.

``modelloop models export`` copies this file into the bundle as ``predict.py``, beside the graph
(``model.onnx`` or ``model.ort``) and ``schema.json``. It answers as ``/predict`` does: per row
the prediction (the class index, the regression value or the anomaly score) and, for a
classifier, the label and each class's probability::

    from predict import Predictor
    Predictor("bundle").predict([[14.1, 20.3, ...]])
    # [{"prediction": 1, "label": "benign", "probabilities": {"malignant": 0.02, "benign": 0.98}}]

A row is a list of the features in ``schema.json``'s order or a dict by feature name; a missing
value (``None``, a missing key) is NaN, which the graph imputes as serving's does. Run from the
command line, it reads a JSON list of rows on stdin and writes the answers on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

SCHEMA_JSON = "schema.json"


class Predictor:
    """A bundle's graph in an ONNX Runtime CPU session, with its schema."""

    def __init__(self, bundle: str | Path = ".", threads: int = 1) -> None:
        root = Path(bundle)
        self.schema: dict[str, Any] = json.loads((root / SCHEMA_JSON).read_text())
        self.feature_names: list[str] = self.schema["feature_names"]
        self.task: str = self.schema["task"]
        self.class_labels: list[str] | None = self.schema.get("class_labels")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(root / self.schema["graph"]), options,
                                            providers=["CPUExecutionProvider"])
        spec = self.schema["inputs"][0]
        self._input: str = spec["name"]
        self._dims: list[int | None] = spec["shape"][1:]
        self._output: str = self.schema["outputs"][0]["name"]

    def rows(self, instances: list[Any]) -> np.ndarray:
        """The rows as the graph's float32 input: dicts by feature name or lists in order,
        ``None`` as NaN; flat rows reshaped to a fixed input shape (an image's)."""
        values = [[row.get(name) for name in self.feature_names] if isinstance(row, dict) else row
                  for row in instances]
        x = np.array(values, dtype=np.float32)  # None becomes NaN
        dims = [d for d in self._dims if isinstance(d, int)]
        if x.ndim == 2 and len(dims) == len(self._dims) > 1:
            x = x.reshape(len(x), *dims)
        return np.ascontiguousarray(x)

    def predict(self, instances: list[Any]) -> list[dict[str, Any]]:
        """One answer per row, as ``/predict``'s ``predictions`` (without request ids)."""
        out = self.session.run([self._output], {self._input: self.rows(instances)})[0]
        if self.task != "classification":
            return [{"prediction": float(v)} for v in np.asarray(out, np.float64).reshape(-1)]
        proba = np.asarray(out, dtype=np.float32)
        labels = self.class_labels or [str(i) for i in range(proba.shape[1])]
        index = proba.argmax(axis=1)
        return [{"prediction": int(i), "label": labels[i],
                 "probabilities": dict(zip(labels, p, strict=True))}
                for i, p in zip(index.tolist(), proba.tolist(), strict=True)]


def main() -> None:
    bundle = Path(__file__).resolve().parent
    json.dump(Predictor(bundle).predict(json.load(sys.stdin)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
