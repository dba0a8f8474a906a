"""The champion/challenger gate for a challenger made elsewhere (``modelloop models gate``).

A model modelloop did not train (an ONNX file registered with ``modelloop models register``) is
retrained by its owner's own pipeline, which registers the new file without promoting it and
then asks this gate. The gate is the one ``modelloop retrain`` applies (:func:`compare` and
:func:`decide` of :mod:`training.retrain`): champion and challenger are scored on the same
labelled production rows from the sidecar, and the challenger is promoted, through the
registry's checked promotion, only when it beats the champion by the margin and is not slower.

The holdout is the most recent ``retrain_holdout_fraction`` of the labelled rows in the window,
or every labelled row from ``since`` on: the challenger must not have been trained on them. The
check on the trusted rows of the original training data does not apply: modelloop does not know
the data an outside model was built from.
"""

from __future__ import annotations

import logging
import time

from modelloop.registry import ModelVersion, Registry
from modelloop.schemas import ALIAS_PRODUCTION
from training.retrain import (
    RetrainError,
    RetrainResult,
    check_production_data,
    compare,
    decide,
    fetch_labelled,
    gate_metric,
    pair_sessions,
    split_recent,
)
from training.settings import TrainingSettings

log = logging.getLogger(__name__)


def check_comparable(champion: ModelVersion, challenger: ModelVersion) -> None:
    """Refuse a challenger that does not answer the champion's question: another task, other
    features (names and order) or other classes (names and order)."""
    a, b = champion.metadata, challenger.metadata
    if b.version == a.version:
        raise RetrainError(f"{a.name} v{b.version} is production already: nothing to gate")
    for what, mine, theirs in (("task", a.task, b.task),
                               ("features", a.feature_names, b.feature_names),
                               ("class labels", a.class_labels, b.class_labels)):
        if mine != theirs:
            raise RetrainError(f"{a.name} v{b.version} cannot challenge v{a.version}: its {what} "
                               f"{theirs} are not the champion's {mine}")


def gate(
    name: str,
    version: int,
    *,
    settings: TrainingSettings,
    registry: Registry,
    sidecar_url: str,
    since: float | None = None,
    now: float | None = None,
    metric: str | None = None,
) -> RetrainResult:
    """Judge registered ``version`` of ``name`` against production on the sidecar's labelled
    rows and promote it only when it wins (see the module docstring). ``since``: the holdout is
    every labelled row from this time on (default: the most recent share of the window);
    ``metric``: over the champion's stored gate metric
    (:func:`~training.retrain.gate_metric`)."""
    now = time.time() if now is None else now
    champion = registry.get(name, ALIAS_PRODUCTION)
    challenger = registry.get(name, version)
    check_comparable(champion, challenger)
    meta = champion.metadata
    metric, metric_source = gate_metric(meta, settings, metric)
    window_start = now - settings.retrain_window_s if settings.retrain_window_s > 0 else 0.0
    key = settings.sidecar_key.get_secret_value() if settings.sidecar_key else None
    rows = fetch_labelled(sidecar_url, name, since=window_start if since is None else since,
                          limit=settings.retrain_max_rows, key=key)
    if since is None:
        check_production_data(rows, champion, min_rows=settings.retrain_min_rows,
                              min_class_share=settings.retrain_min_class_share)
        _, holdout = split_recent(rows, settings.retrain_holdout_fraction)
    else:  # as many rows at least as the holdout of the smallest window retrain accepts
        holdout = rows
        check_production_data(holdout, champion, min_rows=max(1, round(
            settings.retrain_min_rows * settings.retrain_holdout_fraction)),
            min_class_share=settings.retrain_min_class_share)
    champ, chall = compare(champion, pair_sessions(champion, challenger.onnx_path.read_bytes()),
                           holdout, metric=metric)
    chall.version = challenger.version
    parity = challenger.metadata.parity  # None for an ONNX file: it passed its batch-size check
    promote, reason = decide(champ, chall, parity_ok=parity is None or parity.passed,
                             margin=settings.retrain_margin,
                             latency_tolerance=settings.retrain_latency_tolerance, metric=metric)
    if promote:
        registry.promote(name, challenger.version)  # checked: BrokenVersion leaves production
    log.info("%s v%d %s: %s", name, challenger.version,
             "promoted" if promote else "kept out of production", reason)
    data = {"window_start": window_start if since is None else since, "window_end": now,
            "production_rows": len(rows), "holdout_rows": len(holdout),
            "holdout_start": float(holdout["timestamp"].min()),
            "holdout": "recent" if since is None else "since", "original_check": None}
    return RetrainResult(model=name, promoted=promote, reason=reason, metric=metric,
                         margin=settings.retrain_margin, champion=champ, challenger=chall,
                         data=data, metric_source=metric_source)
