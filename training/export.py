"""ONNX export, checked where it is born.

:func:`export_onnx` exports a module with ``torch.onnx.export`` (the dynamo-based exporter) with a
dynamic batch axis, runs ``onnx.checker`` and checks the graph conventions of
``modelloop.schemas`` (input ``input`` float32 ``[batch, n_features]``, the named outputs with a
dynamic batch axis). :func:`check_parity` then runs ONNX Runtime against PyTorch on held-out rows
at several batch sizes, collects every output that differs by more than the tolerance and raises
one :class:`ParityError` listing them all::

    onnx_bytes = export_onnx(InferenceGraph(net), n_features=30, output_names=["probabilities"],
                             example=x_test[:8])
    parity = check_parity(InferenceGraph(net), onnx_bytes, x_test, tolerance=1e-4)

A model with categorical features gets a prologue (:func:`add_categorical_prologue`): its graph
takes the numeric features in ``input`` and the categorical values' raw strings in
``categories`` and codes them itself (ONNX-ML ``LabelEncoder``), so the parity check feeds it the
strings and PyTorch the codes Python computed (:func:`check_parity` with ``feed``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch import nn

from modelloop.schemas import CATEGORIES_INPUT, INPUT_NAME, ParityResult

log = logging.getLogger(__name__)

EXPORT_EXAMPLE_ROWS = 8  # a batch-1 example can get specialised into a constant batch axis
DYNAMIC_AXIS_NAMES = {0: "batch", 1: "time"}  # a dynamic axis after the batch is a sequence's
# the exporter's own chatter: its steps on stdout, INFO logs per optimisation pass, warnings
# about optional packages (torchvision) that have nothing to do with our models
_EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in _EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # torch.export's note on nn.GRU/LSTM's cached flat weights: harmless for the graph
            warnings.filterwarnings("ignore", message=".*were assigned during export")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class ExportError(RuntimeError):
    """The model could not be exported, or the exported graph breaks the ONNX conventions."""


@dataclass(frozen=True)
class Mismatch:
    """One output at one batch size where ONNX Runtime and PyTorch disagree."""

    output: str
    batch_size: int
    max_abs_diff: float
    worst_row: int
    """Index of the held-out row with the largest difference."""

    def __str__(self) -> str:
        return (f"{self.output} at batch size {self.batch_size}: max abs diff "
                f"{self.max_abs_diff:.3g} (held-out row {self.worst_row})")


class ParityError(ExportError):
    """The exported model's outputs differ from PyTorch's by more than the tolerance."""

    def __init__(self, mismatches: Sequence[Mismatch], tolerance: float) -> None:
        self.mismatches = list(mismatches)
        self.tolerance = tolerance
        listed = "; ".join(str(m) for m in self.mismatches)
        super().__init__(f"ONNX export parity failed: {len(self.mismatches)} output(s) differ "
                         f"from PyTorch by more than {tolerance:g}: {listed}")


def export_onnx(
    module: nn.Module,
    *,
    n_features: int,
    output_names: Sequence[str],
    example: np.ndarray,
    input_shape: Sequence[int | None] | None = None,
) -> bytes:
    """Export ``module`` (raw ``[batch, n_features]`` float32 in) to ONNX bytes, checked.

    ``input_shape`` replaces ``[batch, n_features]`` for a model whose input is a tensor: its
    ``None`` entries are dynamic axes (the first is the batch axis), e.g. ``[None, 1, 8, 8]`` for
    an image or ``[None, None, 3]`` for a sequence of any length."""
    module = module.eval().cpu()
    shape = list(input_shape) if input_shape is not None else [None, n_features]
    x = _example(example, shape)
    axes = {i: torch.export.Dim(DYNAMIC_AXIS_NAMES.get(i, f"axis{i}"))
            for i, d in enumerate(shape) if d is None}
    try:
        # stdout stays clean for `modelloop train --json`
        with _quiet_exporter():
            program = torch.onnx.export(
                module, (x,), input_names=[INPUT_NAME], output_names=list(output_names),
                dynamic_shapes=(axes,), dynamo=True, verbose=False, external_data=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean the same to the caller
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        program.save(path, external_data=False)
        data = path.read_bytes()
    proto = onnx.load_from_string(data)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported model: {exc}") from exc
    check_conventions(proto, n_features=n_features, output_names=output_names, input_shape=shape)
    log.info("exported ONNX graph: %d bytes, opset %d", len(data), proto.opset_import[0].version)
    return data


def _example(example: np.ndarray, shape: Sequence[int | None]) -> torch.Tensor:
    rows = np.asarray(example, dtype=np.float32)
    if len(shape) == 2 or rows.ndim != len(shape):
        rows = rows.reshape(-1, *[d if d is not None else 1 for d in shape[1:]])
    if len(rows) == 0:
        rows = np.zeros((1, *rows.shape[1:]), dtype=np.float32)
    # tile to >= 2 rows so the exporter cannot take the batch size for a constant
    rows = rows[np.arange(max(len(rows), EXPORT_EXAMPLE_ROWS)) % len(rows)]
    return torch.from_numpy(np.ascontiguousarray(rows))


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") or not d.HasField("dim_value") else d.dim_value
            for d in value_info.type.tensor_type.shape.dim]


def check_conventions(
    proto: onnx.ModelProto,
    *,
    n_features: int,
    output_names: Sequence[str],
    input_shape: Sequence[int | None] | None = None,
) -> None:
    """Raise :class:`ExportError` unless the graph follows the conventions serving relies on
    (``input_shape``: as in :func:`export_onnx`)."""
    expected = list(input_shape) if input_shape is not None else [None, n_features]
    problems: list[str] = []
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME]:
        problems.append(f"inputs are {[i.name for i in inputs]}, expected ['{INPUT_NAME}']")
    else:
        (inp,) = inputs
        if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            problems.append("input is not float32")
        dims = _dims(inp)
        if len(dims) != len(expected) or any(
                isinstance(d, int) if e is None else d != e
                for d, e in zip(dims, expected, strict=False)):
            want = ", ".join("batch" if i == 0 else "dynamic" if e is None else str(e)
                             for i, e in enumerate(expected))
            problems.append(f"input shape is {dims}, expected [{want}]")
    if [o.name for o in proto.graph.output] != list(output_names):
        problems.append(f"outputs are {[o.name for o in proto.graph.output]}, expected {list(output_names)}")
    for out in proto.graph.output:
        dims = _dims(out)
        if not dims or isinstance(dims[0], int):
            problems.append(f"output {out.name!r} has no dynamic batch axis (shape {dims})")
    if problems:
        raise ExportError("exported graph breaks the ONNX conventions: " + "; ".join(problems))


def onnx_session(onnx_model: bytes | Path, threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU provider (the one every machine has); ``threads`` > 0
    caps its intra-op threads (0: one per core)."""
    source = str(onnx_model) if isinstance(onnx_model, Path) else onnx_model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads > 0:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, x: np.ndarray | Mapping[str, np.ndarray],
             batch_size: int = 4096) -> dict[str, np.ndarray]:
    """All outputs of ``session`` for raw features ``x`` (or the graph's inputs by name, e.g.
    ``modelloop.categorical.feeds``), in batches of ``batch_size``."""
    names = [o.name for o in session.get_outputs()]
    if isinstance(x, Mapping):
        inputs = dict(x)
    else:
        inputs = {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}
    n = len(next(iter(inputs.values())))
    parts = [session.run(names, {k: v[i:i + batch_size] for k, v in inputs.items()})
             for i in range(0, max(n, 1), batch_size)]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}


