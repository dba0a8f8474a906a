"""Int8 quantization of a registered version with ONNX Runtime: measured, registered, gated.

:func:`quantize_version` takes a registered (fp32) version, reloads the data it was trained on
(the ``dataset`` and ``config`` in its metadata, checked against its ``data_fingerprint``), and
quantizes its ONNX graph with ``onnxruntime.quantization``:

* **dynamic** (MLP, GRU, autoencoder): int8 weights, activations quantized per batch at run
  time (``DynamicQuantizeLinear`` + ``MatMulInteger``). ONNX Runtime's dynamic quantizer does not
  take ``Gemm``, which is what the exporter emits for ``nn.Linear``, so each ``Gemm`` is first
  rewritten as ``MatMul`` + ``Add`` (:func:`gemm_to_matmul`). A GRU has no int8 kernel in ONNX
  Runtime: it stays float and only the linear head is quantized (``kept_float`` says so).
* **static** (the CNN): int8 weights (per channel) and activations, their ranges calibrated on
  rows of the training split (MinMax), QDQ format, which ONNX Runtime fuses into ``QLinearConv``
  and friends.

Only the compute ops (``Conv``, ``Gemm``, ``MatMul``) and the ``Relu``/``MaxPool``/``Reshape``
between them are quantized; the preprocessing at the head of the graph (NaN imputation by the
training medians, standardization) and the output head (softmax, the anomaly score) stay float,
so a row with a missing value still works. Both graphs go through ONNX Runtime's
``quant_pre_process`` (shape inference and graph optimization) first.

Then both models are run on the **test split the fp32 metrics were measured on**: the task's
metrics, the change of the primary metric in points (:func:`primary_metric`), ONNX Runtime CPU
rows/s on one thread at a few batch sizes (median of repeats, fp32 and int8 interleaved) and the
file sizes. The int8 graph becomes a **new version** (``parent_version`` the fp32 one, lineage
``{"trigger": "quantize", "quantization": {...}}``) whose reference sample carries the int8
model's predictions, so the sidecar's drift and accuracy estimates describe the served model.
It is **promotable** only when the primary metric drops by at most
``MODELLOOP_TRAINING_QUANTIZE_MAX_LOSS`` (:func:`is_promotable`)::

    version = registry.get("digits-cnn", "production")
    quantized = quantize_version(version, method="auto", settings=settings)
    meta, promoted, reason = register_quantized(quantized, registry, promote=True)

``parity`` of an int8 version compares it with the **fp32 ONNX model** (not PyTorch) on the test
rows, at a tolerance of :data:`INT8_PARITY_TOLERANCE` of the largest fp32 output (at least
0.05): int8 never meets the export's 1e-4, and the stored tolerance says which check was run.
``weights.pt`` and ``history.json`` are copied from the fp32 version: they are what the int8
graph was quantized from, so fine-tuning an int8 version starts from the same fp32 weights.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from modelloop.registry import ModelVersion, Registry, RegistryError
from modelloop.schemas import (
    ModelMetadata,
    ParityResult,
    Task,
    monitored_features,
)
from training.config import TrainingConfig
from training.data import DataError, Split, TabularDataset, load_data, split_dataset
from training.evaluate import Evaluation, confusion_matrix_png
from training.export import (
    check_categorical_conventions,
    check_conventions,
    onnx_session,
    run_onnx,
)
from training.measure import (
    evaluate_outputs,
    evaluation_set,
    kept_lineage,
    layout,
    nan_probes,
    reference_rows,
    reference_with_outputs,
)
from training.pipeline import (
    CONFUSION_MATRIX_PNG,
    HISTORY_JSON,
    WEIGHTS_FILE,
    frame_feeds,
    model_inputs,
    subsample,
)
from training.settings import TrainingSettings

log = logging.getLogger(__name__)

CALIBRATION_ROWS = 512
"""Training rows (a seeded sample) the static ranges are calibrated on."""
CALIBRATION_BATCH = 64
SPEED_BATCHES = (1, 256)
SPEED_THREADS = 1  # rows/s are compared on one thread: the serving default, and stable
INT8_PARITY_TOLERANCE = 0.05
"""Tolerance of an int8 version's parity with its fp32 model, relative to the largest fp32
output (at least 1): 0.05 of a probability, 5 % of a regressor's range."""
INT8_PARITY_BATCH_SIZES = (1, 256)
# compute ops whose weights quantize, and the ops between them that stay in int8 (static)
QUANTIZED_COMPUTE = ("Conv", "Gemm", "MatMul")
STATIC_OP_TYPES = [*QUANTIZED_COMPUTE, "Relu", "MaxPool", "Reshape", "Flatten"]
DYNAMIC_OP_TYPES = ["MatMul", "Conv", "LSTM"]
WEIGHTED_OPS = {"Conv", "Gemm", "MatMul", "GRU", "LSTM", "RNN"}
INTEGER_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
               "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM", "MatMulIntegerToFloat"}
