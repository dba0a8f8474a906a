"""Train, evaluate, export, check and register a model: the one path every caller takes.

``modelloop train``, the demo and the retraining job all call :func:`train_and_register` (or its
two halves, :func:`train_model`, which touches nothing on disk, and :func:`register_trained`)::

    meta = train_and_register("breast_cancer", name="cancer", settings=TrainingSettings(),
                              registry=Registry(settings.registry_dir), promote=True)

    # a retraining job: the champion's config on new data, same classes, lineage recorded
    champion = registry.get("cancer", "production").metadata
    trained = train_model(frame, name="cancer", config=TrainingConfig.model_validate(champion.config),
                          class_labels=champion.class_labels, parent_version=champion.version)

Metrics are measured on the test split with the *exported* ONNX model, so they describe what is
served; the reference sample's predictions come from it too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import torch
from rich.console import Console

from modelloop.registry import Registry
from modelloop.schemas import (
    REF_LABEL,
    REF_PREDICTION,
    REF_PROBA_PREFIX,
    ModelMetadata,
    Task,
)
from training.config import TrainingConfig
from training.data import DataError, Split, TabularDataset, load_data, prepare, split_dataset
from training.evaluate import confusion_matrix_png, evaluate
from training.export import check_parity, export_onnx, onnx_session, run_onnx
from training.models import InferenceGraph, TabularNet, build_model, get_architecture
from training.settings import TrainingSettings
from training.trainer import EpochStats, FitResult, cpu_threads, fit, resolve_device, seeded

log = logging.getLogger(__name__)

CONFUSION_MATRIX_PNG = "confusion_matrix.png"
HISTORY_JSON = "history.json"

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
        """The exported model's output for raw features (probabilities or predictions)."""
        return run_onnx(onnx_session(self.onnx_bytes), features)[self.net.output_name]


def _dataset(data: Data, config: TrainingConfig, class_labels: Sequence[str] | None) -> TabularDataset:
    if isinstance(data, TabularDataset):
        return data
    if isinstance(data, pd.DataFrame):
        return prepare(data, config.target, task=config.task, class_labels=class_labels)
    return load_data(data, config.target, task=config.task, class_labels=class_labels)


def _reference(ds: TabularDataset, rows: np.ndarray, outputs: np.ndarray) -> pd.DataFrame:
    """Training ``rows``: raw features, true label (class index or value) and the exported
    model's outputs (predicted class index and probabilities, or the prediction)."""
    frame = pd.DataFrame(ds.features[rows], columns=ds.feature_names)
    frame[REF_LABEL] = ds.target[rows]
    if ds.task is Task.classification:
        frame[REF_PREDICTION] = outputs.argmax(axis=1).astype(np.int64)
        for i in range(outputs.shape[1]):
            frame[f"{REF_PROBA_PREFIX}{i}"] = outputs[:, i].astype(np.float64)
    else:
        frame[REF_PREDICTION] = outputs.reshape(-1).astype(np.float64)
    return frame