def _torch_outputs(module: nn.Module, x: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    outs = out if isinstance(out, tuple | list) else (out,)
    return {name: o.detach().cpu().numpy() for name, o in zip(names, outs, strict=True)}


def _abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    both_nan = np.isnan(a) & np.isnan(b)
    # NaN on one side only is the worst mismatch there is; NaN on both sides agrees
    return np.where(both_nan, 0.0, np.where(np.isnan(diff), np.inf, diff))


Feed = Callable[[np.ndarray], tuple[dict[str, np.ndarray], np.ndarray]]
"""Held-out rows -> (the ONNX graph's inputs by name, the PyTorch module's float32 input)."""


def _float_feed(x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    return {INPUT_NAME: x}, x


def check_parity(
    module: nn.Module,
    onnx_model: bytes | Path,
    holdout: np.ndarray,
    *,
    tolerance: float,
    batch_sizes: Sequence[int] = (1, 7, 4096),
    max_rows: int = 512,
    threads: int = 0,
    feed: Feed | None = None,
) -> ParityResult:
    """Run the ONNX model and ``module`` (eval mode, CPU) on the same held-out rows at each batch
    size; raise one :class:`ParityError` listing every output and batch size off by more than
    ``tolerance``. Rows are tiled to fill a batch larger than the held-out set. ``feed`` turns
    held-out rows into the graph's inputs and ``module``'s input (for a categorical model: the
    raw strings, and the codes Python gives them); raw float32 features for both when None."""
    module = module.eval().cpu()
    if feed is None:
        held = np.ascontiguousarray(np.asarray(holdout, dtype=np.float32)[:max_rows])
        feed = _float_feed
    else:
        held = np.asarray(holdout)[:max_rows]
    if len(held) == 0:
        raise ExportError("no held-out rows to check the exported model on")
    session = onnx_session(onnx_model, threads)
    names = [o.name for o in session.get_outputs()]
    mismatches: list[Mismatch] = []
    worst = 0.0
    for b in batch_sizes:
        n_batches = -(-max(len(held), b) // b)
        rows = np.arange(n_batches * b) % len(held)  # held-out row index of each checked row
        per_output: dict[str, tuple[float, int]] = {n: (0.0, 0) for n in names}
        for k in range(n_batches):
            ids = rows[k * b:(k + 1) * b]
            inputs, x = feed(held[ids])
            got = dict(zip(names, session.run(names, inputs), strict=True))
            want = _torch_outputs(module, x, names)
            for name in names:
                if got[name].shape != want[name].shape:
                    per_output[name] = (np.inf, int(ids[0]))
                    continue
                diff = _abs_diff(got[name], want[name]).reshape(len(x), -1).max(axis=1)
                i = int(diff.argmax())
                if diff[i] > per_output[name][0]:
                    per_output[name] = (float(diff[i]), int(ids[i]))
        for name, (max_diff, row) in per_output.items():
            worst = max(worst, max_diff)
            if not max_diff <= tolerance:
                mismatches.append(Mismatch(name, b, max_diff, row))
    if mismatches:
        raise ParityError(mismatches, tolerance)
    log.info("ONNX parity holds: max abs diff %.2e <= %g at batch sizes %s on %d rows",
             worst, tolerance, list(batch_sizes), len(held))
    return ParityResult(passed=True, max_abs_diff=worst, tolerance=tolerance,
                        batch_sizes=list(batch_sizes), rows_checked=len(held))


# -- categorical features: the graph codes the raw strings itself --------------------------------
ML_DOMAIN = "ai.onnx.ml"
ML_OPSET = 2  # LabelEncoder with keys_strings / values_floats / default_float
_CODED = "_ml_coded_features"  # the prologue's output: the torch graph's float32 input


def add_categorical_prologue(onnx_bytes: bytes, feature_names: Sequence[str],
                             categories: Mapping[str, Sequence[str]]) -> bytes:
    """The exported graph (float32 ``input`` ``[N, n_features]`` with codes in the categorical
    positions) behind a prologue that takes ``input`` ``[N, n_numeric]`` and ``categories``
    (string ``[N, n_categorical]``), both in ``feature_names`` order: Split ``categories`` by
    column, one ``LabelEncoder`` per column (``categories[name][i]`` -> ``i + 1``, anything else
    0), Concat with ``input`` and Gather back to ``feature_names`` order. Checked."""
    numeric = [j for j, f in enumerate(feature_names) if f not in categories]
    cats = [j for j, f in enumerate(feature_names) if f in categories]
    if not cats:
        return onnx_bytes
    proto = onnx.load_from_string(onnx_bytes)
    graph = proto.graph
    (old,) = [i for i in graph.input if i.name == INPUT_NAME]
    for node in graph.node:
        node.input[:] = [_CODED if n == INPUT_NAME else n for n in node.input]
    for out in graph.output:
        if out.name == INPUT_NAME:
            raise ExportError("the exported graph passes its input through unchanged")
    graph.input.remove(old)
    batch = "batch"
    graph.input.extend([
        helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, len(numeric)]),
        helper.make_tensor_value_info(CATEGORIES_INPUT, TensorProto.STRING, [batch, len(cats)]),
    ])
    nodes: list[onnx.NodeProto] = []
    columns = [f"_ml_category_{k}" for k in range(len(cats))]
    if len(cats) > 1:
        split = helper.make_tensor("_ml_category_split", TensorProto.INT64, [len(cats)], [1] * len(cats))
        graph.initializer.append(split)
        nodes.append(helper.make_node("Split", [CATEGORIES_INPUT, split.name], columns, axis=1))
    else:
        nodes.append(helper.make_node("Identity", [CATEGORIES_INPUT], columns))
    codes = []
    for k, j in enumerate(cats):
        values = [str(v) for v in categories[feature_names[j]]]
        codes.append(f"_ml_category_code_{k}")
        nodes.append(helper.make_node(
            "LabelEncoder", [columns[k]], [codes[-1]], domain=ML_DOMAIN,
            keys_strings=values, values_floats=[float(i + 1) for i in range(len(values))],
            default_float=0.0))
    nodes.append(helper.make_node("Concat", [INPUT_NAME, *codes], ["_ml_concat"], axis=1))
    # position in the concatenation of each feature, in feature_names order
    order = {j: i for i, j in enumerate([*numeric, *cats])}
    gather = helper.make_tensor("_ml_feature_order", TensorProto.INT64, [len(feature_names)],
                                [order[j] for j in range(len(feature_names))])
    graph.initializer.append(gather)
    nodes.append(helper.make_node("Gather", ["_ml_concat", gather.name], [_CODED], axis=1))
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *rest])
    check_categorical_conventions(proto, feature_names, categories,
                                  [o.name for o in graph.output])
    if not any(o.domain == ML_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(ML_DOMAIN, ML_OPSET))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the categorical prologue: {exc}") from exc
    return proto.SerializeToString()