PRIMARY_METRICS = {Task.classification: "accuracy", Task.regression: "r2",
                   Task.anomaly: "roc_auc"}


class QuantizeError(RuntimeError):
    """Quantization failed: ONNX Runtime could not quantize or run the graph, or the int8 model
    breaks what the fp32 one guarantees (conventions, finite outputs for missing values)."""


class NotQuantizable(QuantizeError):
    """This version cannot be quantized as asked: it is int8 already, its training data cannot
    be reproduced, or the method does not apply. The caller's input is the problem."""


class TrainingDataUnavailable(NotQuantizable, DataError):
    """The data a version was trained on cannot be reloaded as it was (:func:`training_data`):
    a data problem for every step that derives a version from it (quantize, prune, ensemble),
    which their commands answer with exit 2."""


class Method(StrEnum):
    auto = "auto"
    """static for the CNN, dynamic for everything else."""
    dynamic = "dynamic"
    static = "static"


def resolve_method(method: Method | str, architecture: str) -> Literal["dynamic", "static"]:
    """``auto`` becomes static for the CNN (convolutions gain from calibrated activations,
    ``ConvInteger`` is slow) and dynamic for everything else."""
    method = Method(method)
    if method is Method.auto:
        return "static" if architecture == "cnn" else "dynamic"
    return "static" if method is Method.static else "dynamic"


# -- the decision: pure functions ----------------------------------------------------------------
def primary_metric(task: Task) -> str:
    """The metric the accuracy change is judged on: accuracy, R², or ROC-AUC for an anomaly
    detector (its threshold metrics hinge on one calibrated cut-off)."""
    return PRIMARY_METRICS[task]


def loss_points(fp32: float, int8: float) -> float:
    """How many points (hundredths) the int8 model loses on a higher-is-better metric;
    negative when it gains."""
    return (fp32 - int8) * 100.0


def is_promotable(loss: float, max_loss: float) -> bool:
    """Whether a quantized model losing ``loss`` points may replace production, with
    ``max_loss`` the allowed loss as a fraction (``quantize_max_loss``: 0.01 is one point)."""
    return loss <= max_loss * 100.0 + 1e-9  # the float noise of (a - b) * 100


def verdict(report: QuantizationReport) -> str:
    """One line: the primary metric before and after, and the loss against the allowed one."""
    change = (f"loses {report.loss_points:.2f} points" if report.loss_points > 1e-9 else
              f"gains {-report.loss_points:.2f} points" if report.loss_points < -1e-9 else
              "is unchanged")
    line = (f"{report.metric} {report.fp32_metrics[report.metric]:.4f} -> "
            f"{report.int8_metrics[report.metric]:.4f} {change} (a loss of at most "
            f"{report.max_loss_points:.2f} allowed: MODELLOOP_TRAINING_QUANTIZE_MAX_LOSS)")
    if not report.parity_passed:
        line += (f"; its outputs stray up to {report.max_abs_diff:.3g} from the fp32 model's, "
                 "over the int8 parity tolerance")
    return line


