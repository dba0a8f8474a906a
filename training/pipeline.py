"""Train, evaluate, export, check and register a model: the one path every caller takes.

``modelloop train``, the demo and the retraining job all call :func:`train_and_register` (or its
two halves, :func:`train_model`, which touches nothing on disk, and :func:`register_trained`);
how to train is one :class:`TrainOptions`::

    meta = train_and_register("breast_cancer", name="cancer", options=TrainOptions(settings=settings),
                              registry=Registry(settings.registry_dir), promote=True)

    # a retraining job: the champion's config on new data, same classes, lineage recorded
    champion = registry.get("cancer", "production").metadata
    trained = train_model(frame, name="cancer", options=TrainOptions(
        config=TrainingConfig.model_validate(champion.config),
        class_labels=champion.class_labels, parent_version=champion.version))

Metrics are measured on the test split with the *exported* ONNX model, so they describe what is
served; the reference sample's predictions come from it too.

Data with categorical features (text columns, or ``TrainingConfig.categorical``) trains the same
way; its graph takes the values' raw strings (:func:`training.export.add_categorical_prologue`),
the parity check feeds them (:func:`categorical_feed`) and the reference sample keeps them::

    trained = train_model(churn_frame(1200, seed=0), name="churn", options=TrainOptions(
        config=TrainingConfig.from_settings(settings, target="churned", epochs=6)))
    trained.metadata.categories  # {"plan": ["basic", "family", "plus", "pro"], ...}
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pandas as pd
import torch
from pydantic import ValidationError
from rich.console import Console

from modelloop.categorical import feeds
from modelloop.registry import Registry
from modelloop.schemas import (
    CATEGORIES_INPUT,
    INPUT_NAME,
    REF_LABEL,
    REF_PREDICTION,
    REF_PROBA_PREFIX,
    REF_SPLIT,
    ModelMetadata,
    ParityResult,
    Task,
    TensorSpec,
)
from training.config import TrainingConfig, resolve_gate_metric
from training.data import (
    BUILTINS,
    DataError,
    Split,
    TabularDataset,
    decode,
    encode,
    load_data,
    prepare,
    raw_features,
    split_dataset,
)
from training.evaluate import confusion_matrix_png
from training.export import (
    Feed,
    Mismatch,
    ParityError,
    add_categorical_prologue,
    check_parity,
    export_onnx,
    onnx_session,
    run_onnx,
)
from training.models import InferenceGraph, TabularNet, build_model, get_architecture
from training.settings import TrainingSettings
from training.trainer import (
    EpochStats,
    FitResult,
    Loss,
    balanced_class_weights,
    cpu_threads,
    fit,
    resolve_device,
    seeded,
    weighted_cross_entropy,
)

if TYPE_CHECKING:
    from training.transfer import WarmStart

log = logging.getLogger(__name__)

CONFUSION_MATRIX_PNG = "confusion_matrix.png"
HISTORY_JSON = "history.json"
WEIGHTS_FILE = "weights.pt"  # the PyTorch state dict: what fine-tuning starts from
REFERENCE_ROWS = "reference_rows"
"""Lineage key: the dataset indices of the reference sample's rows, in its order (what a step
deriving a version from this one reads instead of choosing them again: :mod:`training.measure`)."""

Data: TypeAlias = TabularDataset | pd.DataFrame | str | Path


@dataclass
class TrainedModel:
    """A trained, exported and checked model that is not registered yet."""

    metadata: ModelMetadata
    """Complete but for the version number, which the registry assigns."""
    onnx_bytes: bytes
    reference: pd.DataFrame
    artifacts: dict[str, bytes]
    net: TabularNet
    """The PyTorch model (CPU, eval mode)."""
    dataset: TabularDataset
    split: Split
    fit: FitResult

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The exported model's output for raw features (probabilities, predictions or anomaly
        scores); dataset rows are laid out as the model's input first (an image model's)."""
        x = self.net.layout(np.asarray(features, dtype=np.float32))
        return run_onnx(onnx_session(self.onnx_bytes), x)[self.net.output_name]


