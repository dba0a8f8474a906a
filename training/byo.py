"""Bring your own model: register a model modelloop did not train.

Two ways in, both ending in the same kind of version ``modelloop train`` makes (a checked ONNX
graph with the conventions of ``modelloop.schemas``, its schema, metrics on held-out rows and a
reference sample with the held-out rows marked), so serving, monitoring and promotion treat it
alike:

* :func:`register_module`: a trained ``torch.nn.Module`` (raw or standardised features in,
  logits or a value out) is wrapped with optional preprocessing and a softmax, exported with a
  dynamic batch axis and checked against PyTorch at several batch sizes::

      meta = register_module(net, ExampleData(frame, target="species", holdout=test_frame),
                             name="iris", preprocess="fit", init_kwargs={"n_features": 4, "n_classes": 3},
                             registry=Registry(home / "registry"), promote=True)

* :func:`register_onnx`: an ONNX file made elsewhere (torch, skl2onnx, ...): one float input
  ``[batch, n_features]``, a classifier's probabilities ``[batch, classes]`` or a regressor's
  ``[batch]`` / ``[batch, 1]``; run on the data at several batch sizes (``modelloop models
  register``).

A module version keeps its architecture's import path (``package.module:Class``) and constructor
keyword arguments in its config when ``init_kwargs`` is given, so ``modelloop retrain`` rebuilds
it; an ONNX version has no weights to retrain (:func:`not_retrainable` says why).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import onnx
import pandas as pd
import torch
from torch import nn

from modelloop.registry import Registry
from modelloop.schemas import (
    INPUT_NAME,
    PREDICTION,
    PROBABILITIES,
    REF_LABEL,
    REF_SPLIT,
    ModelMetadata,
    ParityResult,
    Task,
    TensorSpec,
)
from training.config import TrainingConfig, resolve_gate_metric
from training.data import DataError, TabularDataset, prepare, read_table, split_dataset
from training.evaluate import evaluate
from training.export import ExportError, check_parity, export_onnx, onnx_session, run_onnx
from training.measure import layout
from training.models import (
    ImportedBackbone,
    InferenceGraph,
    Preprocessor,
    TabularNet,
    import_architecture,
)
from training.pipeline import WEIGHTS_FILE, _parity_rows, subsample, with_outputs
from training.settings import TrainingSettings
from training.vision import ImageClassifier, ImagePreprocessor

log = logging.getLogger(__name__)

Rows: TypeAlias = pd.DataFrame | tuple[np.ndarray, np.ndarray] | str | Path
"""A DataFrame with the target column, ``(features, target)`` arrays (with ``feature_names``),
or a CSV/Parquet file."""
SOURCE_MODULE = "module"
SOURCE_ONNX = "onnx"
PROBE_ROWS = 4  # rows the module is first run on, to check its output's shape
PROBABILITY_TOL = 1e-3


class ByoError(ValueError):
    """The model, or the data it is to be judged on, cannot be registered; the message says why."""


@dataclass(frozen=True)
class ExampleData:
    """The data a model is registered with: ``data``, what it was trained on (drift is measured
    against it), and ``holdout``, rows it never saw (metrics, the parity check, the sidecar's
    accuracy calibration; default: a seeded validation and test split of ``data``)."""

    data: Rows
    target: str | None = "target"
    """The target column; None: the data has no labels (a DataFrame or a file; an ONNX file's
    reference only): no metrics, and the task, with a classifier's classes, must be given or
    read from the graph."""
    holdout: Rows | None = None
    task: Task | None = None
    """None infers it from the target, as ``modelloop train`` does."""
    class_labels: Sequence[str] | None = None
    """The classes in the order of the model's outputs; default the sorted labels (as
    scikit-learn orders them)."""
    feature_names: Sequence[str] | None = None
    """The columns of ``(features, target)`` arrays (default ``f0``, ``f1``, ...)."""


@dataclass(frozen=True)
class _Examples:
    """The example data as one dataset: the rows the model was fitted on, and those it never saw."""

    ds: TabularDataset
    train: np.ndarray
    held: np.ndarray
    labelled: bool = True
    """False for data without labels: ``ds.target`` is zeros, no rows are held out."""


def _frame(data: Rows, target: str, feature_names: Sequence[str] | None) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, str | Path):
        return read_table(data)
    features, labels = data
    x = np.asarray(features)
    x = x.reshape(len(x), -1) if x.ndim > 2 else x  # images: their values, row-major
    names = list(feature_names) if feature_names is not None else [f"f{i}" for i in range(x.shape[1])]
    if x.ndim != 2 or x.shape[1] != len(names):
        raise DataError(f"features of shape {list(x.shape)} do not match {len(names)} feature names")
    frame = pd.DataFrame(x, columns=names)
    frame[target] = np.asarray(labels)
    return frame


def _in_order(frame: pd.DataFrame, target: str, columns: Sequence[str] | None,
              source: str) -> pd.DataFrame:
    """``frame``'s feature columns in the order of the graph's per-column inputs, refused
    when they are not the same columns (``columns`` None: as they are)."""
    if columns is None:
        return frame
    have = [str(c) for c in frame.columns if c != target]
    missing = [c for c in columns if c not in have]
    extra = [c for c in have if c not in columns]
    if missing or extra:
        problems = ([f"no column for the graph's inputs {missing}"] if missing else []) + (
            [f"columns {extra} that are not inputs of the graph"] if extra else [])
        raise DataError(f"{source}: its columns do not match the graph's inputs: "
                        f"{'; '.join(problems)} (target column {target!r})")
    return frame[[*columns, target] if target in frame.columns else list(columns)]


def _examples(given: ExampleData | pd.DataFrame, settings: TrainingSettings,
              columns: Sequence[str] | None = None) -> _Examples:
    """``data`` and ``holdout`` as one dataset, their feature columns in the order of
    ``columns`` when given; without ``holdout``, a seeded validation and test split of ``data``
    (``settings``' fractions) stands for the rows the model never saw."""
    ex = given if isinstance(given, ExampleData) else ExampleData(given)
    target, task, class_labels = ex.target, ex.task, ex.class_labels
    # a file is recorded as the version's dataset: a retraining job reads it again
    source = str(Path(ex.data).resolve()) if isinstance(ex.data, str | Path) else "dataframe"
    if target is None:
        return _unlabelled(ex, columns, source)
    frame = _in_order(_frame(ex.data, target, ex.feature_names), target, columns, source)
    if ex.holdout is None:
        ds = _numeric_only(prepare(frame, target, task=task, class_labels=class_labels,
                                   source=source))
        split = split_dataset(ds, val_fraction=settings.val_fraction,
                              test_fraction=settings.test_fraction, seed=settings.seed)
        return _Examples(ds, split.train, np.sort(np.concatenate([split.val, split.test])))
    held_source = str(ex.holdout) if isinstance(ex.holdout, str | Path) else "holdout"
    held = _in_order(_frame(ex.holdout, target, ex.feature_names), target, columns, held_source)
    if list(held.columns) != list(frame.columns):
        raise DataError(f"the holdout's columns {list(held.columns)} are not the data's "
                        f"{list(frame.columns)}")
    ds = _numeric_only(prepare(pd.concat([frame, held], ignore_index=True), target, task=task,
                               class_labels=class_labels, source=source))
    return _Examples(ds, np.arange(len(frame)), np.arange(len(frame), len(frame) + len(held)))


def _numeric_only(ds: TabularDataset) -> TabularDataset:
    """A module's own graph takes numbers: columns of text (categorical features, which only
    ``modelloop train`` codes inside its graph) are refused in one line."""
    if ds.categories:
        raise DataError(f"{ds.source}: columns {', '.join(map(repr, ds.categories))} hold text; "
                        "a module brought in takes numeric features only (code them as numbers, "
                        "or train with modelloop train)")
    return ds


def _unlabelled(ex: ExampleData, columns: Sequence[str] | None, source: str) -> _Examples:
    """Rows without labels: every row is a reference row, the target zeros, nothing held out."""
    classify = ex.task is Task.classification
    if ex.task is None or (classify and not ex.class_labels):
        raise DataError(f"{source}: without a target column the task{' and the classes' if classify else ''} "
                        "must be given (--task, --classes) or said by the graph")
    if ex.holdout is not None:
        raise DataError(f"{source}: a holdout without a target column measures nothing")
    blank = "_ml_no_target"
    frame = _in_order(_frame(ex.data, blank, ex.feature_names), blank, columns, source)
    ds = _numeric_only(prepare(frame.assign(**{blank: 0.0}), blank, task=Task.regression,
                               source=source))
    ds = replace(ds, task=ex.task, target=np.zeros(len(ds), np.int64 if classify else np.float64),
                 class_labels=[str(c) for c in ex.class_labels or []] if classify else None)
    return _Examples(ds, np.arange(len(ds)), np.arange(0), labelled=False)


def _n_outputs(ds: TabularDataset) -> int:
    return len(ds.class_labels or []) if ds.task is Task.classification else 1


def _main_output(task: Task) -> str:
    return PROBABILITIES if task is Task.classification else PREDICTION


def _finite(outputs: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
    if bad.any():
        raise ByoError(f"{what} gives NaN or infinity in {int(bad.sum())} of {len(outputs)} rows "
                       f"of the data, first row {int(bad.argmax())}")


def _build_version(name: str, ex: _Examples, onnx_bytes: bytes, settings: TrainingSettings, *,
                   what: str, architecture: str, parity: ParityResult | None,
                   config: Mapping[str, Any], lineage: Mapping[str, Any],
                   input_shape: Sequence[int | None] | None = None) -> tuple[ModelMetadata, pd.DataFrame]:
    """Metrics on the held-out rows and the reference sample (training rows and, for a
    classifier, held-out rows marked as such, as ``training/pipeline.py`` makes them), both from
    the ONNX graph's outputs. ``input_shape``: the graph's input (default ``[batch,
    n_features]``; an image's ``[batch, channels, height, width]`` takes the rows reshaped)."""
    ds, task = ex.ds, ex.ds.task
    main = _main_output(task)
    shape = list(input_shape) if input_shape is not None else [None, ds.n_features]
    session = onnx_session(onnx_bytes, settings.threads)
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {"split": "none", "labelled": False}
    if ex.labelled:
        held_out = run_onnx(session, layout(ds.features[ex.held], shape))[main]
        _finite(held_out, what)
        evaluation = evaluate(task, ds.target[ex.held], held_out, ds.class_labels)
        metrics, details = evaluation.metrics, dict(evaluation.details)
        details.update({"split": "holdout",
                        "split_rows": {"train": len(ex.train), "holdout": len(ex.held)}})
    ref_rows = subsample(ex.train, settings.reference_rows, settings.seed)
    held_rows = (subsample(ex.held, settings.reference_rows, settings.seed)
                 if task is Task.classification else ref_rows[:0])
    rows = np.concatenate([ref_rows, held_rows])
    outputs = run_onnx(session, layout(ds.features[rows], shape))[main]
    _finite(outputs, what)
    reference = pd.DataFrame(ds.features[rows], columns=ds.feature_names)
    if ex.labelled:
        reference[REF_LABEL] = ds.target[rows]
    with_outputs(reference, task, outputs)
    reference[REF_SPLIT] = np.where(np.arange(len(rows)) < len(ref_rows), "train", "holdout")
    meta = ModelMetadata(
        name=name, task=task, architecture=architecture,
        inputs=[TensorSpec(name=INPUT_NAME, dtype="float32", shape=shape)],
        outputs=[TensorSpec(name=main, dtype="float32", shape=[None, _n_outputs(ds)])],
        feature_names=ds.feature_names,
        class_labels=ds.class_labels if task is Task.classification else None,
        metrics=metrics, evaluation=details, data_fingerprint=ds.fingerprint,
        dataset=ds.source, parity=parity, config=dict(config), lineage=dict(lineage),
    )
    log.info("%s on %d held-out rows: %s", what, len(ex.held),
             ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return meta, reference


def _store(meta: ModelMetadata, onnx_bytes: bytes, reference: pd.DataFrame, registry: Registry,
           promote: bool, artifacts: Mapping[str, bytes] | None = None) -> ModelMetadata:
    """Register; when ``promote``, move ``production`` through the registry's checked promotion
    (the version is loaded and run on its reference rows first: BrokenVersion when it fails)."""
    registered = registry.register(meta, onnx_bytes, reference=reference, artifacts=artifacts)
    log.info("registered %s v%d (%s) under %s", registered.name, registered.version,
             registered.lineage.get("source"), registry.root)
    if promote:
        registry.promote(registered.name, registered.version)
    return registered


# -- a torch.nn.Module -------------------------------------------------------------------------
def _preprocessor(preprocess: Preprocessor | Literal["fit"] | None, ex: _Examples) -> Preprocessor:
    if isinstance(preprocess, Preprocessor):
        return preprocess
    if preprocess == "fit":
        return Preprocessor.fit(ex.ds.features[ex.train])
    if preprocess is not None:
        raise ByoError(f"preprocess must be a Preprocessor, 'fit' or None, not {preprocess!r}")
    identity = Preprocessor(ex.ds.n_features)
    identity.median.fill_(float("nan"))  # NaN where NaN was: raw features pass unchanged
    return identity


def _image_net(module: nn.Module, ex: _Examples, shape: Sequence[int],
               preprocess: ImagePreprocessor | Literal["fit"] | None, what: str) -> TabularNet:
    """The module behind modelloop's image preprocessing (per-pixel median imputation, one
    mean and scale; fitted, given or none) and softmax, as ``modelloop train --model cnn``."""
    dims = tuple(int(d) for d in shape)
    if len(dims) != 3 or int(np.prod(dims)) != ex.ds.n_features:
        raise ByoError(f"{what}: input_shape {list(dims)} is not [channels, height, width] of "
                       f"the data's {ex.ds.n_features} values per row")
    if ex.ds.task is not Task.classification:
        raise ByoError(f"{what}: an image model is registered as a classifier, not "
                       f"{ex.ds.task.value}")
    if preprocess == "fit":
        pre = ImagePreprocessor.fit(ex.ds.features[ex.train].reshape(-1, *dims))
    elif isinstance(preprocess, ImagePreprocessor):
        pre = preprocess
    elif preprocess is None:
        pre = ImagePreprocessor(dims)
        pre.median.fill_(float("nan"))  # NaN where NaN was: raw pixels pass unchanged
    else:
        raise ByoError(f"{what}: preprocess of an image model must be an ImagePreprocessor, "
                       f"'fit' or None, not {type(preprocess).__name__}")
    return ImageClassifier(pre, ImportedBackbone(module), _n_outputs(ex.ds), None)  # type: ignore[arg-type]


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _probe(net: TabularNet, ex: _Examples, what: str) -> None:
    """Run the module on a few rows and check its output's shape against the task."""
    x = torch.from_numpy(net.layout(ex.ds.features[ex.held[:PROBE_ROWS]]))
    try:
        with torch.no_grad():
            out = net(x)
    except Exception as exc:  # whatever the user's forward raises
        raise ByoError(f"{what} fails on a batch of {len(x)} rows {list(x.shape)}: "
                       f"{type(exc).__name__}: {exc}") from exc
    want = [len(x), _n_outputs(ex.ds)]
    if list(out.shape) != want:
        task = ex.ds.task
        expected = (f"[batch, {want[1]}] logits, one per class {ex.ds.class_labels}"
                    if task is Task.classification else "[batch] or [batch, 1]")
        raise ByoError(f"{what} outputs shape {list(out.shape)} for {len(x)} rows; a "
                       f"{task.value} model must output {expected}")


def _architecture_ref(module: nn.Module, init_kwargs: Mapping[str, Any]) -> str:
    """``package.module:Class`` of ``module``, checked: importable, and ``Class(**init_kwargs)``
    has the module's parameters (names and shapes), so a retraining job can rebuild it."""
    cls = type(module)
    ref = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ByoError(f"{ref} cannot be imported by a retraining job: define the class in an "
                       "importable module, or pass init_kwargs=None (not retrainable)")
    try:
        arch = import_architecture(ref)
        assert arch.build is not None
        fresh = arch.build(arch.params.model_validate(dict(init_kwargs)), 0, 0)
    except (ValueError, TypeError) as exc:
        raise ByoError(f"{ref}(**{dict(init_kwargs)}) cannot be rebuilt: {exc}") from exc
    shapes = {k: tuple(v.shape) for k, v in ImportedBackbone(module).state_dict().items()}
    fresh_shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if shapes != fresh_shapes:
        differ = sorted(set(shapes.items()) ^ set(fresh_shapes.items()))[:3]
        raise ByoError(f"{ref}(**{dict(init_kwargs)}) does not rebuild the module: its "
                       f"parameters differ ({differ})")
    return ref


def _export_reason(exc: BaseException) -> str:
    """The exporter's own reason, in one line: the innermost cause's first line (the exporter
    wraps it in pages of advice and the traced graph)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _export(graph: InferenceGraph, ex: _Examples, what: str,
            input_shape: Sequence[int | None] | None) -> bytes:
    try:
        return export_onnx(graph, n_features=ex.ds.n_features,
                           output_names=[_main_output(ex.ds.task)],
                           example=graph.net.layout(ex.ds.features[ex.held]), input_shape=input_shape)
    except ExportError as exc:
        text = str(exc)
        if "batch" in text and ("Constraints violated" in text or "dynamic batch axis" in text):
            raise ByoError(f"{what}: its batch axis is not dynamic (the traced module depends "
                           f"on the batch size): {_export_reason(exc)}") from exc
        raise ByoError(f"{what} does not export to ONNX: {_export_reason(exc)}") from exc


def register_module(
    module: nn.Module,
    data: ExampleData | pd.DataFrame,
    *,
    name: str,
    preprocess: Preprocessor | ImagePreprocessor | Literal["fit"] | None = None,
    init_kwargs: Mapping[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
    registry: Registry | None = None,
    settings: TrainingSettings | None = None,
    promote: bool = False,
) -> ModelMetadata:
    """Export a trained ``module``, check it and register it as a new version of ``name``.

    ``module`` maps ``[batch, n_features]`` float32 (after ``preprocess``) to logits
    ``[batch, classes]`` (the graph adds the softmax) or a value ``[batch]`` / ``[batch, 1]``.
    ``data``: :class:`ExampleData` (a bare DataFrame: its target column is ``target``).
    ``preprocess``: None (raw features in), ``"fit"`` (median imputation and
    standardisation fitted on ``data``, as ``modelloop train`` does) or a fitted
    :class:`~training.models.Preprocessor` (the one the module was trained behind).
    ``init_kwargs``: the class's constructor arguments, stored with its import path so
    ``modelloop retrain`` can rebuild it (None: the version cannot be retrained).
    ``input_shape``: ``[channels, height, width]`` when the module is an image classifier
    taking ``[batch, channels, height, width]``: each row of ``data`` holds an image's values,
    row-major; the graph takes the image tensor (or the rows, through serving), its
    preprocessing is the image kind (:class:`~training.vision.ImagePreprocessor`), and
    ``modelloop quantize`` measures it on ``data`` when ``data`` is a file and ``init_kwargs``
    is given (it is not retrained by modelloop: a per-model retraining command does that).

    Raises ``ByoError`` (a module that fails, exports badly or outputs the wrong shape),
    ``ParityError`` (ONNX Runtime and PyTorch differ beyond ``settings.parity_tolerance``; it
    lists the worst held-out rows), ``DataError`` (unusable data), ``BrokenVersion`` (the
    promotion check failed; the version stays registered).
    """
    settings = settings or TrainingSettings()
    what = f"module {_class_name(module)}"
    ex = _examples(data, settings)
    if not ex.labelled:
        raise ByoError(f"{what}: register a module with labelled data (its target column)")
    if ex.ds.task not in (Task.classification, Task.regression):
        raise ByoError(f"{what}: task {ex.ds.task.value} is not supported here")
    ref = _architecture_ref(module, init_kwargs) if init_kwargs is not None else None
    module = module.cpu().eval()
    if input_shape is not None:
        net = _image_net(module, ex, input_shape, preprocess, what).eval()  # type: ignore[arg-type]
    else:
        net = TabularNet(_preprocessor(preprocess, ex), ImportedBackbone(module),  # type: ignore[arg-type]
                         ex.ds.task, _n_outputs(ex.ds)).eval()
    shape = [None, *input_shape] if input_shape is not None else None
    _probe(net, ex, what)
    graph = InferenceGraph(net)
    onnx_bytes = _export(graph, ex, what, shape)
    x_held = ex.ds.features[ex.held]
    # with imputation in the graph, rows with one feature missing each are checked too
    parity = check_parity(graph, onnx_bytes,
                          net.layout(_parity_rows(x_held) if preprocess is not None and shape is None
                                     else x_held),
                          tolerance=settings.parity_tolerance,
                          batch_sizes=settings.parity_batch_sizes, max_rows=settings.parity_rows,
                          threads=settings.threads)
    config: dict[str, Any] = {}
    if ref is not None:  # what the retraining job trains: the same class, modelloop's loop
        config = TrainingConfig.from_settings(
            settings, target=ex.ds.target_name, task=ex.ds.task, architecture=ref,
            model=dict(init_kwargs or {}),
            gate_metric=resolve_gate_metric(None, ex.ds.task, settings.retrain_metric),
        ).model_dump(mode="json")
    lineage: dict[str, Any] = {"source": SOURCE_MODULE, "module_class": _class_name(module),
               "architecture_ref": ref, "retrainable": ref is not None,
               "preprocess": ("given" if isinstance(preprocess, Preprocessor | ImagePreprocessor)
                              else "fitted" if preprocess else "none")}
    if input_shape is not None:
        lineage["input_shape"] = list(input_shape)
    meta, reference = _build_version(name, ex, onnx_bytes, settings, what=what,
                                     architecture=ref or _class_name(module), parity=parity,
                                     config=config, lineage=lineage, input_shape=shape)
    weights = io.BytesIO()
    torch.save(net.state_dict(), weights)
    return _store(meta, onnx_bytes, reference, registry or Registry(settings.registry_dir),
                  promote, artifacts={WEIGHTS_FILE: weights.getvalue()})


# -- an ONNX file ------------------------------------------------------------------------------
ML_DOMAIN = "ai.onnx.ml"
COLUMN_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64)
"""The types a per-column input may take: its column of the float32 matrix is cast to it."""


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]


def _is_float_tensor(value: onnx.ValueInfoProto) -> bool:
    return (value.type.HasField("tensor_type")
            and value.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE))


def _load_graph(path: Path, what: str) -> onnx.ModelProto:
    try:
        proto = onnx.load_from_string(path.read_bytes())
        onnx.checker.check_model(proto)
    except Exception as exc:  # unreadable, not protobuf, or refused by the checker: all the same here
        raise ByoError(f"{what} is not a valid ONNX model: {type(exc).__name__}: {exc}") from exc
    return proto


def _feeds(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph's inputs that are fed (not initializers)."""
    initializers = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in initializers]


def _dynamic_batch(value: onnx.ValueInfoProto, what: str, kind: str = "input") -> None:
    if isinstance(_dims(value)[0], int):
        raise ByoError(f"{what}: {kind} {value.name!r} has shape {_dims(value)}: its batch axis is "
                       "not dynamic (export it with a symbolic first axis)")


def _graph_input(proto: onnx.ModelProto, n_features: int, what: str) -> onnx.ValueInfoProto:
    """The graph's one float32 input ``[batch, n_features]``."""
    (inp,) = _feeds(proto)
    dims = _dims(inp)
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or len(dims) != 2:
        raise ByoError(f"{what}: input {inp.name!r} is not a float32 matrix [batch, "
                       f"{n_features}] (shape {dims})")
    _dynamic_batch(inp, what)
    if isinstance(dims[1], int) and dims[1] != n_features:
        raise ByoError(f"{what}: input {inp.name!r} takes {dims[1]} features; the data has "
                       f"{n_features}")
    return inp


def _column_inputs(proto: onnx.ModelProto, what: str) -> list[str] | None:
    """The columns of a graph with one numeric ``[batch, 1]`` input per column (skl2onnx's
    from a DataFrame), in the graph's order; None for a graph with one input."""
    inputs = _feeds(proto)
    if not inputs:
        raise ByoError(f"{what} takes no inputs")
    if len(inputs) == 1:
        return None
    for inp in inputs:
        dims = _dims(inp)
        elem = inp.type.tensor_type.elem_type
        if elem not in COLUMN_TYPES or len(dims) != 2 or dims[1] != 1:
            raise ByoError(f"{what} takes {len(inputs)} inputs and {inp.name!r} is not a numeric "
                           f"column [batch, 1] ({onnx.TensorProto.DataType.Name(elem)} {dims}); "
                           "modelloop serves one float matrix [batch, n_features] or one numeric "
                           "[batch, 1] input per column")
        _dynamic_batch(inp, what)
    return [i.name for i in inputs]


def _graph_says(proto: onnx.ModelProto) -> tuple[Task | None, list[str] | None, bool]:
    """The task and a classifier's classes as the graph says them (ai.onnx.ml's classifier,
    ZipMap and regressor nodes, as skl2onnx writes them): ``(task, classes, named)``, ``named``
    when the classes are the graph's strings rather than numbers."""
    for node in proto.graph.node:
        if node.domain == ML_DOMAIN and (node.op_type.endswith("Classifier") or node.op_type == "ZipMap"):
            attrs = {a.name: a for a in node.attribute}
            if "classlabels_strings" in attrs:
                return Task.classification, [s.decode() for s in attrs["classlabels_strings"].strings], True
            for key in ("classlabels_ints", "classlabels_int64s"):
                if key in attrs:
                    return Task.classification, [str(i) for i in attrs[key].ints], False
    if any(n.domain == ML_DOMAIN and n.op_type.endswith("Regressor") for n in proto.graph.node) \
            and not any("prob" in o.name.lower() for o in proto.graph.output):
        return Task.regression, None, False
    return None, None, False


def _as_the_graph_says(data: ExampleData, proto: onnx.ModelProto, what: str) -> ExampleData:
    """``data`` with the task and classes the graph says; refused where the flags say otherwise
    (numbered classes may be given names, in the graph's order)."""
    task, classes, named = _graph_says(proto)
    if task is None:
        return data
    if data.task is not None and data.task is not task:
        raise ByoError(f"{what} is a {task.value} model (its {ML_DOMAIN} nodes say so), not "
                       f"{data.task.value}")
    given = [str(c) for c in data.class_labels] if data.class_labels else None
    if classes and given and (len(given) != len(classes) or (named and given != classes)):
        raise ByoError(f"{what}: its classes are {classes}, in this order; the classes given "
                       f"are {given}")
    return replace(data, task=task, class_labels=given or classes)


def _unzip(proto: onnx.ModelProto) -> None:
    """Undo skl2onnx's ZipMap (a classifier's probabilities as a sequence of maps, one per
    row): the graph outputs the probability tensor the maps were made from."""
    producers = {name: node for node in proto.graph.node for name in node.output}
    outputs = {o.name for o in proto.graph.output}
    for out in list(proto.graph.output):
        node = producers.get(out.name)
        if node is None or node.domain != ML_DOMAIN or node.op_type != "ZipMap":
            continue
        proto.graph.node.remove(node)
        if node.input[0] in outputs:  # the graph outputs the tensor too
            proto.graph.output.remove(out)
            continue
        n_classes = sum(len(a.strings) + len(a.ints) for a in node.attribute)
        out.CopyFrom(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT,
                                                        ["batch", n_classes]))


def _graph_output(proto: onnx.ModelProto, task: Task, n_outputs: int, what: str) -> onnx.ValueInfoProto:
    """The output to serve: a classifier's probabilities, a regressor's value."""
    floats = [o for o in proto.graph.output if _is_float_tensor(o)]
    if task is Task.classification:
        fits = [o for o in floats if len(_dims(o)) == 2
                and (_dims(o)[1] == n_outputs or isinstance(_dims(o)[1], str))]
        fits.sort(key=lambda o: "prob" not in o.name.lower())
        hint = f"probabilities [batch, {n_outputs}]"
    else:
        fits = [o for o in floats if len(_dims(o)) == 1 or (len(_dims(o)) == 2
                and (_dims(o)[1] == 1 or isinstance(_dims(o)[1], str)))]
        hint = "a value [batch] or [batch, 1]"
    if not fits:
        shown = {o.name: _dims(o) if o.type.HasField("tensor_type") else "not a tensor"
                 for o in proto.graph.output}
        raise ByoError(f"{what}: no output fits a {task.value} model ({hint}); its outputs: {shown}")
    _dynamic_batch(fits[0], what, "output")
    return fits[0]


def _rename(proto: onnx.ModelProto, old: str, new: str) -> None:
    if old == new:
        return
    for node in proto.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        if value.name == old:
            value.name = new


def _split_columns(proto: onnx.ModelProto, columns: Sequence[str]) -> None:
    """Feed the per-column inputs from one float32 matrix ``input`` ``[batch, columns]``: a
    Split on its second axis, then each column cast to its input's type. Serving, the checks and
    every tool downstream then run it as any other version."""
    graph, n = proto.graph, len(columns)
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    parts = [f"{INPUT_NAME}_column_{i}" for i in range(n)]
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=1)
    if opset >= 13:  # the sizes became an input in opset 13
        sizes = onnx.numpy_helper.from_array(np.ones(n, np.int64), f"{INPUT_NAME}_column_sizes")
        graph.initializer.append(sizes)
        split = onnx.helper.make_node("Split", [INPUT_NAME, sizes.name], parts, axis=1)
    else:
        split = onnx.helper.make_node("Split", [INPUT_NAME], parts, axis=1, split=[1] * n)
    casts = [onnx.helper.make_node("Cast", [p], [c], to=types[c])
             for p, c in zip(parts, columns, strict=True)]
    nodes = [split, *casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [i for i in graph.input if i.name not in set(columns)]
    del graph.input[:]
    graph.input.extend([onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT,
                                                           ["batch", n]), *kept])


