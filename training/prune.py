"""Pruning of a registered MLP with ``torch.nn.utils.prune``: fine-tuned, measured, registered, gated.

:func:`prune_version` takes a registered version of the ``mlp`` architecture, loads its stored
weights (``weights.pt``, as :class:`training.transfer.WarmStart` does) and reloads the data it
was trained on (checked against its fingerprint, as quantization does). Then:

* **unstructured** (the default): ``prune.global_unstructured`` with the L1 norm sets the
  ``amount`` smallest weights of all the linear layers together to zero; the masks stay on during
  a short fine-tune and are then made permanent (``prune.remove``). The exported graph keeps its
  shapes: the dense ONNX file is as large and as fast as its parent's, only sparser.
* **structured**: ``prune.ln_structured`` (L2 norm of each unit's incoming weights) picks the
  ``amount`` weakest hidden units of each hidden layer; a **smaller MLP** is built with the kept
  rows of each layer (and of its batch norm) and the kept columns of the next layer copied, then
  fine-tuned and exported: fewer weights, a smaller file, fewer multiply-adds.

The pruned model is exported, checked for parity with PyTorch, and run with its parent on the
**test split the parent's metrics were measured on** (the task's primary metric, file sizes and
ONNX Runtime rows/s on one thread at batch 1 and 256: the helpers of :mod:`training.quantize`).
It becomes a new version (``parent_version`` the source, lineage ``{"trigger": "prune",
"pruning": {...}}``) promotable only when the primary metric drops by at most
``MODELLOOP_TRAINING_PRUNE_MAX_LOSS``; ``modelloop models promote`` refuses it otherwise::

    pruned = prune_version(registry.get("cancer", "production"), amount=0.5, structured=True)
    meta, promoted, reason = register_pruned(pruned, registry, promote=True)
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import onnx
import pandas as pd
import torch
from torch import nn
from torch.nn.utils import prune

from modelloop.registry import ModelVersion, Registry, RegistryError
from modelloop.schemas import ModelMetadata, Task
from training.config import TrainingConfig
from training.data import split_dataset
from training.evaluate import confusion_matrix_png
from training.export import check_parity, export_onnx, onnx_session, run_onnx
from training.measure import evaluate_outputs, evaluation_set, kept_lineage, reference_with_outputs
from training.models import MLP, InferenceGraph, MLPParams, TabularNet, build_model
from training.pipeline import CONFUSION_MATRIX_PNG, HISTORY_JSON, WEIGHTS_FILE
from training.quantize import (
    SPEED_BATCHES,
    SPEED_THREADS,
    compare_speed,
    is_promotable,
    loss_points,
    primary_metric,
    register_gated,
    training_data,
    weight_bytes,
)
from training.settings import TrainingSettings
from training.trainer import (
    Loss,
    balanced_class_weights,
    cpu_threads,
    fit,
    seeded,
    weighted_cross_entropy,
)
from training.transfer import TransferError, WarmStart

log = logging.getLogger(__name__)

FINE_TUNE_EPOCHS = 20
"""Epochs of the fine-tune after pruning (early stopping on the validation loss still applies)."""


class NotPrunable(TransferError):
    """This version cannot be pruned: not an MLP, no stored weights, its data cannot be reloaded,
    or it is pruned already. The caller's input is the problem."""


@dataclass(frozen=True)
class PruningReport:
    """What was measured: the parent against the pruned model on the test split
    (``lineage.pruning``)."""

    source_version: int
    amount: float
    structured: bool
    metric: str
    parent_metrics: dict[str, float]
    pruned_metrics: dict[str, float]
    loss_points: float
    max_loss_points: float
    promotable: bool
    hidden: dict[str, list[int]]
    """Hidden widths: ``{"parent": [64, 32], "pruned": [32, 16]}``."""
    zero_weights: dict[str, float]
    """Share of the linear layers' weights that are zero, parent and pruned."""
    rows_per_s: dict[str, dict[int, float]]
    """``{"parent": {batch: rows/s}, "pruned": {...}}``, one thread."""
    bytes: dict[str, int]
    weight_bytes: dict[str, int]
    fine_tune_epochs: int

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k != "rows_per_s"}
        data["rows_per_s"] = {k: {str(b): r for b, r in v.items()} for k, v in self.rows_per_s.items()}
        data["threads"] = SPEED_THREADS
        return data