def _where(source: str) -> str:
    """A data file as an absolute path (the retraining job reads it again, from any working
    directory or in a pod mounting the same path); a built-in name or other source as it is."""
    path = Path(source)
    return str(path.resolve()) if source not in BUILTINS and path.is_file() else source


def _dataset(data: Data, config: TrainingConfig, class_labels: Sequence[str] | None) -> TabularDataset:
    if isinstance(data, TabularDataset):
        return data
    if isinstance(data, pd.DataFrame):
        return prepare(data, config.target, task=config.task, class_labels=class_labels,
                       clean=config.clean, categorical=config.categorical)
    return load_data(data, config.target, task=config.task, class_labels=class_labels,
                     clean=config.clean, categorical=config.categorical)


def subsample(rows: np.ndarray, at_most: int, seed: int) -> np.ndarray:
    """At most ``at_most`` of ``rows``, a seeded choice, sorted (the reference sample's rows)."""
    if len(rows) <= at_most:
        return np.sort(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, size=at_most, replace=False))


def _reference(ds: TabularDataset, task: Task, rows: np.ndarray, features: np.ndarray,
               outputs: np.ndarray) -> pd.DataFrame:
    """Training ``rows``: the features monitoring sees, true label (class index or value; 0,
    normal, for an anomaly detector) and the exported model's outputs (predicted class index and
    probabilities, the prediction, or the anomaly score)."""
    frame = pd.DataFrame(features, columns=ds.feature_names)
    for name, values in ds.categories.items():  # drift compares the strings serving sees
        frame[name] = decode(frame[name].to_numpy(), values)
    frame[REF_LABEL] = ds.target[rows] if task is not Task.anomaly else np.zeros(len(rows), np.int64)
    return with_outputs(frame, task, outputs)


def with_outputs(reference: pd.DataFrame, task: Task, outputs: np.ndarray) -> pd.DataFrame:
    """``reference`` with its prediction (and probability) columns set from a model's
    ``outputs`` (in place; returned)."""
    if task is Task.classification:
        reference[REF_PREDICTION] = outputs.argmax(axis=1).astype(np.int64)
        for i in range(outputs.shape[1]):
            reference[f"{REF_PROBA_PREFIX}{i}"] = outputs[:, i].astype(np.float64)
    else:
        reference[REF_PREDICTION] = outputs.reshape(-1).astype(np.float64)
    return reference


@dataclass(frozen=True)
class TrainOptions:
    """How :func:`train_model` trains: everything but the data and the model's name."""

    config: TrainingConfig | None = None
    """``TrainingConfig.from_settings(settings)`` when None."""
    settings: TrainingSettings = field(default_factory=TrainingSettings)
    class_labels: Sequence[str] | None = None
    """The classes and their order (pass the champion's when retraining)."""
    parent_version: int | None = None
    lineage: Mapping[str, Any] | None = None
    """Recorded in the version, beside what training adds (data report, reference rows)."""
    init: WarmStart | None = None
    """Start from a registered version's weights instead of random ones (fine-tuning,
    :mod:`training.transfer`)."""
    progress: bool | None = None
    """Show a progress bar; ``settings.progress`` when None."""
    console: Console | None = None
    on_epoch: Callable[[EpochStats], None] | None = None
    """Sees each epoch's losses."""
    on_stage: Callable[[str], None] | None = None
    """Told when a stage after training starts (for a CLI to show)."""

def train_model(data: Data, *, name: str, options: TrainOptions | None = None) -> TrainedModel:
    """Load and split ``data``, train, export to ONNX, check parity, evaluate on the test split.

    ``data`` is a built-in dataset name, a CSV/Parquet path, a DataFrame (with the config's
    ``target``) or a :class:`TabularDataset`; ``options`` says how (:class:`TrainOptions`,
    defaults when None). Raises ``DataError`` for unusable data, ``TrainingError`` when
    training diverges and ``ParityError`` when the export is not faithful.
    """
    options = options or TrainOptions()
    with cpu_threads(options.settings.threads):
        return _train_model(data, name, options)


