"""Ensembles of registered classifiers: one ONNX graph, checked, measured, registered, gated.

:func:`build_ensemble` takes registered versions of one model line (the members) and builds
**one ONNX graph** that runs them all on the shared ``input`` and combines their
``probabilities`` (the graph conventions of :mod:`modelloop.schemas`, so serving, batch scoring
and the sidecar take the ensemble as any version). Each member's nodes, edges and initializers
are renamed with a prefix (``m0_``, ``m1_``, ...; ``onnx.compose.add_prefix``) and one
combination follows (``--method``):

* **mean**: the mean of the members' probabilities.
* **weighted**: their weighted mean, each member weighing its accuracy on the **validation
  split** (never the test split the ensemble is judged on), the weights normalised to sum to 1.
* **vote**: each member votes for its most probable class (``ArgMax`` then ``OneHot``); the
  output is ``(votes + 0.5 * mean) / (members + 0.5)``, a distribution whose most probable class
  is the majority, ties going to the class of the higher mean probability.

The members must be classifiers of the same features and classes trained on the same data
(``data_fingerprint``) **with the same split** (seed and fractions): the ensemble is measured on
the members' common test split, which none of them trained on. Members therefore differ by their
architecture, hyperparameters or ``init_seed`` (the seed of the weights alone: ``modelloop train
--ensemble K`` trains K members with seed, seed+1, ...), not by ``seed``, which also seeds the split.

Parity: the graph is run in ONNX Runtime against the members run separately (each its own
session, combined in NumPy) at the export's batch sizes, within ``parity_tolerance``. The
ensemble becomes a new version (``parent_version`` the best member, lineage ``{"trigger":
"ensemble", "ensemble": {...}}``), **promotable** only when its accuracy on the test split is at
least the best member's plus ``MODELLOOP_TRAINING_ENSEMBLE_MARGIN`` (0.0: a tie is enough).

Retraining (``modelloop retrain`` of an ensemble in production) retrains each member on the job's
data, from its own configuration and weights, and :func:`rebuild_ensemble` combines the new
members as the champion combined its own (method and weights) into a challenger that the
retraining gate judges as any other::

    members = [registry.get("digits", v) for v in (3, 5, 7)]
    built = build_ensemble(members, method="mean", settings=settings)
    meta, promoted, reason = register_ensemble(built, registry, promote=True)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import numpy as np
import onnx
import pandas as pd
from onnx import TensorProto, compose, helper

from modelloop.registry import ModelVersion, Registry, RegistryError
from modelloop.schemas import PROBABILITIES, ModelMetadata, ParityResult, Task
from training.config import TrainingConfig
from training.data import DataError, split_dataset
from training.export import check_conventions, onnx_session, run_onnx
from training.measure import evaluate_outputs, kept_lineage, reference_with_outputs
from training.pipeline import TrainedModel, register_trained
from training.quantize import register_gated, training_data
from training.settings import TrainingSettings

VOTE_TIE_WEIGHT = 0.5
"""Weight of the mean probability beside the votes in ``vote``: below 1, so it only breaks ties."""
SPLIT_KEYS = ("seed", "val_fraction", "test_fraction", "clean")


class NotEnsemblable(DataError):
    """These versions cannot make an ensemble: fewer than two, not classifiers, or different
    features, classes, data or split. The caller's input is the problem."""


class Method(StrEnum):
    mean = "mean"
    vote = "vote"
    weighted = "weighted"