def verdict(report: PruningReport) -> str:
    """One line: the primary metric before and after, and the loss against the allowed one."""
    change = (f"loses {report.loss_points:.2f} points" if report.loss_points > 1e-9 else
              f"gains {-report.loss_points:.2f} points" if report.loss_points < -1e-9 else
              "is unchanged")
    return (f"{report.metric} {report.parent_metrics[report.metric]:.4f} -> "
            f"{report.pruned_metrics[report.metric]:.4f} {change} (a loss of at most "
            f"{report.max_loss_points:.2f} allowed: MODELLOOP_TRAINING_PRUNE_MAX_LOSS)")


@dataclass
class PrunedModel:
    """A pruned model that is not registered yet (as :class:`training.pipeline.TrainedModel`)."""

    metadata: ModelMetadata
    onnx_bytes: bytes
    reference: pd.DataFrame | None
    artifacts: dict[str, bytes]
    report: PruningReport


# -- the network ---------------------------------------------------------------------------------
def linear_layers(mlp: nn.Module) -> list[nn.Linear]:
    return [m for m in mlp.modules() if isinstance(m, nn.Linear)]


def zero_share(mlp: nn.Module) -> float:
    """Share of the linear layers' weights (biases aside) that are exactly zero."""
    weights = [m.weight.detach() for m in linear_layers(mlp)]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


def prune_unstructured(mlp: MLP, amount: float) -> None:
    """Zero the ``amount`` smallest weights (L1) of all the linear layers together; the masks
    stay attached (re-applied on every forward) until :func:`make_permanent`."""
    prune.global_unstructured([(m, "weight") for m in linear_layers(mlp)],
                              pruning_method=prune.L1Unstructured, amount=amount)


def make_permanent(mlp: nn.Module) -> None:
    for m in linear_layers(mlp):
        if prune.is_pruned(m):
            prune.remove(m, "weight")


def kept_units(linear: nn.Linear, amount: float) -> torch.Tensor:
    """Indices of the hidden units of ``linear`` that ``prune.ln_structured`` (L2 norm of each
    unit's incoming weights) keeps, at least one; ``linear`` is left as it was."""
    probe = nn.Linear(linear.in_features, linear.out_features)
    probe.weight.data.copy_(linear.weight.detach())
    n_pruned = min(round(amount * linear.out_features), linear.out_features - 1)
    prune.ln_structured(probe, "weight", amount=n_pruned, n=2, dim=0)
    mask = probe.get_buffer("weight_mask")
    return torch.nonzero(mask.sum(dim=1) > 0).flatten()


def shrink_mlp(mlp: MLP, params: MLPParams, amount: float) -> tuple[MLP, MLPParams]:
    """A smaller MLP holding the kept hidden units of ``mlp`` (:func:`kept_units` per hidden
    layer): each hidden layer's kept rows and batch-norm entries, the next layer's kept columns."""
    linears = linear_layers(mlp)
    keep = [kept_units(lin, amount) for lin in linears[:-1]]
    small_params = params.model_copy(update={"hidden": [len(k) for k in keep]})
    small = MLP(linears[0].in_features, linears[-1].out_features, small_params)
    norms = [m for m in mlp.layers if isinstance(m, nn.BatchNorm1d)]
    small_norms = [m for m in small.layers if isinstance(m, nn.BatchNorm1d)]
    with torch.no_grad():
        for i, (old, new) in enumerate(zip(linears, linear_layers(small), strict=True)):
            rows = keep[i] if i < len(keep) else torch.arange(old.out_features)
            cols = keep[i - 1] if i > 0 else torch.arange(old.in_features)
            new.weight.copy_(old.weight[rows][:, cols])
            new.bias.copy_(old.bias[rows])
        for old_bn, new_bn, rows in zip(norms, small_norms, keep, strict=True):
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(new_bn, name).copy_(getattr(old_bn, name)[rows])
            if new_bn.num_batches_tracked is not None and old_bn.num_batches_tracked is not None:
                new_bn.num_batches_tracked.copy_(old_bn.num_batches_tracked)
    return small, small_params