@dataclass
class Fitted:
    """A trained PyTorch model (CPU, eval mode, calibrated) and how it came to be."""

    net: TabularNet
    dataset: TabularDataset
    split: Split
    config: TrainingConfig
    """Complete: resolved task and target, every architecture parameter."""
    fit: FitResult


def model_task(architecture: str, ds: TabularDataset) -> Task:
    """The task a model of ``architecture`` learns from ``ds``: an anomaly detector learns the
    features (labels unused), anything else the dataset's target."""
    arch = get_architecture(architecture)
    return Task.anomaly if arch.tasks == {Task.anomaly} else ds.task


def fit_model(
    ds: TabularDataset,
    config: TrainingConfig,
    settings: TrainingSettings,
    *,
    init: WarmStart | None = None,
    progress: bool | None = None,
    console: Console | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> Fitted:
    """Split ``ds``, build the model (or start from ``init``'s weights), train and calibrate it:
    everything before the export. The hyperparameter search runs trials with it."""
    if config.task is not None and config.task not in (ds.task, Task.anomaly):
        raise DataError(f"{ds.source}: holds {ds.task.value} data but the config asks for "
                        f"{config.task.value}")
    arch = get_architecture(config.architecture)
    layouts = {2: "rows of features", 3: "sequences [rows, time, features]"}
    wanted = 3 if arch.data == "sequence" else 2
    if ds.features.ndim != wanted:
        raise DataError(f"{ds.source}: architecture {arch.name!r} trains on {layouts[wanted]}; "
                        f"the data holds {layouts.get(ds.features.ndim, 'something else')}")
    task = model_task(config.architecture, ds)
    try:
        params = arch.params.model_validate(config.model)
    except ValidationError as exc:
        raise DataError(f"{ds.source}: invalid parameters of architecture {arch.name!r}: "
                        + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                    for e in exc.errors())) from exc
    # the stored config is complete: resolved task, target, every architecture parameter and
    # whether the table was cleaned (what reloading the data must repeat)
    try:  # and the gate's metric: the one asked, else the setting's (a regressor's r2)
        gate_metric = resolve_gate_metric(config.gate_metric, task, settings.retrain_metric)
    except ValueError as exc:
        raise DataError(f"{ds.source}: --gate-metric {exc}") from exc
    config = config.model_copy(update={"task": task, "target": ds.target_name,
                                       "model": params.model_dump(mode="json"),
                                       "clean": ds.report.cleaned if ds.report else config.clean,
                                       "gate_metric": gate_metric})
    if init is not None:
        init.check(config, ds.feature_names,
                   ds.class_labels if task is Task.classification else None, ds.categories)
    split = split_dataset(ds, val_fraction=config.val_fraction,
                          test_fraction=config.test_fraction, seed=config.seed)
    log.info("%s: %d rows, %d features%s; split %d train / %d validation / %d test", ds.source,
             len(ds), ds.n_features,
             f", {len(ds.class_labels)} classes" if ds.class_labels else "",
             len(split.train), len(split.val), len(split.test))

    device = resolve_device(settings.device)
    n_outputs = len(ds.class_labels) if ds.class_labels and task is Task.classification else 1
    x_train, y_train = ds.features[split.train], ds.target[split.train]
    with seeded(config.weights_seed):
        try:
            net = build_model(config.architecture, params, train_features=x_train, task=task,
                              n_outputs=n_outputs, train_target=y_train,
                              categorical={ds.feature_names.index(f): len(v)
                                           for f, v in ds.categories.items()},
                              min_category_count=config.min_category_count)
        except ValueError as exc:  # the data does not fit the architecture (e.g. image size)
            raise DataError(f"{ds.source}: {exc}") from exc
    if init is not None:
        init.apply(net)
    loss: Loss = net.loss
    if config.class_weight == "balanced" and task is Task.classification:
        weights = balanced_class_weights(y_train, n_outputs)
        log.info("class weights (balanced): %s", ", ".join(f"{w:.3g}" for w in weights.tolist()))
        loss = weighted_cross_entropy(weights)
    result = fit(
        net, loss,
        (torch.from_numpy(net.layout(x_train)), net.encode_target(y_train)),
        (torch.from_numpy(net.layout(ds.features[split.val])), net.encode_target(ds.target[split.val])),
        config, device=device,
        progress=settings.progress if progress is None else progress,
        console=console, on_epoch=on_epoch,
    )
    net = net.cpu().eval()
    net.calibrate(net.layout(ds.features[split.val]), ds.target[split.val])
    return Fitted(net, ds, split, config, result)