# -- the graph -----------------------------------------------------------------------------------
def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with each ``Gemm`` of a constant weight (alpha = beta = 1, A not
    transposed) rewritten as ``MatMul`` (+ ``Add`` of the bias), which ONNX Runtime's dynamic
    quantizer takes; the output is the same. Other ``Gemm`` nodes are left as they are."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            transposed = numpy_helper.to_array(inits[weight]).T
            weight = f"{weight}__matmul"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(transposed), weight))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product],
                                      name=f"{node.name}__matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                          name=f"{node.name}__bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the graph's constants (weights, biases, scales): the size without the graph
    structure and the exporter's metadata, which ``quant_pre_process`` drops."""
    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)


def kept_float(model: onnx.ModelProto) -> list[str]:
    """Op types of weighted nodes (Conv, Gemm, MatMul, GRU, LSTM, RNN) whose weight is still a
    float constant: what quantization left in float (a GRU, which ONNX Runtime has no int8
    kernel for)."""
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    return sorted({n.op_type for n in model.graph.node
                   if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in floats})


class _Rows(CalibrationDataReader):
    """Calibration inputs in batches."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = CALIBRATION_BATCH) -> None:
        self._batches = iter([{input_name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_onnx(onnx_bytes: bytes, method: Literal["dynamic", "static"],
                  calibration: np.ndarray | None = None, input_name: str = "input") -> bytes:
    """The int8 graph of ``onnx_bytes`` (see the module docstring); ``calibration`` (model
    inputs, no NaN needed) is required for ``static``. Raises :class:`QuantizeError`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method == "static" and (calibration is None or len(calibration) == 0):
        raise QuantizeError("static quantization needs calibration rows")
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        src, pre, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(onnx_bytes)
        try:
            quant_pre_process(src, pre)
            if method == "dynamic":
                onnx.save(gemm_to_matmul(onnx.load(pre)), pre)
                quantize_dynamic(pre, out, op_types_to_quantize=DYNAMIC_OP_TYPES,
                                 weight_type=QuantType.QInt8)
            else:
                assert calibration is not None
                # S8S8 QDQ: what ONNX Runtime recommends on x64 (U8 activations in the
                # QOperator format are ten times slower there). Weights in 7 bits: x64 CPUs
                # without VNNI (AVX2 only) multiply int8 pairs into int16 with saturation, which
                # broke the int8 CNN's parity there (max diff 0.90, accuracy 0.98 -> 0.95).
                quantize_static(pre, out, _Rows(calibration, input_name),
                                quant_format=QuantFormat.QDQ, op_types_to_quantize=STATIC_OP_TYPES,
                                per_channel=True, reduce_range=True,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        except Exception as exc:  # the quantizer raises many types; all mean the same here
            raise QuantizeError(f"onnxruntime {method} quantization failed: "
                                f"{type(exc).__name__}: {exc}") from exc
        return out.read_bytes()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # the quantizer prints and logs on the root logger; stdout stays clean for --json
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


# -- speed ---------------------------------------------------------------------------------------
def _rows(x: np.ndarray | Mapping[str, np.ndarray]) -> int:
    return len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)