# -- the whole step ------------------------------------------------------------------------------
def _parent_net(version: ModelVersion, config: TrainingConfig, x_train: np.ndarray,
                y_train: np.ndarray) -> TabularNet:
    meta = version.metadata
    try:
        init = WarmStart.from_version(version)
    except TransferError as exc:
        raise NotPrunable(str(exc)) from exc
    n_outputs = len(meta.class_labels) if meta.task is Task.classification and meta.class_labels else 1
    params = MLPParams.model_validate(config.model)
    with seeded(config.seed):
        net = build_model("mlp", params, train_features=x_train, task=meta.task,
                          n_outputs=n_outputs, train_target=y_train)
    net.load_state_dict(init.state)
    return net.eval()


def _check_prunable(meta: ModelMetadata, amount: float) -> None:
    label = f"{meta.name} v{meta.version}"
    if meta.architecture != "mlp":
        raise NotPrunable(f"{label} is a {meta.architecture!r} model; pruning takes the 'mlp' "
                          "architecture only")
    if meta.categories:
        raise NotPrunable(f"{label} takes categorical features; pruning takes models with "
                          "numeric inputs only")
    if not 0.0 < amount < 1.0:
        raise NotPrunable(f"--amount {amount}: the share of weights to prune is between 0 and 1")
    if "pruning" in meta.lineage or "quantization" in meta.lineage:
        kind = "pruned" if "pruning" in meta.lineage else "int8"
        raise NotPrunable(f"{label} is {kind} already; prune the version it came from")