def _train_model(data: Data, name: str, options: TrainOptions) -> TrainedModel:
    settings, stage = options.settings, options.on_stage or (lambda _: None)
    config = options.config or TrainingConfig.from_settings(settings)
    ds = _dataset(data, config, options.class_labels)
    fitted = fit_model(ds, config, settings, init=options.init, progress=options.progress,
                       console=options.console, on_epoch=options.on_epoch)
    net, split, config, result = fitted.net, fitted.split, fitted.config, fitted.fit
    task = net.task

    stage("exporting to ONNX and checking parity with PyTorch")
    graph = InferenceGraph(net)
    inputs, outputs = net.io_specs()
    x_test = net.layout(ds.features[split.test])
    onnx_bytes = export_onnx(graph, n_features=ds.n_features, input_shape=inputs[0].shape,
                             output_names=[o.name for o in outputs], example=x_test)
    if ds.categories:
        onnx_bytes = add_categorical_prologue(onnx_bytes, ds.feature_names, ds.categories)
        inputs = categorical_inputs(ds.feature_names, ds.categories)
        parity = _check_parity(graph, onnx_bytes, [categorical_parity_rows(ds, split.test)],
                               settings, feed=categorical_feed(ds.feature_names, ds.categories))
    else:
        parity = _check_parity(graph, onnx_bytes,
                               net.parity_inputs(net.layout(_parity_rows(ds.features[split.test]))),
                               settings)

    stage("evaluating the exported model on the test split")
    session = onnx_session(onnx_bytes, settings.threads)
    x_eval, y_eval = net.evaluation_set(x_test, ds.target[split.test], config.seed)
    test_out = run_onnx(session, model_inputs(ds, x_eval))[net.output_name]
    evaluation = net.evaluate(y_eval, test_out, ds.class_labels)
    log.info("test metrics: %s", ", ".join(f"{k} {v:.4f}" for k, v in evaluation.metrics.items()))

    # training rows for drift; a classifier's held-out rows too, marked, so the sidecar can
    # calibrate its accuracy estimate on rows the model did not fit
    ref_rows = subsample(split.train, settings.reference_rows, config.seed)
    held_out = (subsample(np.concatenate([split.val, split.test]), settings.reference_rows,
                           config.seed) if task is Task.classification else ref_rows[:0])
    rows = np.concatenate([ref_rows, held_out])
    ref_out = run_onnx(session, model_inputs(ds, net.layout(ds.features[rows])))[net.output_name]
    reference = _reference(ds, task, rows, net.monitored_features(ds.features[rows]), ref_out)
    reference[REF_SPLIT] = np.where(np.arange(len(rows)) < len(ref_rows), "train", "holdout")

    weights = io.BytesIO()
    torch.save(net.state_dict(), weights)
    artifacts = {HISTORY_JSON: json.dumps([vars(h) for h in result.history], indent=1).encode(),
                 WEIGHTS_FILE: weights.getvalue()}
    details = dict(evaluation.details)
    if task is Task.classification and ds.class_labels is not None:
        cm = details["confusion_matrix"]
        artifacts[CONFUSION_MATRIX_PNG] = confusion_matrix_png(
            cm["matrix"], cm["labels"], title=f"{name}: test split ({len(split.test)} rows)")
    details.update({
        "split": "test",
        "split_rows": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "training": result.summary(),
    })
    lineage = dict(options.lineage or {})
    lineage[REFERENCE_ROWS] = rows.tolist()
    if ds.report is not None:
        lineage["data_report"] = ds.report.to_dict()
    if options.init is not None:
        lineage["fine_tuned_from"] = options.init.describe()
    metadata = ModelMetadata(
        name=name, task=task, architecture=config.architecture,
        inputs=inputs, outputs=outputs, feature_names=ds.feature_names,
        class_labels=ds.class_labels if task is Task.classification else None,
        metrics=evaluation.metrics, evaluation=details,
        data_fingerprint=ds.fingerprint, dataset=_where(ds.source), parent_version=options.parent_version,
        parity=parity, config=config.model_dump(mode="json"), lineage=lineage,
        categories=ds.categories,
    )
    return TrainedModel(metadata, onnx_bytes, reference, artifacts, net, ds, split, result)