@dataclass(frozen=True)
class EnsembleReport:
    """What was measured on the common test split (``lineage.ensemble``)."""

    members: list[int]
    method: str
    weights: list[float]
    metric: str
    member_metrics: dict[int, float]
    ensemble_metric: float
    best_member: int
    gain_points: float
    margin_points: float
    promotable: bool

    def to_json(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["member_metrics"] = {str(k): v for k, v in self.member_metrics.items()}
        data["source_version"] = self.best_member
        return data


@dataclass
class Ensemble:
    """An ensemble that is not registered yet (as :class:`training.pipeline.TrainedModel`)."""

    metadata: ModelMetadata
    onnx_bytes: bytes
    reference: pd.DataFrame | None
    report: EnsembleReport


def verdict(report: EnsembleReport) -> str:
    """One line: the ensemble's metric against the best member's and the margin asked for."""
    best = report.member_metrics[report.best_member]
    return (f"{report.metric} {report.ensemble_metric:.4f} against the best member's "
            f"(v{report.best_member}) {best:.4f}: {report.gain_points:+.2f} points (at least "
            f"{report.margin_points:+.2f} asked: MODELLOOP_TRAINING_ENSEMBLE_MARGIN)")


# -- the combination: NumPy (the reference) and ONNX (the graph) ---------------------------------
def combine(probabilities: Sequence[np.ndarray], method: Method | str,
            weights: Sequence[float]) -> np.ndarray:
    """The ensemble's probabilities from its members' (what the graph computes)."""
    stack = np.stack([p.astype(np.float64) for p in probabilities])
    mean = stack.mean(axis=0)
    if Method(method) is Method.weighted:
        return np.tensordot(np.asarray(weights, np.float64), stack, axes=1).astype(np.float32)
    if Method(method) is Method.vote:
        votes = np.zeros_like(mean)
        for p in stack:
            votes[np.arange(len(p)), p.argmax(axis=1)] += 1.0
        return ((votes + VOTE_TIE_WEIGHT * mean) / (len(stack) + VOTE_TIE_WEIGHT)).astype(np.float32)
    return mean.astype(np.float32)


def _const(name: str, value: Any, dtype: Any = np.float32) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name,
                            value=onnx.numpy_helper.from_array(np.asarray(value, dtype), name))


def _combination(outputs: list[str], method: Method, weights: Sequence[float],
                 n_classes: int) -> list[onnx.NodeProto]:
    k = len(outputs)
    nodes = [helper.make_node("Sum", outputs, ["ens_sum"], name="ens_sum"),
             _const("ens_k", float(k)),
             helper.make_node("Div", ["ens_sum", "ens_k"],
                              [PROBABILITIES if method is Method.mean else "ens_mean"], name="ens_mean")]
    if method is Method.weighted:
        nodes = [_const(f"ens_w{i}", w) for i, w in enumerate(weights)]
        nodes += [helper.make_node("Mul", [o, f"ens_w{i}"], [f"ens_wp{i}"], name=f"ens_wp{i}")
                  for i, o in enumerate(outputs)]
        nodes.append(helper.make_node("Sum", [f"ens_wp{i}" for i in range(k)], [PROBABILITIES],
                                      name="ens_weighted"))
    elif method is Method.vote:
        nodes += [_const("ens_depth", n_classes, np.int64), _const("ens_onoff", [0.0, 1.0]),
                  _const("ens_tie", VOTE_TIE_WEIGHT), _const("ens_total", k + VOTE_TIE_WEIGHT)]
        for i, o in enumerate(outputs):
            nodes += [helper.make_node("ArgMax", [o], [f"ens_arg{i}"], axis=1, keepdims=0,
                                       name=f"ens_arg{i}"),
                      helper.make_node("OneHot", [f"ens_arg{i}", "ens_depth", "ens_onoff"],
                                       [f"ens_vote{i}"], axis=-1, name=f"ens_vote{i}")]
        nodes += [helper.make_node("Sum", [f"ens_vote{i}" for i in range(k)], ["ens_votes"],
                                   name="ens_votes"),
                  helper.make_node("Mul", ["ens_mean", "ens_tie"], ["ens_tied"], name="ens_tied"),
                  helper.make_node("Add", ["ens_votes", "ens_tied"], ["ens_score"], name="ens_score"),
                  helper.make_node("Div", ["ens_score", "ens_total"], [PROBABILITIES], name="ens_vote")]
    return nodes


