"""Tiny ONNX models of every kind the registry holds, built in code, with their reference samples.

A graph divides its input by ``scale`` (its preprocessing), reduces it to three or four values
per row (a sequence: the mean over time; an image: its pixels), applies one linear layer and the
head of its task: softmax ``probabilities`` for a classifier, ``prediction [batch, 1]`` for a
regressor, the sum of squares as ``score [batch]`` for an anomaly detector. The reference sample
holds what training stores: the features monitoring sees, a label and the intact model's
predictions on those rows. ``tiny(kind, scale=0.0)`` is the export that broke in production: a
valid graph whose preprocessing divides by zero, registered beside the intact model's sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
from onnx import TensorProto, helper, numpy_helper

from modelloop.registry import Registry
from modelloop.schemas import (
    INPUT_NAME,
    PREDICTION,
    PROBABILITIES,
    REF_LABEL,
    REF_PREDICTION,
    REF_PROBA_PREFIX,
    SCORE,
    ModelMetadata,
    Task,
    TensorSpec,
    monitored_features,
)

KINDS = ("classification", "regression", "anomaly", "image", "sequence")
STEPS = 5  # time steps of the reference sequences
CLASS_LABELS = ["no", "yes"]


@dataclass
class Tiny:
    """A model ready to register: metadata, ONNX bytes and reference sample."""

    metadata: ModelMetadata
    onnx: bytes
    reference: pd.DataFrame

    def register(self, registry: Registry) -> ModelMetadata:
        return registry.register(self.metadata, self.onnx, reference=self.reference)


def _task(kind: str) -> Task:
    return Task(kind) if kind in ("regression", "anomaly") else Task.classification


def _input_shape(kind: str) -> list[int | None]:
    return {"image": [None, 1, 2, 2], "sequence": [None, None, 3]}.get(kind, [None, 3])


def _features(kind: str) -> list[str]:
    return [f"p{i}" for i in range(4)] if kind == "image" else ["a", "b", "c"]


def graph(kind: str, *, scale: float = 1.0, seed: int = 0, softmax: bool = True,
          weights: np.ndarray | None = None) -> bytes:
    """The ONNX model of ``kind`` (see the module docstring); ``softmax=False`` outputs a
    classifier's logits as its probabilities, ``weights`` replaces the random linear layer."""
    task = _task(kind)
    width = 4 if kind == "image" else 3
    n_out = 1 if task is Task.regression else 2
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, (width, n_out)).astype(np.float32) if weights is None else weights
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "scale"),
             numpy_helper.from_array(w.astype(np.float32), "w")]
    nodes = [helper.make_node("Div", [INPUT_NAME, "scale"], ["scaled"])]
    if kind == "image":
        nodes.append(helper.make_node("Flatten", ["scaled"], ["rows"], axis=1))
    elif kind == "sequence":
        nodes.append(helper.make_node("ReduceMean", ["scaled"], ["rows"], axes=[1], keepdims=0))
    else:
        nodes.append(helper.make_node("Identity", ["scaled"], ["rows"]))
    nodes.append(helper.make_node("MatMul", ["rows", "w"], ["linear"]))
    if task is Task.classification:
        nodes.append(helper.make_node("Softmax" if softmax else "Identity", ["linear"],
                                      [PROBABILITIES], **({"axis": 1} if softmax else {})))
        out = helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", 2])
    elif task is Task.regression:
        nodes.append(helper.make_node("Identity", ["linear"], [PREDICTION]))
        out = helper.make_tensor_value_info(PREDICTION, TensorProto.FLOAT, ["batch", 1])
    else:
        nodes.append(helper.make_node("ReduceSumSquare", ["linear"], [SCORE], axes=[1], keepdims=0))
        out = helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, ["batch"])
    shape = ["batch" if i == 0 else "time" if d is None else d
             for i, d in enumerate(_input_shape(kind))]
    model = helper.make_model(
        helper.make_graph(nodes, kind, [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                                                      shape)], [out], inits),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def run(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """The model's one output for ``x``."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {INPUT_NAME: x.astype(np.float32)})
    return np.asarray(out)


def reference(kind: str, onnx_bytes: bytes, rows: int = 64, seed: int = 0) -> pd.DataFrame:
    """A reference sample of ``rows`` random inputs with the predictions of ``onnx_bytes``."""
    rng = np.random.default_rng(100 + seed)
    dims = _input_shape(kind)[1:]
    x = rng.normal(0, 2, (rows, *[STEPS if d is None else d for d in dims])).astype(np.float32)
    out = run(onnx_bytes, x)
    frame = pd.DataFrame(monitored_features(x, tuple(dims)), columns=_features(kind))
    frame[REF_LABEL] = rng.integers(0, 2, rows)
    return with_predictions(frame, _task(kind), out)


def with_predictions(frame: pd.DataFrame, task: Task, outputs: np.ndarray) -> pd.DataFrame:
    """``frame`` with a model's ``outputs`` as training stores them: a classifier's class index
    and probabilities, another model's value (in place; returned)."""
    if task is Task.classification:
        frame[REF_PREDICTION] = outputs.argmax(axis=1).astype(np.int64)
        for i in range(outputs.shape[1]):
            frame[f"{REF_PROBA_PREFIX}{i}"] = outputs[:, i].astype(np.float64)
    else:
        frame[REF_PREDICTION] = outputs.reshape(-1).astype(np.float64)
    return frame


def metadata(kind: str, name: str = "m") -> ModelMetadata:
    task = _task(kind)
    output = {Task.classification: TensorSpec(name=PROBABILITIES, shape=[None, 2]),
              Task.regression: TensorSpec(name=PREDICTION, shape=[None, 1]),
              Task.anomaly: TensorSpec(name=SCORE, shape=[None])}[task]
    return ModelMetadata(
        name=name, task=task, architecture=kind,
        inputs=[TensorSpec(name=INPUT_NAME, shape=_input_shape(kind))], outputs=[output],
        feature_names=_features(kind),
        class_labels=CLASS_LABELS if task is Task.classification else None,
        metrics={"accuracy": 0.9} if task is Task.classification else {},
    )


def tiny(kind: str = "classification", *, name: str = "m", scale: float = 1.0, seed: int = 0,
         softmax: bool = True, rows: int = 64) -> Tiny:
    """A model of ``kind`` whose reference sample holds the intact model's predictions
    (``seed``'s weights, scale 1, softmax), registered with the graph asked for."""
    intact = graph(kind, seed=seed)
    return Tiny(metadata(kind, name), graph(kind, scale=scale, seed=seed, softmax=softmax),
                reference(kind, intact, rows))