def _check_parity(graph: InferenceGraph, onnx_bytes: bytes, holdouts: Sequence[np.ndarray],
                  settings: TrainingSettings, feed: Feed | None = None) -> ParityResult:
    """:func:`check_parity` on each held-out set (a sequence model's come in several lengths);
    one ParityError lists the mismatches of all of them."""
    results: list[ParityResult] = []
    mismatches: list[Mismatch] = []
    for held in holdouts:
        try:
            results.append(check_parity(graph, onnx_bytes, held, tolerance=settings.parity_tolerance,
                                        batch_sizes=settings.parity_batch_sizes,
                                        max_rows=settings.parity_rows, threads=settings.threads,
                                        feed=feed))
        except ParityError as exc:
            mismatches.extend(exc.mismatches)
    if mismatches:
        raise ParityError(mismatches, settings.parity_tolerance)
    first = results[0]
    return first.model_copy(update={"max_abs_diff": max(r.max_abs_diff for r in results),
                                    "rows_checked": sum(r.rows_checked for r in results)})


def _parity_rows(x: np.ndarray) -> np.ndarray:
    """Copies of a held-out row with one feature missing each (so imputation is checked too),
    then the held-out rows; first, so a cap on the rows checked keeps them."""
    probes = np.repeat(x[:1], x.shape[1], axis=0)
    probes[np.arange(x.shape[1]), np.arange(x.shape[1])] = np.nan
    return np.concatenate([probes, x]) if len(x) else x


# -- categorical features -------------------------------------------------------------------------
UNSEEN_PROBE = "<a value training never saw>"
"""A value no vocabulary holds, in the parity probes: the graph must code it 0 as Python does."""


def _view(feature_names: Sequence[str], categories: Mapping[str, Sequence[str]]) -> ModelMetadata:
    # what modelloop.categorical reads of a version (its names and vocabularies), before there
    # is a version to read them from
    return ModelMetadata.model_construct(feature_names=list(feature_names),
                                         categories={k: list(v) for k, v in categories.items()})


def categorical_inputs(feature_names: Sequence[str],
                       categories: Mapping[str, Sequence[str]]) -> list[TensorSpec]:
    """The graph inputs of a model with categorical features (modelloop/categorical.py)."""
    n_cat = sum(1 for f in feature_names if f in categories)
    return [TensorSpec(name=INPUT_NAME, dtype="float32", shape=[None, len(feature_names) - n_cat]),
            TensorSpec(name=CATEGORIES_INPUT, dtype="string", shape=[None, n_cat])]