def _conventional(proto: onnx.ModelProto, inp: onnx.ValueInfoProto | None,
                  columns: Sequence[str] | None, out: onnx.ValueInfoProto, main: str) -> bytes:
    """The graph with modelloop's names (input ``input``, the served output) and only that
    output, serialised; per-column inputs are fed from the one input (:func:`_split_columns`)."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    taken = {n for node in proto.graph.node for n in (*node.input, *node.output)} - {out.name}
    taken |= set(columns or ())
    if inp is not None:
        taken.discard(inp.name)
    if INPUT_NAME in taken or main in taken:
        raise ByoError(f"the graph already has values named {INPUT_NAME!r} or {main!r} that are "
                       "not its input and output")
    kept = [o for o in proto.graph.output if o.name == out.name]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    if inp is not None:
        _rename(proto, inp.name, INPUT_NAME)
    else:
        _split_columns(proto, columns or [])
    _rename(proto, out.name, main)
    return proto.SerializeToString()


def _check_outputs(onnx_bytes: bytes, ex: _Examples, settings: TrainingSettings, what: str) -> None:
    """Run the graph on the data whole and at each of ``settings.parity_batch_sizes``; the
    outputs must be finite, agree across batch sizes and, for a classifier, be probabilities."""
    try:
        session = onnx_session(onnx_bytes, settings.threads)
        x = ex.ds.features[np.concatenate([ex.held, ex.train])][:settings.parity_rows]
        whole = run_onnx(session, x, batch_size=len(x))[_main_output(ex.ds.task)]
        parts = {b: run_onnx(session, x, batch_size=b)[_main_output(ex.ds.task)]
                 for b in settings.parity_batch_sizes}
    except Exception as exc:  # ONNX Runtime raises several types; all mean "does not run"
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise ByoError(f"{what} does not run on the data: {type(exc).__name__}: {reason}") from exc
    _finite(whole, what)
    if len(whole) != len(x) or whole.reshape(len(x), -1).shape[1] != _n_outputs(ex.ds):
        raise ByoError(f"{what} gives shape {list(whole.shape)} for {len(x)} rows; expected "
                       f"{len(x)} rows of {_n_outputs(ex.ds)}")
    for b, part in parts.items():
        diff = np.abs(part.astype(np.float64) - whole).reshape(len(x), -1).max(axis=1)
        if diff.max() > settings.parity_tolerance:
            raise ByoError(f"{what} gives other outputs in batches of {b} than in one batch: max "
                           f"abs diff {diff.max():.3g} (row {int(diff.argmax())})")
    if ex.ds.task is Task.classification:
        sums = whole.sum(axis=1)
        off = (np.abs(sums - 1) > PROBABILITY_TOL) | (whole < -PROBABILITY_TOL).any(axis=1)
        if off.any():
            i = int(off.argmax())
            raise ByoError(f"{what}: its classifier output is not probabilities (row {i} sums to "
                           f"{sums[i]:.4g}); end the graph in a softmax")


def register_onnx(
    onnx_file: str | Path,
    data: ExampleData | pd.DataFrame,
    *,
    name: str,
    registry: Registry | None = None,
    settings: TrainingSettings | None = None,
    promote: bool = False,
    gate_metric: str | None = None,
) -> ModelMetadata:
    """Check an ONNX file made elsewhere on ``data`` and register it as a new version of ``name``.

    The graph takes one float32 input ``[batch, n_features]`` (the data's feature columns, in
    order) or one numeric ``[batch, 1]`` input per column (skl2onnx's from a DataFrame: the
    data's columns are matched to them by name), and outputs a classifier's probabilities
    ``[batch, classes]`` (a tensor, or skl2onnx's ZipMap, which is undone; other outputs, such
    as skl2onnx's label, are dropped) or a regressor's ``[batch]`` / ``[batch, 1]``. The task and
    the classes (in the order of the probabilities) are read from the graph where its
    ``ai.onnx.ml`` nodes say them, else taken from ``data``. The stored graph has modelloop's
    names and one input, so it is served and checked as any other version: input ``input``
    ``[batch, n_features]`` (fed to per-column inputs through a Split); output
    ``probabilities`` or ``prediction``. ``data`` and the errors are as in
    :func:`register_module`; there is no PyTorch to check parity against, so the graph is run at
    several batch sizes instead. ``gate_metric``: what ``modelloop models gate`` judges the
    line by (stored in the version's config, as ``modelloop train --gate-metric`` stores it;
    default ``retrain_metric``, a regressor's r2).
    """
    settings = settings or TrainingSettings()
    path = Path(onnx_file)
    what = f"ONNX file {path.name}"
    proto = _load_graph(path, what)
    _unzip(proto)
    columns = _column_inputs(proto, what)
    given = data if isinstance(data, ExampleData) else ExampleData(data)
    ex = _examples(_as_the_graph_says(given, proto, what), settings, columns)
    inp = None if columns else _graph_input(proto, ex.ds.n_features, what)
    out = _graph_output(proto, ex.ds.task, _n_outputs(ex.ds), what)
    onnx_bytes = _conventional(proto, inp, columns, out, _main_output(ex.ds.task))
    _check_outputs(onnx_bytes, ex, settings, what)
    try:
        metric = resolve_gate_metric(gate_metric, ex.ds.task, settings.retrain_metric)
    except ValueError as exc:
        raise ByoError(f"{what}: --gate-metric {exc}") from exc
    lineage = {"source": SOURCE_ONNX, "onnx_file": str(path.resolve()),
               "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
               "graph_inputs": columns or [inp.name if inp else INPUT_NAME],
               "graph_output": out.name, "retrainable": False}
    meta, reference = _build_version(name, ex, onnx_bytes, settings, what=what,
                                     architecture=SOURCE_ONNX, parity=None,
                                     config={"gate_metric": metric} if metric else {},
                                     lineage=lineage)
    return _store(meta, onnx_bytes, reference, registry or Registry(settings.registry_dir), promote)


# -- retraining --------------------------------------------------------------------------------
def not_retrainable(meta: ModelMetadata) -> str | None:
    """Why ``modelloop retrain`` cannot train a challenger for ``meta``'s line, or None. (An
    ensemble in production is retrained member by member, each asked here; a member that is an
    ensemble itself is not.)"""
    ensemble = meta.lineage.get("ensemble")
    if isinstance(ensemble, dict):
        members = ", ".join(f"v{v}" for v in ensemble.get("members", []))
        return (f"it is an ensemble of {members} inside another ensemble: retrain its members, "
                "then build both ensembles again with modelloop ensemble")
    source = meta.lineage.get("source")
    if source == SOURCE_ONNX:
        return ("it was registered from an ONNX file (modelloop models import): there are no "
                "weights or architecture to retrain; retrain it where it was made and register "
                "the new file")
    if source == SOURCE_MODULE and meta.lineage.get("input_shape"):
        return ("it is an image module registered through register_module: modelloop retrains "
                "tabular modules only; run your own pipeline as the model's retraining command")
    ref = meta.config.get("architecture") if meta.config else None
    if source == SOURCE_MODULE and not ref:
        return ("it was registered from a module without its constructor arguments "
                "(register_module(..., init_kwargs=...)), so its architecture cannot be rebuilt")
    if ref and ":" in ref:  # a user's class or an installed plugin's: is it there?
        try:
            import_architecture(ref)
        except ValueError as exc:
            return f"{exc} (install the package that defines it where the job runs)"
    return None
