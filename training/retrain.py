"""The retraining job: train a challenger on the original data plus labelled production data,
compare it with the champion on the same recent holdout, and promote it only when it is better.

Every trigger (the sidecar's local process, a Kubernetes Job, a container, a person) runs
``modelloop retrain --name MODEL``. The steps, each its own function:

1. :func:`fetch_labelled`: labelled production rows from the sidecar (``GET /labelled``).
2. :func:`check_production_data`: enough rows, the champion's features, more than one class.
3. :func:`split_production`: when the champion's errors changed over the window
   (:func:`find_change`, a CUSUM test at 1%), the holdout is a random share of the rows after the
   change and older rows and the original data are kept in proportion to how little the concept
   moved; otherwise the most recent rows are the holdout (:func:`split_recent`). The rest joins
   the original training data.
4. ``train_model`` with the champion's stored configuration and classes, starting from the
   champion's weights (fine-tuning) unless ``retrain_fine_tune`` is off. An ensemble champion
   retrains each member so (its own configuration and weights), registers them, and the
   challenger is their ensemble (:func:`training.ensemble.rebuild_ensemble`).
5. :func:`compare`: champion and challenger ONNX files on the same holdout (score and latency),
   and :func:`compare_on_original` on the trusted rows of the original data (its first test
   split, which no version trains on): labels no feedback touched, so labels sent to poison the
   line cannot also vouch for the model they made.
6. Register the challenger (with lineage either way); promote only when the gate passes.

Exit codes: 0 the job ran (the JSON says whether it promoted), 2 unusable data or arguments,
3 the challenger failed its export parity check or training diverged, 1 anything else.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd

from modelloop.categorical import is_categorical
from modelloop.registry import ModelVersion, Registry
from modelloop.schemas import ALIAS_CHALLENGER, ALIAS_PRODUCTION, REF_LABEL, ModelMetadata, Task
from training.byo import not_retrainable
from training.config import TrainingConfig, resolve_gate_metric
from training.data import DataError, load_data, split_dataset
from training.ensemble import ensemble_members, rebuild_ensemble
from training.evaluate import evaluate
from training.export import onnx_session
from training.pipeline import (
    TrainedModel,
    TrainOptions,
    frame_feeds,
    object_rows,
    register_trained,
    train_model,
)
from training.settings import TrainingSettings
from training.transfer import TransferError, WarmStart

log = logging.getLogger(__name__)


class RetrainError(Exception):
    """The job cannot go on; the message says why (exit code 2)."""


@dataclass
class Score:
    """One model judged on the holdout."""

    version: int
    metric: float
    metrics: dict[str, float]
    latency_p50_s: float
    """Median time of one single-row ONNX Runtime call."""


@dataclass
class RetrainResult:
    """What the job did; printed as JSON on stdout."""

    model: str
    promoted: bool
    reason: str
    metric: str
    margin: float
    champion: Score
    challenger: Score | None
    data: dict[str, Any]
    metric_source: str = "setting"
    """Where ``metric`` came from (:func:`gate_metric`): ``option``, ``champion`` or
    ``setting``."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fetch_labelled(sidecar_url: str, model: str, *, since: float, limit: int,
                   key: str | None = None, timeout_s: float = 60.0) -> pd.DataFrame:
    """Labelled production rows of ``model`` from the sidecar (with its admin ``key``):
    features in the reference sample's columns, ``_ml_label`` (class index or value),
    ``version`` and ``timestamp``."""
    url = sidecar_url.rstrip("/") + "/export/labelled"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.get(url, params={"model": model, "since": since, "limit": limit},
                         headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise RetrainError(f"cannot reach the sidecar at {url}: {exc}") from exc
    if resp.status_code == 404:
        return pd.DataFrame()
    if resp.status_code in (401, 403):
        raise RetrainError(f"sidecar {url} refused the key ({resp.status_code}): set "
                           "MODELLOOP_TRAINING_SIDECAR_KEY to its MODELLOOP_MONITOR_API_KEY")
    if resp.status_code != 200:
        raise RetrainError(f"sidecar {url} answered {resp.status_code}: {resp.text[:200]}")
    return pd.read_parquet(io.BytesIO(resp.content))


def check_production_data(frame: pd.DataFrame, champion: ModelVersion, *, min_rows: int,
                          min_class_share: float) -> None:
    """Refuse data that cannot make a fair challenger: too few rows, other features, one class."""
    meta = champion.metadata
    if len(frame) < min_rows:
        raise RetrainError(f"only {len(frame)} labelled production rows of {meta.name!r} in the "
                           f"window; at least {min_rows} are needed (retrain_min_rows)")
    missing = [f for f in meta.feature_names if f not in frame.columns]
    if missing:
        raise RetrainError(f"labelled production data lacks the champion's features {missing[:5]}")
    if meta.task is Task.classification:
        counts = frame[REF_LABEL].round().astype(int).value_counts()
        assert meta.class_labels is not None
        bad = [i for i in counts.index if not 0 <= i < len(meta.class_labels)]
        if bad:
            raise RetrainError(f"labels {bad} are not classes of {meta.name!r}")
        if len(counts) < 2:
            raise RetrainError(f"labelled production data holds one class only "
                               f"({meta.class_labels[int(counts.index[0])]!r})")
        share = counts.min() / counts.sum()
        if share < min_class_share:
            rare = meta.class_labels[int(counts.idxmin())]
            raise RetrainError(f"class {rare!r} is {share:.1%} of the labelled production data, "
                               f"below retrain_min_class_share {min_class_share:.1%}")


def gate_metric(meta: ModelMetadata, settings: TrainingSettings,
                override: str | None = None) -> tuple[str, str]:
    """The metric the gate judges champion ``meta`` and its challenger by, and where it came
    from: ``override`` (the command's ``--metric``: ``option``), else the champion's stored one
    (``--gate-metric`` at training: ``champion``), else ``retrain_metric`` (``setting``; r2 for
    a regressor). RetrainError for a metric of the other task."""
    if override:
        metric, source = override, "option"
    elif meta.gate_metric:
        metric, source = meta.gate_metric, "champion"
    else:
        metric, source = (settings.retrain_metric if meta.task is Task.classification
                          else "r2"), "setting"
    try:
        resolve_gate_metric(metric, meta.task, settings.retrain_metric)
    except ValueError as exc:
        given = ("--metric" if source == "option" else
                 f"{meta.name} v{meta.version}'s stored gate metric")
        raise RetrainError(f"{given} {exc}") from exc
    return metric, source


def split_recent(frame: pd.DataFrame, holdout_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Older rows to train on, the most recent ``holdout_fraction`` to judge both models on."""
    ordered = frame.sort_values("timestamp", kind="stable").reset_index(drop=True)
    cut = len(ordered) - max(1, round(len(ordered) * holdout_fraction))
    return ordered.iloc[:cut], ordered.iloc[cut:]


# P(sup |Brownian bridge| > x) = 0.01 (Kolmogorov's distribution)
CUSUM_CRITICAL_1PCT = 1.628


@dataclass
class ChangePoint:
    """Where the champion's errors on the labelled rows (ordered by time) changed."""

    index: int
    """The first row after the change."""
    timestamp: float
    statistic: float
    """max |CUSUM| / (sd * sqrt(n)): above 1.628 a change is called (1% false-alarm rate)."""
    error_before: float
    error_after: float
    moved: float
    """How far the concept moved, 0 (not at all) to 1 (the champion is no better than chance
    after it): old data is kept in proportion to 1 - moved."""


def champion_errors(meta: ModelMetadata, session: ort.InferenceSession,
                    rows: pd.DataFrame) -> np.ndarray:
    """The champion's error on each labelled row (``session`` runs its graph): 0/1 for a
    classifier, the squared error for a regressor (whichever version served the row, the
    champion is judged)."""
    out = session.run(None, frame_feeds(meta, rows))[0]
    y = rows[REF_LABEL].to_numpy(np.float64)
    if meta.task is Task.classification:
        return (np.asarray(out).argmax(axis=1) != y.round()).astype(np.float64)
    return (np.asarray(out, np.float64).reshape(len(y)) - y) ** 2


def find_change(errors: np.ndarray, timestamps: np.ndarray, *, min_segment: int,
                chance_error: float | None) -> ChangePoint | None:
    """The CUSUM change point of the errors' mean, tested against the Brownian bridge's maximum at
    1%; only a change for the worse counts. ``chance_error``: a classifier's error when it
    guesses (1 - 1/classes), which ``moved`` is scaled by; None for a regressor."""
    n = len(errors)
    sd = float(errors.std())
    if n < 2 * min_segment or sd == 0:
        return None
    cusum = np.cumsum(errors - errors.mean())[min_segment - 1:n - min_segment]
    k = int(np.abs(cusum).argmax()) + min_segment
    statistic = float(abs(cusum[k - min_segment]) / (sd * np.sqrt(n)))
    before, after = float(errors[:k].mean()), float(errors[k:].mean())
    if statistic < CUSUM_CRITICAL_1PCT or after <= before:
        return None
    if chance_error is not None:  # the share of the way from the champion's error to chance's
        moved = (after - before) / max(chance_error - before, 1e-12)
    else:  # the share of the error after the change that is new
        moved = (after - before) / after
    return ChangePoint(index=k, timestamp=float(timestamps[k]), statistic=statistic,
                       error_before=before, error_after=after, moved=float(np.clip(moved, 0, 1)))


def split_production(frame: pd.DataFrame, meta: ModelMetadata, session: ort.InferenceSession,
                     *, holdout_fraction: float, detect_change: bool, min_segment: int,
                     seed: int) -> tuple[pd.DataFrame, pd.DataFrame, ChangePoint | None]:
    """Production rows to train on and the holdout. With no change in the champion's errors, the
    most recent ``holdout_fraction`` is the holdout (:func:`split_recent`). After a change, the
    holdout is a random ``holdout_fraction`` of the rows after it (never all of them), and of
    the rows before it only the most recent ``(1 - moved)`` share of as many as train after it
    are kept. ``session`` runs the champion (``meta``)."""
    ordered = frame.sort_values("timestamp", kind="stable").reset_index(drop=True)
    change = None
    if detect_change:
        chance = (1 - 1 / len(meta.class_labels) if meta.task is Task.classification
                  and meta.class_labels else None)
        change = find_change(champion_errors(meta, session, ordered),
                             ordered["timestamp"].to_numpy(np.float64),
                             min_segment=min_segment, chance_error=chance)
    if change is None:
        train, holdout = split_recent(ordered, holdout_fraction)
        return train, holdout, None
    after = ordered.iloc[change.index:]
    holdout = after.sample(n=max(1, round(len(after) * holdout_fraction)), random_state=seed)
    after_train = after.drop(index=holdout.index)
    keep = int(len(after_train) * (1 - change.moved))
    before = ordered.iloc[:change.index]
    before = before.iloc[len(before) - min(keep, len(before)):]
    return pd.concat([before, after_train]), holdout.sort_index(), change


def _latency_p50(session: ort.InferenceSession, row: dict[str, np.ndarray], runs: int) -> float:
    names = [o.name for o in session.get_outputs()]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(names, row)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _metrics(meta: ModelMetadata, sessions: dict[str, ort.InferenceSession],
             x: dict[str, np.ndarray], y: np.ndarray, metric: str) -> dict[str, dict[str, float]]:
    """Each session's metrics on the inputs ``x`` (:func:`~training.pipeline.frame_feeds`) with targets ``y``
    (class indices or values)."""
    if meta.task is Task.classification:
        y = y.round().astype(np.int64)
    outputs = {k: s.run(None, x)[0] for k, s in sessions.items()}
    evals = {k: evaluate(meta.task, y, out, meta.class_labels).metrics for k, out in outputs.items()}
    for m in evals.values():
        if metric not in m:
            raise RetrainError(f"metric {metric!r} is not measured for {meta.task.value} "
                               f"models (have: {', '.join(sorted(m))})")
    return evals


Sessions = dict[str, ort.InferenceSession]
"""``{"champion": ..., "challenger": ...}``: each graph loaded once per job."""


def pair_sessions(champion: ModelVersion | ort.InferenceSession,
                  challenger_onnx: bytes) -> Sessions:
    """One-thread sessions of the champion (a version, or its session already made) and the
    challenger's graph."""
    if isinstance(champion, ModelVersion):
        champion = onnx_session(champion.onnx_path, threads=1)
    return {"champion": champion, "challenger": onnx_session(challenger_onnx, threads=1)}


def compare(champion: ModelVersion, sessions: Sessions, holdout: pd.DataFrame, *,
            metric: str, latency_runs: int = 300) -> tuple[Score, Score]:
    """Score champion and challenger on the same holdout rows and time both, interleaved so
    that a busy machine slows both alike."""
    meta = champion.metadata
    x = frame_feeds(meta, holdout)
    evals = _metrics(meta, sessions, x, holdout[REF_LABEL].to_numpy(), metric)
    row = {k: v[:1] for k, v in x.items()}
    lat: dict[str, list[float]] = {"champion": [], "challenger": []}
    for _ in range(3):
        for k, s in sessions.items():
            lat[k].append(_latency_p50(s, row, latency_runs // 3))
    champ, chall = (
        Score(version=v, metric=evals[k][metric], metrics=evals[k], latency_p50_s=min(lat[k]))
        for k, v in (("champion", meta.version), ("challenger", 0))
    )
    return champ, chall


def compare_on_original(champion: ModelVersion, sessions: Sessions, trusted: pd.DataFrame,
                        *, metric: str, target: str) -> tuple[float, float]:
    """Champion's and challenger's ``metric`` on ``trusted``: rows of the line's original
    training data (labels no feedback touched) that the challenger did not train on."""
    meta = champion.metadata
    x = frame_feeds(meta, trusted)
    if meta.task is Task.classification:
        assert meta.class_labels is not None
        index = {label: i for i, label in enumerate(meta.class_labels)}
        y = trusted[target].astype(str).map(index).to_numpy(np.float64)
    else:
        y = trusted[target].to_numpy(np.float64)
    evals = _metrics(meta, sessions, x, y, metric)
    return evals["champion"][metric], evals["challenger"][metric]


def original_data(champion: ModelVersion, config: TrainingConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The data the model line was first trained on (built-in dataset or file), as frames with
    string labels: the rows a challenger may train on, and the trusted rows, the test split of
    the line's first training (same data, seed and fractions, same split), which no version of
    the line trained on and whose labels no feedback touched."""
    lineage = champion.metadata.lineage
    source = lineage.get("original_dataset", champion.metadata.dataset)
    try:
        ds = load_data(source, config.target, task=config.task, seed=config.seed,
                       rows=lineage.get("dataset_rows"),
                       class_labels=champion.metadata.class_labels, clean=config.clean,
                       categorical=config.categorical)
        split = split_dataset(ds, val_fraction=config.val_fraction,
                              test_fraction=config.test_fraction, seed=config.seed)
    except DataError as exc:
        raise RetrainError(f"original training data {source!r}: {exc}") from exc
    frame = ds.to_frame()
    return frame.drop(index=split.test), frame.iloc[split.test]


def _production_frame(rows: pd.DataFrame, champion: ModelVersion, target: str) -> pd.DataFrame:
    meta = champion.metadata
    if is_categorical(meta):  # the categorical columns stay strings: the challenger codes them
        frame = pd.DataFrame(object_rows(meta, rows), columns=meta.feature_names)
        for name in meta.numeric_features:
            frame[name] = frame[name].astype(np.float32)
    else:
        frame = rows[meta.feature_names].astype(np.float32).copy()
    if meta.task is Task.classification:
        assert meta.class_labels is not None
        labels = np.asarray(meta.class_labels, dtype=object)
        frame[target] = labels[rows[REF_LABEL].round().astype(int).to_numpy()]
    else:
        frame[target] = rows[REF_LABEL].to_numpy(np.float64)
    return frame


def decide(champion: Score, challenger: Score, *, parity_ok: bool, margin: float,
           latency_tolerance: float, metric: str, original: tuple[float, float] | None = None,
           max_original_drop: float = 1.0) -> tuple[bool, str]:
    """The gate: promote only a faithful export that beats the champion by ``margin`` on the
    holdout, loses at most ``max_original_drop`` against it on the trusted rows of the original
    data (``original``: champion's and challenger's metric there), and is at most
    ``1 + latency_tolerance`` times slower. Returns (promote, reason)."""
    gain = challenger.metric - champion.metric
    if not parity_ok:
        return False, "challenger failed its export parity check"
    if gain < margin:
        return False, (f"challenger {metric} {challenger.metric:.4f} does not beat champion "
                       f"{champion.metric:.4f} by the margin {margin:.4f}")
    if original is not None and original[0] - original[1] > max_original_drop:
        return False, (f"held for review: the challenger's {metric} on the original training "
                       f"data is {original[1]:.4f}, {original[0] - original[1]:.4f} below the "
                       f"champion's {original[0]:.4f} (allowed: {max_original_drop:.4f}); the "
                       "production labels contradict the data the model was built from: the "
                       "concept shifted or the labels are wrong. Check them, then promote it by "
                       "hand (modelloop models promote) or raise "
                       "MODELLOOP_TRAINING_RETRAIN_MAX_ORIGINAL_DROP")
    if challenger.latency_p50_s > champion.latency_p50_s * (1 + latency_tolerance):
        return False, (f"challenger latency {challenger.latency_p50_s * 1e6:.0f} us is over "
                       f"champion {champion.latency_p50_s * 1e6:.0f} us x {1 + latency_tolerance:.2f}")
    return True, (f"challenger {metric} {challenger.metric:.4f} beats champion "
                  f"{champion.metric:.4f} by {gain:+.4f} (margin {margin:.4f})")


def retrainable(registry: Registry, name: str) -> tuple[ModelVersion, list[ModelVersion]]:
    """The production version of ``name`` and its ensemble members (an ensemble retrains each),
    or RetrainError when one of them cannot be retrained."""
    champion = registry.get(name, ALIAS_PRODUCTION)
    members = ensemble_members(champion, registry)
    for version in members or [champion]:
        why = not_retrainable(version.metadata)  # an ONNX file's version, a module's, ...
        if why is not None:
            raise RetrainError(f"{name} v{version.version} cannot be retrained: {why}")
    return champion, members


def retrain(
    name: str,
    *,
    settings: TrainingSettings,
    registry: Registry,
    sidecar_url: str,
    trigger: str = "manual",
    now: float | None = None,
    progress: bool = False,
    metric: str | None = None,
) -> RetrainResult:
    """Run the whole job (see the module docstring) and return what it decided. ``metric``
    overrides the champion's gate metric (:func:`gate_metric`)."""
    now = time.time() if now is None else now
    since = now - settings.retrain_window_s if settings.retrain_window_s > 0 else 0.0
    retrainable(registry, name)  # before anything is fetched
    key = settings.sidecar_key.get_secret_value() if settings.sidecar_key else None
    production = fetch_labelled(sidecar_url, name, since=since, limit=settings.retrain_max_rows,
                                key=key)
    return retrain_on(production, name, settings=settings, registry=registry, trigger=trigger,
                      window=(since, now), progress=progress, metric=metric)


def retrain_on(
    production: pd.DataFrame,
    name: str,
    *,
    settings: TrainingSettings,
    registry: Registry,
    trigger: str = "manual",
    window: tuple[float, float] = (0.0, 0.0),
    progress: bool = False,
    metric: str | None = None,
) -> RetrainResult:
    """The job on labelled production rows already fetched (:func:`fetch_labelled`'s frame:
    the features, categorical ones as strings, ``_ml_label``, ``version`` and ``timestamp``);
    ``window``: the time span they were fetched for, recorded in the lineage; ``metric``:
    the command's ``--metric``, over the champion's stored gate metric."""
    since, now = window
    champion, members = retrainable(registry, name)
    meta = champion.metadata
    config = TrainingConfig.model_validate(meta.config)
    metric, metric_source = gate_metric(meta, settings, metric)
    check_production_data(production, champion, min_rows=settings.retrain_min_rows,
                          min_class_share=settings.retrain_min_class_share)
    champion_session = onnx_session(champion.onnx_path, threads=1)
    recent_train, holdout, change = split_production(
        production, meta, champion_session, holdout_fraction=settings.retrain_holdout_fraction,
        detect_change=settings.retrain_detect_change, min_segment=settings.retrain_min_segment,
        seed=config.seed)
    original, trusted = original_data(champion, config)
    cap = int(len(recent_train) * settings.retrain_original_ratio
              * (1 - (change.moved if change else 0.0)))
    if len(original) > cap:
        original = original.sample(n=cap, random_state=config.seed)
    train_frame = pd.concat([original, _production_frame(recent_train, champion, config.target)],
                            ignore_index=True)
    data = {
        "window_start": since, "window_end": now, "production_rows": len(production),
        "production_train_rows": len(recent_train), "holdout_rows": len(holdout),
        "original_rows": len(original), "train_rows": len(train_frame),
        "trusted_rows": len(trusted),
        "holdout_start": float(holdout["timestamp"].min()),
        "change": asdict(change) if change else None,
    }
    if change:
        log.info("the champion's error changed at row %d of %d (%.3f -> %.3f, CUSUM %.2f): "
                 "training on the rows after it, older data kept at %.0f%%", change.index,
                 len(production), change.error_before, change.error_after, change.statistic,
                 100 * (1 - change.moved))
    log.info("retraining %s (champion v%d): %d original + %d production rows, holdout %d",
             name, meta.version, len(original), len(recent_train), len(holdout))

    def challenger_of(version: ModelVersion) -> TrainedModel:
        """``version`` trained again on the job's data: its configuration, from its weights."""
        init: WarmStart | None = None
        if settings.retrain_fine_tune:
            try:
                init = WarmStart.from_version(version)
            except TransferError as exc:
                log.info("training the challenger from scratch: %s", exc)
        options = TrainOptions(
            config=TrainingConfig.model_validate(version.metadata.config), settings=settings,
            init=init, class_labels=meta.class_labels, parent_version=version.version,
            progress=progress,
            lineage={"trigger": trigger, "original_dataset":
                     meta.lineage.get("original_dataset", meta.dataset),
                     "dataset_rows": meta.lineage.get("dataset_rows"), "data_window": data},
        )
        try:
            return train_model(train_frame, name=name, options=options)
        except TransferError as exc:  # e.g. new categorical values: the weights cannot fit
            if init is None:
                raise
            log.info("training the challenger from scratch: %s", exc)
            return train_model(train_frame, name=name, options=replace(options, init=None))

    trained = (rebuild_ensemble(champion, [challenger_of(m) for m in members], registry, settings)
               if members else challenger_of(champion))
    sessions = pair_sessions(champion_session, trained.onnx_bytes)
    champ, chall = compare(champion, sessions, holdout, metric=metric)
    parity_ok = trained.metadata.parity is not None and trained.metadata.parity.passed
    on_original = compare_on_original(champion, sessions, trusted, metric=metric,
                                      target=config.target)
    promote, reason = decide(champ, chall, parity_ok=parity_ok, margin=settings.retrain_margin,
                             latency_tolerance=settings.retrain_latency_tolerance, metric=metric,
                             original=on_original,
                             max_original_drop=settings.retrain_max_original_drop)
    trained.metadata.lineage["gate"] = {
        "metric": metric, "metric_source": metric_source,
        "margin": settings.retrain_margin, "promoted": promote,
        "reason": reason, "champion_version": meta.version, "champion_score": champ.metric,
        "challenger_score": chall.metric, "champion_latency_p50_s": champ.latency_p50_s,
        "challenger_latency_p50_s": chall.latency_p50_s,
        "champion_original_score": on_original[0], "challenger_original_score": on_original[1],
        "max_original_drop": settings.retrain_max_original_drop,
    }
    live = promote and settings.retrain_live_gate
    trained.metadata.lineage["gate"]["live_gate"] = live
    registered = register_trained(trained, registry, promote=promote and not live)
    chall.version = registered.version
    if live:  # the sidecar's live gate promotes it, or retires it (monitoring/live_gate.py)
        registry.set_alias(name, ALIAS_CHALLENGER, registered.version)
        promote, reason = False, (f"{reason}; named {ALIAS_CHALLENGER}: serving shadows it and the "
                                  "sidecar promotes it only if it wins on live labelled requests")
    log.info("%s v%d %s: %s", name, registered.version,
             "promoted" if promote else "kept out of production", reason)
    return RetrainResult(model=name, promoted=promote, reason=reason, metric=metric,
                         margin=settings.retrain_margin, champion=champ, challenger=chall,
                         data=data, metric_source=metric_source)