def ensemble_graph(members: Sequence[bytes], method: Method | str, weights: Sequence[float],
                   n_classes: int, n_features: int,
                   input_shape: Sequence[int | None] | None = None) -> bytes:
    """One ONNX model running ``members`` (ONNX bytes with the conventions' ``input`` and
    ``probabilities``) on one shared input and combining their probabilities."""
    method = Method(method)
    models = [compose.add_prefix(onnx.load_from_string(m), f"m{i}_", rename_inputs=False)
              for i, m in enumerate(members)]
    first = models[0]
    outputs = [f"m{i}_{PROBABILITIES}" for i in range(len(models))]
    nodes = [n for m in models for n in m.graph.node]
    nodes += _combination(outputs, method, weights, n_classes)
    graph = helper.make_graph(
        nodes, "ensemble", [first.graph.input[0]],
        [helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", n_classes])],
        initializer=[i for m in models for i in m.graph.initializer],
        value_info=[v for m in models for v in m.graph.value_info])
    opsets: dict[str, int] = {}
    for m in models:
        for op in m.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              functions=[f for m in models for f in m.functions],
                              producer_name="modelloop-ensemble")
    model.ir_version = max(m.ir_version for m in models)
    onnx.checker.check_model(model)
    check_conventions(model, n_features=n_features, output_names=[PROBABILITIES],
                      input_shape=input_shape)
    return model.SerializeToString()


# -- the members ---------------------------------------------------------------------------------
def check_members(members: Sequence[ModelVersion]) -> None:
    """Refuse (one line) a member set that cannot make an ensemble measured on a common test split."""
    if len(members) < 2:
        raise NotEnsemblable("an ensemble needs at least two members")
    first = members[0].metadata
    labels = [f"v{m.metadata.version}" for m in members]
    if len(set(labels)) < len(labels):
        raise NotEnsemblable(f"a member is listed twice: {', '.join(labels)}")
    split0 = {k: first.config.get(k) for k in SPLIT_KEYS}
    for m in members:
        meta = m.metadata
        label = f"{meta.name} v{meta.version}"
        if meta.task is not Task.classification:
            raise NotEnsemblable(f"{label} is a {meta.task.value} model; an ensemble combines "
                                 "classifiers' probabilities")
        if "ensemble" in meta.lineage:
            raise NotEnsemblable(f"{label} is an ensemble already; list its members instead")
        if meta.categories:
            raise NotEnsemblable(f"{label} takes categorical features; an ensemble combines "
                                 "models with numeric inputs only")
        for what, mine, theirs in (("features", meta.feature_names, first.feature_names),
                                   ("classes", meta.class_labels, first.class_labels),
                                   ("training data", meta.data_fingerprint, first.data_fingerprint)):
            if mine != theirs:
                raise NotEnsemblable(f"{label} has other {what} than {first.name} "
                                     f"v{first.version}; members share features, classes and data")
        split = {k: meta.config.get(k) for k in SPLIT_KEYS}
        if split != split0:
            raise NotEnsemblable(f"{label} was split otherwise ({split}) than v{first.version} "
                                 f"({split0}); members share their split so that none trained "
                                 "on the ensemble's test split")


def _weights(method: Method, val_accuracy: Sequence[float]) -> list[float]:
    if method is Method.weighted:
        total = float(sum(val_accuracy))
        return [float(a) / total for a in val_accuracy]
    return [1.0 / len(val_accuracy)] * len(val_accuracy)


def _parity(ensemble: bytes, members: Sequence[bytes], method: Method, weights: Sequence[float],
            x: np.ndarray, settings: TrainingSettings) -> ParityResult:
    session = onnx_session(ensemble, settings.threads)
    sessions = [onnx_session(m, settings.threads) for m in members]
    worst = 0.0
    for batch in settings.parity_batch_sizes:
        got = run_onnx(session, x, batch)[PROBABILITIES]
        expected = combine([run_onnx(s, x, batch)[PROBABILITIES] for s in sessions], method, weights)
        worst = max(worst, float(np.abs(got.astype(np.float64) - expected).max()))
    return ParityResult(passed=worst <= settings.parity_tolerance, max_abs_diff=worst,
                        tolerance=settings.parity_tolerance,
                        batch_sizes=list(settings.parity_batch_sizes), rows_checked=len(x))