def code_rows(rows: np.ndarray, feature_names: Sequence[str],
              categories: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Object rows (strings in the categorical positions) as the float32 matrix the PyTorch
    model takes: each value's code in ``categories`` (0 unknown or missing), computed in Python
    apart from the graph's ``LabelEncoder``."""
    out = np.empty(rows.shape, dtype=np.float32)
    for j, name in enumerate(feature_names):
        if name in categories:
            out[:, j] = encode(rows[:, j], categories[name])
        else:
            out[:, j] = np.asarray([np.nan if v is None else v for v in rows[:, j]], np.float32)
    return out


def categorical_feed(feature_names: Sequence[str], categories: Mapping[str, Sequence[str]]) -> Feed:
    """The parity check's feed: raw strings to the graph, Python's codes to PyTorch."""
    view = _view(feature_names, categories)
    return lambda rows: (feeds(view, rows), code_rows(rows, feature_names, categories))


def categorical_parity_rows(ds: TabularDataset, rows: np.ndarray) -> np.ndarray:
    """Held-out object rows, after probes: a held-out row with each feature missing in turn,
    then with each categorical feature an unseen value (both must take the unknown code)."""
    raw = raw_features(_parity_rows(ds.features[rows]), ds.feature_names, ds.categories)
    if len(rows) == 0:
        return raw
    unseen = np.repeat(raw[len(ds.feature_names):][:1], len(ds.categories), axis=0)
    for k, name in enumerate(ds.categories):
        unseen[k, ds.feature_names.index(name)] = UNSEEN_PROBE
    return np.concatenate([unseen, raw])


def model_inputs(ds: TabularDataset, x: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
    """What the exported graph of a model trained on ``ds`` takes for the rows ``x`` of its
    feature matrix: ``x`` itself, or the graph's two inputs with the values' raw strings."""
    if not ds.categories:
        return x
    return feeds(_view(ds.feature_names, ds.categories),
                 raw_features(x, ds.feature_names, ds.categories))


def frame_feeds(meta: ModelMetadata, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """The graph inputs of ``meta``'s model for ``rows`` (a frame with its feature columns: a
    reference sample, labelled production rows): the float32 ``input``, and for a model with
    categorical features their raw strings beside it (``modelloop.categorical.feeds``; a missing
    value, None or NaN, is fed as missing)."""
    if not meta.categories:
        return {INPUT_NAME: rows[meta.feature_names].to_numpy(np.float32)}
    return feeds(meta, object_rows(meta, rows))


def object_rows(meta: ModelMetadata, rows: pd.DataFrame) -> np.ndarray:
    """``rows``' feature columns as object rows (modelloop/categorical.py): floats (NaN
    missing), and strings (None missing) in the categorical columns."""
    out = rows[meta.feature_names].to_numpy(object)
    for j, name in enumerate(meta.feature_names):
        if name in meta.categories:
            out[:, j] = [v if isinstance(v, str) and v else None for v in out[:, j]]
        else:
            out[:, j] = pd.to_numeric(rows[name], errors="coerce").to_numpy(np.float64)
    return out


def register_trained(trained: TrainedModel, registry: Registry, *, promote: bool = False) -> ModelMetadata:
    """Store ``trained`` as a new version (and make it production when ``promote``)."""
    meta = registry.register(trained.metadata, trained.onnx_bytes, reference=trained.reference,
                             artifacts=trained.artifacts)
    log.info("registered %s v%d under %s", meta.name, meta.version, registry.root)
    if promote:
        registry.promote(meta.name, meta.version)
        log.info("promoted %s v%d to production", meta.name, meta.version)
    return meta


def train_and_register(data: Data, *, name: str, options: TrainOptions | None = None,
                       registry: Registry | None = None, promote: bool = False) -> ModelMetadata:
    """:func:`train_model` then :func:`register_trained`; returns the registered metadata.

    ``registry`` defaults to the one under the settings' ``registry_dir``
    ($MODELLOOP_HOME/registry).
    """
    options = options or TrainOptions()
    trained = train_model(data, name=name, options=options)
    return register_trained(trained, registry or Registry(options.settings.registry_dir),
                            promote=promote)