def compare_speed(models: Mapping[str, bytes], x: np.ndarray | Mapping[str, np.ndarray],
                  batches: Sequence[int] = SPEED_BATCHES, *, repeats: int = 5,
                  min_time_s: float = 0.1) -> dict[str, dict[int, float]]:
    """ONNX Runtime CPU rows/s of each model at each batch size (rows of ``x`` tiled; ``x``:
    the features, or the graph's inputs by name), on one thread: the median of ``repeats``
    timings of at least ``min_time_s`` each, the models taking turns so that a noisy neighbour
    slows all of them alike."""
    sessions = {label: onnx_session(data, SPEED_THREADS) for label, data in models.items()}
    name = next(iter(sessions.values())).get_inputs()[0].name
    inputs = dict(x) if isinstance(x, Mapping) else {name: np.asarray(x, dtype=np.float32)}
    n = _rows(inputs)
    result: dict[str, dict[int, float]] = {label: {} for label in sessions}
    for batch in batches:
        feed = {k: np.ascontiguousarray(v[np.arange(batch) % n]) for k, v in inputs.items()}
        calls: dict[str, int] = {}
        for label, session in sessions.items():
            session.run(None, feed)  # allocates
            t0 = time.perf_counter()
            session.run(None, feed)
            calls[label] = max(1, math.ceil(min_time_s / max(time.perf_counter() - t0, 1e-7)))
        rates: dict[str, list[float]] = {label: [] for label in sessions}
        for _ in range(repeats):
            for label, session in sessions.items():
                t0 = time.perf_counter()
                for _ in range(calls[label]):
                    session.run(None, feed)
                rates[label].append(calls[label] * batch / (time.perf_counter() - t0))
        for label in sessions:
            result[label][batch] = statistics.median(rates[label])
    return result


# -- data ----------------------------------------------------------------------------------------
def training_data(meta: ModelMetadata) -> TabularDataset:
    """The data ``meta`` was trained on, reloaded as it was (dataset, target, task, class
    labels, ``--rows`` subsample and seed) and checked against its fingerprint."""
    config = TrainingConfig.model_validate(meta.config)
    classify = meta.task is Task.classification
    try:
        ds = load_data(meta.dataset, config.target, task=meta.task if classify else None,
                       rows=meta.lineage.get("dataset_rows"), seed=config.seed,
                       class_labels=meta.class_labels if classify else None, clean=config.clean,
                       categorical=config.categorical)
    except DataError as exc:
        raise TrainingDataUnavailable(f"{meta.name} v{meta.version}: cannot reload its training data: "
                             f"{exc}") from exc
    check_data(meta, ds)
    return ds


def check_data(meta: ModelMetadata, ds: TabularDataset) -> None:
    if ds.fingerprint != meta.data_fingerprint:
        raise TrainingDataUnavailable(
            f"{meta.name} v{meta.version}: the data {ds.source!r} ({len(ds)} rows) is not what "
            f"it was trained on (fingerprint {ds.fingerprint[:19]} != "
            f"{meta.data_fingerprint[:19]}); a retrained version's data cannot be reproduced, "
            "start from a version trained by `modelloop train`")


def _reference_inputs(reference: pd.DataFrame, meta: ModelMetadata, ds: TabularDataset,
                      split: Split) -> np.ndarray:
    """The model inputs of the reference rows: their feature columns for a fixed-shape input
    (raw features, or an image's pixels); for a sequence (its reference holds each channel's
    mean) its rows of the training data (:func:`~training.measure.reference_rows`), checked
    against those means."""
    shape = meta.inputs[0].shape
    if all(d is not None for d in shape[1:]):
        return layout(reference[meta.feature_names].to_numpy(np.float32), shape)
    x = ds.features[reference_rows(reference, meta, split)]
    means = monitored_features(x, meta.input_dims)  # what the reference sample holds
    stored = reference[meta.feature_names].to_numpy(np.float64)
    if means.shape != stored.shape or not np.allclose(means, stored, equal_nan=True, atol=1e-5):
        raise QuantizeError(f"{meta.name} v{meta.version}: its reference rows cannot be found "
                            "again in its training data")
    return layout(x, shape)