def build_ensemble(members: Sequence[ModelVersion], *, method: Method | str = Method.mean,
                   settings: TrainingSettings | None = None) -> Ensemble:
    """The ensemble of ``members`` (see the module docstring), measured on their common test
    split. Raises :class:`NotEnsemblable` for a member set that cannot make one."""
    settings = settings or TrainingSettings()
    method = Method(method)
    check_members(members)
    metas = [m.metadata for m in members]
    first = metas[0]
    config = TrainingConfig.model_validate(first.config)
    ds = training_data(first)
    split = split_dataset(ds, val_fraction=config.val_fraction,
                          test_fraction=config.test_fraction, seed=config.seed)
    onnx_members = [m.onnx_path.read_bytes() for m in members]
    sessions = [onnx_session(b, settings.threads) for b in onnx_members]
    x_val, y_val = ds.features[split.val], ds.target[split.val]
    x_test, y_test = ds.features[split.test], ds.target[split.test]
    labels = first.class_labels or []
    metric = "accuracy"
    val_accuracy = [evaluate_outputs(first, y_val, run_onnx(s, x_val)[PROBABILITIES]).metrics[metric]
                    for s in sessions]
    weights = _weights(method, val_accuracy)

    graph = ensemble_graph(onnx_members, method, weights, len(labels), first.n_features,
                           first.inputs[0].shape)
    parity = _parity(graph, onnx_members, method, weights, x_test[:settings.parity_rows], settings)
    if not parity.passed:
        raise RegistryError(f"the ensemble graph strays {parity.max_abs_diff:.3g} from its members "
                            f"run separately (tolerance {parity.tolerance:.0e})")
    session = onnx_session(graph, settings.threads)
    ev = evaluate_outputs(first, y_test, run_onnx(session, x_test)[PROBABILITIES])
    member_metrics = {meta.version: evaluate_outputs(meta, y_test, run_onnx(s, x_test)[PROBABILITIES])
                      .metrics[metric] for meta, s in zip(metas, sessions, strict=True)}
    best = max(member_metrics, key=lambda v: member_metrics[v])
    gain = (ev.metrics[metric] - member_metrics[best]) * 100.0
    margin = settings.ensemble_margin * 100.0
    report = EnsembleReport(
        members=[m.version for m in metas], method=method.value, weights=weights, metric=metric,
        member_metrics=member_metrics, ensemble_metric=ev.metrics[metric], best_member=best,
        gain_points=gain, margin_points=margin, promotable=gain >= margin - 1e-9)

    best_meta = next(m for m in metas if m.version == best)
    reference = None
    with contextlib.suppress(RegistryError):  # a version registered without one
        reference = next(m for m in members if m.metadata.version == best).reference()
    if reference is not None:
        ref_out = run_onnx(session, reference[first.feature_names].to_numpy(np.float32))[PROBABILITIES]
        reference = reference_with_outputs(reference, first.task, ref_out)
    metadata = best_meta.model_copy(deep=True, update={
        "version": 0, "created_at": datetime.now(UTC),
        "parent_version": best, "architecture": "ensemble", "metrics": ev.metrics,
        "evaluation": {**best_meta.evaluation, **ev.details}, "parity": parity,
        "lineage": {"trigger": "ensemble", **kept_lineage(best_meta),
                    "ensemble": {**report.to_json(), "val_accuracy": val_accuracy}},
    })
    return Ensemble(metadata, graph, reference, report)


def member_configs(config: TrainingConfig, k: int) -> list[TrainingConfig]:
    """``k`` configs of one split (``seed``) whose weights differ: ``init_seed`` seed, seed+1, ..."""
    return [config if i == 0 else config.model_copy(update={"init_seed": config.seed + i})
            for i in range(k)]