def check_categorical_conventions(proto: onnx.ModelProto, feature_names: Sequence[str],
                                  categories: Mapping[str, Sequence[str]],
                                  output_names: Sequence[str]) -> None:
    """Raise :class:`ExportError` unless the graph of a model with categorical features takes
    ``input`` float32 ``[batch, n_numeric]`` and ``categories`` string ``[batch,
    n_categorical]`` and gives the named outputs (modelloop/categorical.py)."""
    n_cat = sum(1 for f in feature_names if f in categories)
    want = [(INPUT_NAME, TensorProto.FLOAT, len(feature_names) - n_cat),
            (CATEGORIES_INPUT, TensorProto.STRING, n_cat)]
    consts = {t.name for t in proto.graph.initializer}
    got = [(i.name, i.type.tensor_type.elem_type, _dims(i)[1:])
           for i in proto.graph.input if i.name not in consts]
    problems: list[str] = []
    if [(n, t, [d]) for n, t, d in want] != got:
        problems.append(f"inputs are {[(n, TensorProto.DataType.Name(t), d) for n, t, d in got]}, "
                        f"expected {[(n, TensorProto.DataType.Name(t), [d]) for n, t, d in want]}")
    if [o.name for o in proto.graph.output] != list(output_names):
        problems.append(f"outputs are {[o.name for o in proto.graph.output]}, expected "
                        f"{list(output_names)}")
    if problems:
        raise ExportError("exported graph breaks the ONNX conventions: " + "; ".join(problems))