# -- the whole step ------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizationReport:
    """What was measured: fp32 against int8 on the test split (``lineage.quantization``)."""

    method: Literal["dynamic", "static"]
    source_version: int
    metric: str
    fp32_metrics: dict[str, float]
    int8_metrics: dict[str, float]
    loss_points: float
    max_loss_points: float
    promotable: bool
    rows_per_s: dict[str, dict[int, float]]
    """``{"fp32": {batch: rows/s}, "int8": {...}}``, one thread."""
    bytes: dict[str, int]
    """File sizes: ``{"fp32": ..., "int8": ...}``."""
    weight_bytes: dict[str, int]
    """Bytes of the constants of each graph (:func:`weight_bytes`)."""
    max_abs_diff: float
    """Largest difference of an int8 output from the fp32 one (test rows and NaN probes)."""
    parity_passed: bool
    """``max_abs_diff`` within the int8 tolerance (else the version is never promotable)."""
    int8_ops: dict[str, int]
    kept_float: list[str]
    calibration_rows: int

    @property
    def speedup(self) -> dict[int, float]:
        return {b: self.rows_per_s["int8"][b] / self.rows_per_s["fp32"][b]
                for b in self.rows_per_s["fp32"]}

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method, "source_version": self.source_version, "metric": self.metric,
            "fp32_metrics": self.fp32_metrics, "int8_metrics": self.int8_metrics,
            "loss_points": self.loss_points, "max_loss_points": self.max_loss_points,
            "promotable": self.promotable,
            "rows_per_s": {k: {str(b): r for b, r in v.items()} for k, v in self.rows_per_s.items()},
            "speedup": {str(b): s for b, s in self.speedup.items()},
            "threads": SPEED_THREADS, "bytes": self.bytes,
            "weight_bytes": self.weight_bytes, "max_abs_diff": self.max_abs_diff,
            "parity_passed": self.parity_passed,
            "int8_ops": self.int8_ops, "kept_float": self.kept_float,
            "calibration_rows": self.calibration_rows,
        }


@dataclass
class QuantizedModel:
    """An int8 model that is not registered yet (as :class:`training.pipeline.TrainedModel`)."""

    metadata: ModelMetadata
    onnx_bytes: bytes
    reference: pd.DataFrame | None
    artifacts: dict[str, bytes]
    report: QuantizationReport