def ensemble_of(members: Sequence[ModelMetadata], registry: Registry, settings: TrainingSettings,
                *, promote: bool = False) -> tuple[ModelMetadata, bool, str]:
    """The mean ensemble of the registered ``members`` (``modelloop train --ensemble K``),
    registered and, with ``promote``, promoted when promotable."""
    versions = [registry.get(m.name, m.version) for m in members]
    return register_ensemble(build_ensemble(versions, settings=settings), registry, promote=promote)


def register_ensemble(ensemble: Ensemble, registry: Registry, *,
                      promote: bool = False) -> tuple[ModelMetadata, bool, str]:
    """Register ``ensemble``; with ``promote``, make it production (the registry's checked
    promotion) only when it is promotable. Returns the metadata, whether it was promoted and why."""
    return register_gated(registry, ensemble.metadata, ensemble.onnx_bytes,
                          reference=ensemble.reference, artifacts=None, promote=promote,
                          promotable=ensemble.report.promotable, line=verdict(ensemble.report))


def ensemble_members(version: ModelVersion, registry: Registry) -> list[ModelVersion]:
    """The registered members of an ensemble ``version`` (its lineage names them); [] for a
    version that is not an ensemble."""
    spec = version.metadata.lineage.get("ensemble")
    if not isinstance(spec, dict):
        return []
    return [registry.get(version.name, v) for v in spec["members"]]


def rebuild_ensemble(champion: ModelVersion, members: Sequence[TrainedModel], registry: Registry,
                     settings: TrainingSettings) -> TrainedModel:
    """The challenger of the ensemble ``champion`` from its retrained ``members`` (trained on one
    frame with one split, in the order of the champion's members): the members are registered
    (not promoted), combined by the champion's method and weights (a weighted ensemble keeps the
    weights its members earned on validation rows when it was built) into one graph, checked for
    parity against them and measured on their common test split. Its parity passes only when the
    members' exports passed theirs too. Not registered: the retraining gate decides."""
    spec = champion.metadata.lineage["ensemble"]
    method, weights = Method(spec["method"]), [float(w) for w in spec["weights"]]
    registered = [register_trained(m, registry) for m in members]
    first, meta = members[0], registered[0]
    onnx_members = [m.onnx_bytes for m in members]
    graph = ensemble_graph(onnx_members, method, weights, len(meta.class_labels or []),
                           meta.n_features, meta.inputs[0].shape)
    x_test, y_test = first.dataset.features[first.split.test], first.dataset.target[first.split.test]
    parity = _parity(graph, onnx_members, method, weights, x_test[:settings.parity_rows], settings)
    members_passed = all(m.parity is not None and m.parity.passed for m in registered)
    session = onnx_session(graph, settings.threads)
    ev = evaluate_outputs(meta, y_test, run_onnx(session, x_test)[PROBABILITIES])
    reference = reference_with_outputs(first.reference, meta.task, run_onnx(
        session, first.reference[meta.feature_names].to_numpy(np.float32))[PROBABILITIES])
    lineage = {k: v for k, v in first.metadata.lineage.items() if k != "fine_tuned_from"}
    metadata = meta.model_copy(deep=True, update={
        "version": 0, "created_at": datetime.now(UTC), "parent_version": champion.version,
        "architecture": "ensemble", "metrics": ev.metrics,
        "evaluation": {**meta.evaluation, **ev.details},
        "parity": parity.model_copy(update={"passed": parity.passed and members_passed}),
        "lineage": {**lineage, "ensemble": {
            "members": [m.version for m in registered], "method": method.value, "weights": weights,
            "retrained_from": list(spec["members"]),
            "member_metrics": {str(m.version): m.metrics.get("accuracy") for m in registered}}},
    })
    return dataclasses.replace(first, metadata=metadata, onnx_bytes=graph, reference=reference,
                               artifacts={})