def prune_version(
    version: ModelVersion,
    *,
    amount: float = 0.5,
    structured: bool = False,
    settings: TrainingSettings | None = None,
    epochs: int = FINE_TUNE_EPOCHS,
    speed_repeats: int = 5,
    speed_min_time_s: float = 0.1,
) -> PrunedModel:
    """Prune ``version`` (an MLP), fine-tune, export and measure it against its parent (see the
    module docstring). Raises :class:`NotPrunable` for a version that cannot be pruned."""
    settings = settings or TrainingSettings()
    meta = version.metadata
    _check_prunable(meta, amount)
    config = TrainingConfig.model_validate(meta.config)
    ds = training_data(meta)
    split = split_dataset(ds, val_fraction=config.val_fraction,
                          test_fraction=config.test_fraction, seed=config.seed)
    x_train, y_train = ds.features[split.train], ds.target[split.train]
    with cpu_threads(settings.threads):
        net = _parent_net(version, config, x_train, y_train)
        assert isinstance(net.backbone, MLP)
        parent_zeros = zero_share(net.backbone)
        params = MLPParams.model_validate(config.model)
        if structured:
            net.backbone, params = shrink_mlp(net.backbone, params, amount)
        else:
            prune_unstructured(net.backbone, amount)
        tune = config.model_copy(update={"epochs": epochs, "model": params.model_dump(mode="json")})
        objective: Loss = net.loss
        if config.class_weight == "balanced" and meta.task is Task.classification:
            # the parent's loss, so the fine-tune keeps its trade-off of precision and recall
            objective = weighted_cross_entropy(balanced_class_weights(y_train, net.n_outputs))
        result = fit(net, objective,
                     (torch.from_numpy(x_train), net.encode_target(y_train)),
                     (torch.from_numpy(ds.features[split.val]), net.encode_target(ds.target[split.val])),
                     tune, progress=False)
        net = net.cpu().eval()
        make_permanent(net.backbone)
        graph = InferenceGraph(net)
        x_test = ds.features[split.test]
        outputs = [o.name for o in meta.outputs]
        pruned = export_onnx(graph, n_features=meta.n_features, output_names=outputs,
                             example=x_test)
        parity = check_parity(graph, pruned, x_test, tolerance=settings.parity_tolerance,
                              batch_sizes=settings.parity_batch_sizes,
                              max_rows=settings.parity_rows, threads=settings.threads)

    parent = version.onnx_path.read_bytes()
    x_eval, y_eval = evaluation_set(meta, config, x_test, ds.target[split.test])
    output = outputs[0]
    session = onnx_session(pruned, settings.threads)
    ev_parent = evaluate_outputs(meta, y_eval, run_onnx(onnx_session(parent, settings.threads), x_eval)[output])
    ev_pruned = evaluate_outputs(meta, y_eval, run_onnx(session, x_eval)[output])
    metric = primary_metric(meta.task)
    loss = loss_points(ev_parent.metrics[metric], ev_pruned.metrics[metric])
    report = PruningReport(
        source_version=meta.version, amount=amount, structured=structured, metric=metric,
        parent_metrics=ev_parent.metrics, pruned_metrics=ev_pruned.metrics, loss_points=loss,
        max_loss_points=settings.prune_max_loss * 100.0,
        promotable=is_promotable(loss, settings.prune_max_loss),
        hidden={"parent": list(MLPParams.model_validate(config.model).hidden),
                "pruned": list(params.hidden)},
        zero_weights={"parent": parent_zeros, "pruned": zero_share(net.backbone)},
        rows_per_s=compare_speed({"parent": parent, "pruned": pruned}, x_eval, SPEED_BATCHES,
                                 repeats=speed_repeats, min_time_s=speed_min_time_s),
        bytes={"parent": len(parent), "pruned": len(pruned)},
        weight_bytes={"parent": weight_bytes(onnx.load_from_string(parent)),
                      "pruned": weight_bytes(onnx.load_from_string(pruned))},
        fine_tune_epochs=len(result.history),
    )
    log.info("%s v%d pruned: %s", meta.name, meta.version, verdict(report))

    reference = None
    with contextlib.suppress(RegistryError):  # a version registered without one
        reference = version.reference()
    if reference is not None:
        ref_out = run_onnx(session, reference[meta.feature_names].to_numpy(np.float32))[output]
        reference = reference_with_outputs(reference, meta.task, ref_out)

    weights = io.BytesIO()
    torch.save(net.state_dict(), weights)
    artifacts = {WEIGHTS_FILE: weights.getvalue(),
                 HISTORY_JSON: json.dumps([vars(h) for h in result.history], indent=1).encode()}
    cm = ev_pruned.details.get("confusion_matrix")
    if cm is not None:
        artifacts[CONFUSION_MATRIX_PNG] = confusion_matrix_png(
            cm["matrix"], cm["labels"], title=f"{meta.name} pruned: test split ({len(split.test)} rows)")
    metadata = meta.model_copy(deep=True, update={
        "version": 0, "created_at": datetime.now(UTC), "parent_version": meta.version,
        "metrics": ev_pruned.metrics, "evaluation": {**meta.evaluation, **ev_pruned.details},
        "parity": parity, "config": tune.model_copy(update={"epochs": config.epochs}).model_dump(mode="json"),
        "lineage": {"trigger": "prune", **kept_lineage(meta), "pruning": report.to_json()},
    })
    return PrunedModel(metadata, pruned, reference, artifacts, report)


def register_pruned(pruned: PrunedModel, registry: Registry, *,
                    promote: bool = False) -> tuple[ModelMetadata, bool, str]:
    """Register ``pruned`` as a new version; with ``promote``, make it production (through the
    registry's checked promotion) only when it is promotable. Returns the metadata, whether it
    was promoted and why (not)."""
    return register_gated(registry, pruned.metadata, pruned.onnx_bytes,
                          reference=pruned.reference, artifacts=pruned.artifacts, promote=promote,
                          promotable=pruned.report.promotable, line=verdict(pruned.report))
