"""Real ONNX models built in code (no torch): a trained MLP with imputation and scaling inside.

``fit_mlp`` trains scikit-learn's MLPClassifier (or MLPRegressor) on raw features after NaN
imputation with the training means and standardisation, and ``mlp_graph`` writes the same
computation as an ONNX graph (IsNaN/Where, Sub/Div, MatMul/Add/Relu, Softmax) that follows the
conventions of ``modelloop.schemas``, so serving can be tested on a real trained model and a real
ONNX file. ``register_mlp`` puts it in a registry with its metadata and reference sample (the
model's own predictions on those rows, as training stores them).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import pandas as pd
from onnx import TensorProto, helper, numpy_helper

from modelloop.registry import Registry
from modelloop.schemas import (
    INPUT_NAME,
    PREDICTION,
    PROBABILITIES,
    REF_LABEL,
    ModelMetadata,
    Task,
    TensorSpec,
)
from modelloop.synthetic import TARGET, SyntheticTask
from tests.modelloop.onnx_graphs import with_predictions


@dataclass
class Mlp:
    """Weights of a ReLU MLP with its preprocessing (training means and scales)."""

    means: np.ndarray
    scales: np.ndarray
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    task: Task
    binary_logistic: bool = False  # sklearn's binary classifier: one logit, sigmoid


def fit_mlp(df: pd.DataFrame, features: list[str], *, task: Task = Task.classification,
            hidden: tuple[int, ...] = (16,), seed: int = 0, max_iter: int = 60) -> Mlp:
    """Train a small MLP (scikit-learn) on ``df``; NaN is imputed with the column means."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    x = df[features].to_numpy(np.float64)
    means = np.nanmean(x, axis=0)
    x = np.where(np.isnan(x), means, x)
    scales = x.std(axis=0) + 1e-6
    z = (x - means) / scales
    y = df[TARGET].to_numpy()
    cls = MLPClassifier if task == Task.classification else MLPRegressor
    model = cls(hidden_layer_sizes=hidden, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(z, y)
    return Mlp(means.astype(np.float32), scales.astype(np.float32),
               [w.astype(np.float32) for w in model.coefs_],
               [b.astype(np.float32) for b in model.intercepts_], task,
               binary_logistic=task == Task.classification and model.coefs_[-1].shape[1] == 1)


def random_mlp(n_features: int, hidden: tuple[int, ...], n_classes: int, seed: int = 0) -> Mlp:
    """An untrained MLP (for speed measurements, where only the arithmetic matters)."""
    rng = np.random.default_rng(seed)
    sizes = [n_features, *hidden, n_classes]
    weights = [(rng.normal(0, 1, (a, b)) / np.sqrt(a)).astype(np.float32) for a, b in itertools.pairwise(sizes)]
    biases = [np.zeros(b, np.float32) for b in sizes[1:]]
    return Mlp(np.zeros(n_features, np.float32), np.ones(n_features, np.float32), weights, biases,
               Task.classification)


def mlp_graph(mlp: Mlp, n_features: int) -> bytes:
    """The ONNX model of ``mlp``, taking raw features (NaN included)."""
    init = [numpy_helper.from_array(mlp.means, "means"), numpy_helper.from_array(mlp.scales, "scales")]
    nodes = [
        helper.make_node("IsNaN", [INPUT_NAME], ["nan_mask"]),
        helper.make_node("Where", ["nan_mask", "means", INPUT_NAME], ["imputed"]),
        helper.make_node("Sub", ["imputed", "means"], ["centred"]),
        helper.make_node("Div", ["centred", "scales"], ["h0"]),
    ]
    h = "h0"
    last = len(mlp.weights) - 1
    for i, (w, b) in enumerate(zip(mlp.weights, mlp.biases, strict=True)):
        init += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        h = f"a{i}"
        if i < last:
            nodes.append(helper.make_node("Relu", [h], [f"r{i}"]))
            h = f"r{i}"
    if mlp.task == Task.classification:
        if mlp.binary_logistic:  # [0, z] through softmax = [1 - sigmoid(z), sigmoid(z)]
            init.append(numpy_helper.from_array(np.zeros(1, np.float32), "zero"))
            nodes += [helper.make_node("Mul", [h, "zero"], ["zeros"]),
                      helper.make_node("Concat", ["zeros", h], ["logits"], axis=1)]
            h = "logits"
        nodes.append(helper.make_node("Softmax", [h], [PROBABILITIES], axis=-1))
        n_out = max(2, mlp.weights[-1].shape[1])
        out = helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", n_out])
    else:
        nodes.append(helper.make_node("Identity", [h], [PREDICTION]))
        out = helper.make_tensor_value_info(PREDICTION, TensorProto.FLOAT, ["batch", 1])
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", n_features])],
        [out], init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def metadata_for(name: str, mlp: Mlp, features: list[str], class_labels: list[str] | None,
                 **extra: Any) -> ModelMetadata:
    if mlp.task == Task.classification:
        n_out = max(2, mlp.weights[-1].shape[1])
        outputs = [TensorSpec(name=PROBABILITIES, shape=[None, n_out])]
    else:
        outputs = [TensorSpec(name=PREDICTION, shape=[None, 1])]
    return ModelMetadata(
        name=name, task=mlp.task, architecture="mlp",
        inputs=[TensorSpec(name=INPUT_NAME, shape=[None, len(features)])], outputs=outputs,
        feature_names=features, class_labels=class_labels, dataset="synthetic", **extra,
    )


def reference_sample(onnx_bytes: bytes, rows: pd.DataFrame, features: list[str],
                     task: Task) -> pd.DataFrame:
    """``rows`` (features and ``TARGET``) as a reference sample: the features, the label and the
    model's predictions (a classifier's class index and probabilities)."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {INPUT_NAME: rows[features].to_numpy(np.float32)})
    reference = rows[features].copy()
    reference[REF_LABEL] = rows[TARGET].to_numpy()
    return with_predictions(reference, task, out)


def register_mlp(registry: Registry, name: str, *, n_features: int = 20, n_classes: int = 3,
                 task: Task = Task.classification, seed: int = 0, hidden: tuple[int, ...] = (16,),
                 rows: int = 2000, promote: bool = True, zero_scale: bool = False) -> ModelMetadata:
    """Train an MLP on the synthetic task, export it to ONNX and register (and promote) it.

    ``zero_scale`` registers a broken export beside the reference sample of the intact model: a
    valid ONNX graph whose preprocessing divides by a scale of zero, so every output is NaN."""
    synth = SyntheticTask(n_features=n_features, n_informative=min(8, n_features),
                          n_classes=n_classes, seed=seed)
    df = synth.sample(rows, missing=0.02)
    features = synth.feature_names
    if task == Task.regression:  # a numeric target: a smooth function of the features
        df[TARGET] = np.tanh(df[features[:4]].fillna(0).to_numpy() / 10).sum(axis=1)
    mlp = fit_mlp(df, features, task=task, hidden=hidden, seed=seed)
    labels = [f"class_{i}" for i in range(n_classes)] if task == Task.classification else None
    onnx_bytes = mlp_graph(mlp, n_features)
    reference = reference_sample(onnx_bytes, df.head(200), features, task)
    if zero_scale:
        mlp.scales = np.zeros_like(mlp.scales)
        onnx_bytes = mlp_graph(mlp, n_features)
    meta = registry.register(metadata_for(name, mlp, features, labels), onnx_bytes, reference=reference)
    if promote:
        registry.promote(name, meta.version)
    return meta