def train_model(
    data: Data,
    *,
    name: str,
    config: TrainingConfig | None = None,
    settings: TrainingSettings | None = None,
    class_labels: Sequence[str] | None = None,
    parent_version: int | None = None,
    lineage: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    console: Console | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> TrainedModel:
    """Load and split ``data``, train, export to ONNX, check parity, evaluate on the test split.

    ``data`` is a built-in dataset name, a CSV/Parquet path, a DataFrame (with ``config.target``)
    or a :class:`TabularDataset`. ``config`` defaults to ``TrainingConfig.from_settings``;
    ``class_labels`` fixes the classes and their order (pass the champion's when retraining).
    ``on_epoch`` sees each epoch's losses; ``on_stage`` is told when a stage after training
    starts (for a CLI to show). Raises ``DataError`` for unusable data, ``TrainingError`` when
    training diverges and ``ParityError`` when the export is not faithful.
    """
    settings = settings or TrainingSettings()
    with cpu_threads(settings.threads):
        return _train_model(data, name=name, config=config, settings=settings,
                            class_labels=class_labels, parent_version=parent_version,
                            lineage=lineage, progress=progress, console=console,
                            on_epoch=on_epoch, stage=on_stage or (lambda _: None))


def _train_model(
    data: Data,
    *,
    name: str,
    config: TrainingConfig | None,
    settings: TrainingSettings,
    class_labels: Sequence[str] | None,
    parent_version: int | None,
    lineage: Mapping[str, Any] | None,
    progress: bool | None,
    console: Console | None,
    on_epoch: Callable[[EpochStats], None] | None,
    stage: Callable[[str], None],
) -> TrainedModel:
    config = config or TrainingConfig.from_settings(settings)
    ds = _dataset(data, config, class_labels)
    if config.task is not None and config.task is not ds.task:
        raise DataError(f"{ds.source}: holds {ds.task.value} data but the config asks for "
                        f"{config.task.value}")
    arch = get_architecture(config.architecture)
    params = arch.params.model_validate(config.model)
    # the stored config is complete: resolved task, target and every architecture parameter
    config = config.model_copy(update={"task": ds.task, "target": ds.target_name,
                                       "model": params.model_dump(mode="json")})
    split = split_dataset(ds, val_fraction=config.val_fraction,
                          test_fraction=config.test_fraction, seed=config.seed)
    log.info("%s: %d rows, %d features%s; split %d train / %d validation / %d test", ds.source,
             len(ds), ds.n_features,
             f", {len(ds.class_labels)} classes" if ds.class_labels else "",
             len(split.train), len(split.val), len(split.test))

    device = resolve_device(settings.device)
    n_outputs = len(ds.class_labels) if ds.class_labels else 1
    x_train, y_train = ds.features[split.train], ds.target[split.train]
    with seeded(config.seed):
        net = build_model(config.architecture, params, train_features=x_train, task=ds.task,
                          n_outputs=n_outputs, train_target=y_train)
    result = fit(
        net, net.loss,
        (torch.from_numpy(x_train), net.encode_target(y_train)),
        (torch.from_numpy(ds.features[split.val]), net.encode_target(ds.target[split.val])),
        config, device=device,
        progress=settings.progress if progress is None else progress,
        console=console, on_epoch=on_epoch,
    )
    net = net.cpu().eval()

    stage("exporting to ONNX and checking parity with PyTorch")
    graph = InferenceGraph(net)
    inputs, outputs = net.io_specs()
    x_test = ds.features[split.test]
    onnx_bytes = export_onnx(graph, n_features=ds.n_features,
                             output_names=[o.name for o in outputs], example=x_test)
    parity = check_parity(graph, onnx_bytes, _parity_rows(x_test),
                          tolerance=settings.parity_tolerance,
                          batch_sizes=settings.parity_batch_sizes, max_rows=settings.parity_rows,
                          threads=settings.threads)

    stage("evaluating the exported model on the test split")
    session = onnx_session(onnx_bytes, settings.threads)
    test_out = run_onnx(session, x_test)[net.output_name]
    evaluation = evaluate(ds.task, ds.target[split.test], test_out, ds.class_labels)
    log.info("test metrics: %s", ", ".join(f"{k} {v:.4f}" for k, v in evaluation.metrics.items()))

    ref_rows = split.train
    if len(ref_rows) > settings.reference_rows:
        rng = np.random.default_rng(config.seed)
        ref_rows = np.sort(rng.choice(ref_rows, size=settings.reference_rows, replace=False))
    reference = _reference(ds, ref_rows, run_onnx(session, ds.features[ref_rows])[net.output_name])

    artifacts = {HISTORY_JSON: json.dumps([vars(h) for h in result.history], indent=1).encode()}
    details = dict(evaluation.details)
    if ds.class_labels is not None:
        cm = details["confusion_matrix"]
        artifacts[CONFUSION_MATRIX_PNG] = confusion_matrix_png(
            cm["matrix"], cm["labels"], title=f"{name}: test split ({len(split.test)} rows)")
    details.update({
        "split": "test",
        "split_rows": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "training": result.summary(),
    })
    metadata = ModelMetadata(
        name=name, task=ds.task, architecture=config.architecture,
        inputs=inputs, outputs=outputs, feature_names=ds.feature_names,
        class_labels=ds.class_labels, metrics=evaluation.metrics, evaluation=details,
        data_fingerprint=ds.fingerprint, dataset=ds.source, parent_version=parent_version,
        parity=parity, config=config.model_dump(mode="json"), lineage=dict(lineage or {}),
    )
    return TrainedModel(metadata, onnx_bytes, reference, artifacts, net, ds, split, result)


def _parity_rows(x: np.ndarray) -> np.ndarray:
    """Copies of a held-out row with one feature missing each (so imputation is checked too),
    then the held-out rows; first, so a cap on the rows checked keeps them."""
    probes = np.repeat(x[:1], x.shape[1], axis=0)
    probes[np.arange(x.shape[1]), np.arange(x.shape[1])] = np.nan
    return np.concatenate([probes, x]) if len(x) else x


def register_trained(trained: TrainedModel, registry: Registry, *, promote: bool = False) -> ModelMetadata:
    """Store ``trained`` as a new version (and make it production when ``promote``)."""
    meta = registry.register(trained.metadata, trained.onnx_bytes, reference=trained.reference,
                             artifacts=trained.artifacts)
    log.info("registered %s v%d under %s", meta.name, meta.version, registry.root)
    if promote:
        registry.promote(meta.name, meta.version)
        log.info("promoted %s v%d to production", meta.name, meta.version)
    return meta


def train_and_register(
    data: Data,
    *,
    name: str,
    config: TrainingConfig | None = None,
    settings: TrainingSettings | None = None,
    registry: Registry | None = None,
    promote: bool = False,
    parent_version: int | None = None,
    lineage: Mapping[str, Any] | None = None,
    class_labels: Sequence[str] | None = None,
    progress: bool | None = None,
    console: Console | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> ModelMetadata:
    """:func:`train_model` then :func:`register_trained`; returns the registered metadata.

    ``registry`` defaults to the one under ``settings.registry_dir`` ($MODELLOOP_HOME/registry).
    """
    settings = settings or TrainingSettings()
    trained = train_model(data, name=name, config=config, settings=settings,
                          class_labels=class_labels, parent_version=parent_version,
                          lineage=lineage, progress=progress, console=console,
                          on_stage=on_stage)
    return register_trained(trained, registry or Registry(settings.registry_dir), promote=promote)