def quantize_version(
    version: ModelVersion,
    *,
    method: Method | str = Method.auto,
    settings: TrainingSettings | None = None,
    data: TabularDataset | None = None,
    calibration_rows: int = CALIBRATION_ROWS,
    speed_batches: Sequence[int] = SPEED_BATCHES,
    speed_repeats: int = 5,
    speed_min_time_s: float = 0.1,
) -> QuantizedModel:
    """Quantize ``version`` to int8 and measure it against fp32 (see the module docstring).

    ``data`` is the training data when it cannot be reloaded from the metadata (a dataset
    passed to the trainer as an object); it must match the version's fingerprint. Raises
    :class:`NotQuantizable` for a version that cannot be quantized as asked and
    :class:`QuantizeError` when quantization fails.
    """
    settings = settings or TrainingSettings()
    meta = version.metadata
    label = f"{meta.name} v{meta.version}"
    if "quantization" in meta.lineage:
        source = meta.lineage["quantization"].get("source_version")
        raise NotQuantizable(f"{label} is an int8 quantization already (of v{source}); "
                             "quantize the fp32 version")
    chosen = resolve_method(method, meta.architecture)
    if meta.categories and chosen == "static":
        raise NotQuantizable(f"{label} takes categorical features "
                             f"({', '.join(meta.categorical_features)}): static quantization "
                             "calibrates on numeric inputs only; use --method dynamic")
    config = TrainingConfig.model_validate(meta.config)
    if data is not None:
        check_data(meta, data)
    ds = data if data is not None else training_data(meta)
    split = split_dataset(ds, val_fraction=config.val_fraction,
                          test_fraction=config.test_fraction, seed=config.seed)
    # the dataset's rows as the graph takes them (a categorical model: numbers and strings)
    shape = [None, meta.n_features] if meta.categories else meta.inputs[0].shape

    def graph_inputs(x: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        return model_inputs(ds, x)

    fp32 = version.onnx_path.read_bytes()

    calibration = None
    if chosen == "static":
        rows = subsample(split.train, calibration_rows, config.seed)
        calibration = layout(ds.features[rows], shape)
    log.info("%s: %s int8 quantization%s", label, chosen,
             f", calibrated on {len(calibration)} training rows" if calibration is not None else "")
    int8 = quantize_onnx(fp32, chosen, calibration, meta.inputs[0].name)
    proto = onnx.load_from_string(int8)
    counts = op_counts(proto)
    integer = {op: n for op, n in sorted(counts.items()) if op in INTEGER_OPS}
    if not integer:
        raise NotQuantizable(f"{label}: {chosen} quantization found nothing to quantize "
                             f"(ops: {', '.join(sorted(counts))})")
    try:
        if meta.categories:
            check_categorical_conventions(proto, meta.feature_names, meta.categories,
                                          [o.name for o in meta.outputs])
        else:
            check_conventions(proto, n_features=meta.n_features,
                              output_names=[o.name for o in meta.outputs], input_shape=shape)
    except Exception as exc:
        raise QuantizeError(f"{label}: the int8 graph breaks the ONNX conventions: {exc}") from exc

    # the test split, as the fp32 metrics were measured
    x_eval, y_eval = evaluation_set(meta, config, layout(ds.features[split.test], shape),
                                    ds.target[split.test])
    output = meta.outputs[0].name
    try:
        s32, s8 = onnx_session(fp32, settings.threads), onnx_session(int8, settings.threads)
    except Exception as exc:
        raise QuantizeError(f"{label}: ONNX Runtime cannot load the int8 graph: {exc}") from exc
    feed_eval = graph_inputs(x_eval)
    out32, out8 = run_onnx(s32, feed_eval)[output], run_onnx(s8, feed_eval)[output]
    ev32, ev8 = evaluate_outputs(meta, y_eval, out32), evaluate_outputs(meta, y_eval, out8)

    probes = nan_probes(x_eval)
    probe8 = run_onnx(s8, graph_inputs(probes))[output]
    if not np.isfinite(probe8).all():
        raise QuantizeError(f"{label}: the int8 model gives non-finite outputs for rows with a "
                            "missing value")
    parity = _parity(s32, s8, graph_inputs(np.concatenate([probes, x_eval[:settings.parity_rows]])),
                     output)

    metric = primary_metric(meta.task)
    loss = loss_points(ev32.metrics[metric], ev8.metrics[metric])
    speed = compare_speed({"fp32": fp32, "int8": int8}, feed_eval, speed_batches,
                          repeats=speed_repeats, min_time_s=speed_min_time_s)
    report = QuantizationReport(
        method=chosen, source_version=meta.version, metric=metric,
        fp32_metrics=ev32.metrics, int8_metrics=ev8.metrics, loss_points=loss,
        max_loss_points=settings.quantize_max_loss * 100.0,
        # a graph that strays from its fp32 model beyond the int8 tolerance is never promoted
        promotable=parity.passed and is_promotable(loss, settings.quantize_max_loss),
        rows_per_s=speed, bytes={"fp32": len(fp32), "int8": len(int8)},
        weight_bytes={"fp32": weight_bytes(onnx.load_from_string(fp32)),
                      "int8": weight_bytes(proto)},
        max_abs_diff=parity.max_abs_diff, parity_passed=parity.passed, int8_ops=integer, kept_float=kept_float(proto),
        calibration_rows=0 if calibration is None else len(calibration),
    )
    log.info("%s: %s %.4f -> %.4f (%.2f points), rows/s %s", label, metric,
             ev32.metrics[metric], ev8.metrics[metric], loss, speed)

    reference = None
    with contextlib.suppress(RegistryError):  # a version registered without one
        reference = version.reference()
    if reference is not None:
        ref_x = (frame_feeds(meta, reference) if meta.categories
                 else _reference_inputs(reference, meta, ds, split))
        reference = reference_with_outputs(reference, meta.task, run_onnx(s8, ref_x)[output])
    return QuantizedModel(_metadata(meta, ev8, parity, report), int8, reference,
                          _artifacts(version, meta, ev8, len(split.test)), report)


def _parity(s32: ort.InferenceSession, s8: ort.InferenceSession,
            x: np.ndarray | Mapping[str, np.ndarray], output: str) -> ParityResult:
    worst, largest = 0.0, 0.0
    for batch in INT8_PARITY_BATCH_SIZES:
        a, b = run_onnx(s32, x, batch)[output], run_onnx(s8, x, batch)[output]
        worst = max(worst, float(np.nanmax(np.abs(a.astype(np.float64) - b))))
        largest = max(largest, float(np.nanmax(np.abs(a))))
    tolerance = INT8_PARITY_TOLERANCE * max(1.0, largest)
    return ParityResult(passed=worst <= tolerance, max_abs_diff=worst, tolerance=tolerance,
                        batch_sizes=list(INT8_PARITY_BATCH_SIZES), rows_checked=_rows(x))


def _metadata(meta: ModelMetadata, evaluation: Evaluation, parity: ParityResult,
              report: QuantizationReport) -> ModelMetadata:
    # what reproduces the data and the reference stays (a retraining job and a later
    # quantization read it)
    quantization = {**report.to_json(),
                    "parity": "int8 against the fp32 ONNX model of the source version on the "
                              "test rows and NaN probes; the 1e-4 export check applies to fp32"}
    return meta.model_copy(deep=True, update={
        "version": 0, "created_at": datetime.now(UTC), "parent_version": meta.version,
        "metrics": evaluation.metrics,
        "evaluation": {**meta.evaluation, **evaluation.details},
        "parity": parity,
        "lineage": {"trigger": "quantize", **kept_lineage(meta), "quantization": quantization},
    })


def _artifacts(version: ModelVersion, meta: ModelMetadata, evaluation: Evaluation,
               test_rows: int) -> dict[str, bytes]:
    artifacts = {name: (version.path / name).read_bytes() for name in (WEIGHTS_FILE, HISTORY_JSON)
                 if (version.path / name).exists()}
    cm = evaluation.details.get("confusion_matrix")
    if cm is not None:
        artifacts[CONFUSION_MATRIX_PNG] = confusion_matrix_png(
            cm["matrix"], cm["labels"],
            title=f"{meta.name} int8: test split ({test_rows} rows)")
    return artifacts


def register_gated(registry: Registry, metadata: ModelMetadata, onnx_bytes: bytes, *,
                   reference: pd.DataFrame | None, artifacts: dict[str, bytes] | None,
                   promote: bool, promotable: bool, line: str) -> tuple[ModelMetadata, bool, str]:
    """Register a derived version (int8, pruned, ensemble); with ``promote``, make it production
    (the registry's checked promotion) only when ``promotable``. Returns the metadata, whether it
    was promoted and why (not), ``line`` being the measurement that decided."""
    meta = registry.register(metadata, onnx_bytes, reference=reference, artifacts=artifacts)
    if not promote:
        return meta, False, f"not asked to promote; {line}"
    if not promotable:
        return meta, False, f"not promoted: {line}"
    registry.promote(meta.name, meta.version)
    log.info("promoted %s v%d (%s) to production", meta.name, meta.version, meta.lineage.get("trigger"))
    return meta, True, f"promoted: {line}"


def register_quantized(quantized: QuantizedModel, registry: Registry, *,
                       promote: bool = False) -> tuple[ModelMetadata, bool, str]:
    """Register ``quantized`` as a new version; with ``promote``, make it production only when
    it is promotable. Returns the metadata, whether it was promoted and why (not)."""
    return register_gated(registry, quantized.metadata, quantized.onnx_bytes,
                          reference=quantized.reference, artifacts=quantized.artifacts,
                          promote=promote, promotable=quantized.report.promotable,
                          line=verdict(quantized.report))
