"""The periodic check: read the windows from the store, compute drift, quality, latency, errors
and resources (pure functions elsewhere), publish the gauges, then evaluate the policy.

One check at a time (the scheduled one and ``POST /check`` share a lock). Per model: the newest
version seen in the count window is judged for drift (per feature and joint) and data quality
(missing, out of support) against its reference sample; quality is computed for every version in
the window, its accuracy estimate marked unreliable where too many of that version's rows lie
outside its reference's range; latency over the time window. Gauges of things no
longer present (a version that left the window) are removed, not left stale.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, TypedDict

import numpy as np
import pandas as pd
import psutil
from prometheus_client import Gauge

from modelloop.registry import RegistryError
from modelloop.schemas import (
    REF_LABEL,
    REF_PREDICTION,
    REF_PROBA_PREFIX,
    REF_SPLIT,
    ModelMetadata,
    Task,
)
from monitoring.accuracy import (
    DEFAULT_GATE_METRIC,
    ConfidenceCalibration,
    classification_scores,
    gate_score,
    label_lag,
)
from monitoring.data_quality import DataQuality, window_quality
from monitoring.drift import DriftResult, ReferenceProfile, check_drift, stattests
from monitoring.ingest import ModelCatalog
from monitoring.live_gate import Action, LiveGate
from monitoring.metrics import MonitorMetrics
from monitoring.performance import ErrorRate, ErrorRateTracker, latency_quantiles
from monitoring.policy import METRICS, Firing, MetricSpec, Observation, PolicyEngine, Rule
from monitoring.records import window_frame
from monitoring.reports import importance_section, sidecar_section, write_drift_report
from monitoring.resources import (
    CgroupSampler,
    GpuSample,
    GpuSampler,
    ProcessSample,
    ProcessSampler,
)
from monitoring.settings import MonitorSettings
from monitoring.store import EventStore, Retention, Window

log = logging.getLogger(__name__)
MIN_CALIBRATION_ROWS = 50
MIN_GAP_LABELS = 100
"""Labelled rows of the count window needed before the estimate's gap is judged."""


def _lower_priority(nice: int) -> None:
    """Run the report thread at ``nice`` (Linux: per thread), behind ingest and the checks."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


@dataclass
class VersionContext:
    """What is prepared once per model version: metadata, reference profile, calibration."""

    meta: ModelMetadata
    profile: ReferenceProfile | None
    calibration: ConfidenceCalibration
    reference: pd.DataFrame | None
    note: str = ""


@dataclass
class Quality:
    version: int
    rows: int
    labelled: int
    coverage: float
    scores: dict[str, Any]
    """``count`` and ``time`` windows -> accuracy/precision/recall/f1/n (None without labels)."""
    estimated_accuracy: float | None
    estimate_lower: float | None = None
    estimate_upper: float | None = None
    """The estimate's 95% interval."""
    out_of_support_share: float | None = None
    """Share of the count window's rows with a feature outside the version's reference range."""
    estimate_reliable: bool | None = None
    """False when ``out_of_support_share`` exceeds ``MAX_OUT_OF_SUPPORT_SHARE``: the estimate
    extrapolates beyond the data it was calibrated on."""
    estimate_gap: float | None = None
    """The estimate minus the realised accuracy on the same labelled rows of the count window
    (at least ``MIN_GAP_LABELS``): large when the labels disagree with what the model's
    confidence promised, which a concept shift does and no feature-based check can see."""
    gate_metric: str = DEFAULT_GATE_METRIC
    """The version's stored champion/challenger gate metric (``modelloop train --gate-metric``)."""
    gate_score: float | None = None
    """That metric over the count window's labelled rows (None where undefined)."""


class ModelStatus(TypedDict, total=False):
    """What the last check found of one model: its entry in ``/status``'s ``models``. A model
    whose check failed keeps its last entry, with ``error`` added."""

    version: int
    """The newest version in the count window: the one judged for drift and data quality."""
    window_rows: int
    drift: dict[str, Any]
    """:meth:`DriftResult.summary`, or ``{"judged": False, "note": why}``."""
    data_quality: dict[str, Any]
    quality: dict[str, dict[str, Any]]
    """Per version (its number as text): the fields of :class:`Quality`."""
    label_lag_s: float | None
    latency_s: dict[str, float]
    """Per quantile (``"0.5"``, ``"0.95"``, ``"0.99"``) over the time window."""
    latency_rows: int
    error_rate: float | None
    requests_in_window: int | None
    live_gate: dict[str, Any]
    """The live gate's last verdict on the model's challenger (:meth:`Verdict.record`)."""
    error: str
    """Why the last check of the model failed (``TypeName: message``)."""


class ResourceStatus(TypedDict, total=False):
    """The watched process and the GPUs at the last check: ``/status``'s ``resources``."""

    target: str
    cpu_ratio: float | None
    memory_bytes: float
    error: str
    """Why the process could not be sampled (instead of its CPU and memory)."""
    gpus: list[dict[str, Any]]
    gpu_unavailable: str
    """Why NVML sees no GPU."""


class Evaluator:
    def __init__(self, settings: MonitorSettings, store: EventStore, catalog: ModelCatalog,
                 engine: PolicyEngine, metrics: MonitorMetrics,
                 on_fire: Callable[[Firing, int | None], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.catalog = catalog
        self.engine = engine
        self.metrics = metrics
        self.on_fire = on_fire
        self.clock = clock
        self.warm = False
        self._lock = threading.Lock()
        self._contexts: dict[tuple[str, int], VersionContext] = {}
        self._status: dict[str, ModelStatus] = {}
        self._published: dict[tuple[str, str], set[tuple[Gauge, tuple[str, ...]]]] = {}
        self._reports = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift-report",
                                           initializer=_lower_priority,
                                           initargs=(settings.report_nice,))
        self._report_future: Future[Any] | None = None
        self._last_report: dict[str, tuple[float, bool]] = {}
        self._models: list[str] | None = None
        self.replica = f"{socket.gethostname()}:{os.getpid()}"  # who checked a window (the store says)
        self.errors = ErrorRateTracker(settings.serving_metrics_url, settings.window_seconds)
        self.live_gate = LiveGate(catalog.registry, store, metrics, min_rows=settings.live_gate_min_rows,
                                  alpha=settings.live_gate_alpha, max_age_s=settings.live_gate_max_age_s)
        self.gpu = GpuSampler() if settings.gpu else None
        self._process: ProcessSampler | CgroupSampler | None = None
        self._resource_status: ResourceStatus = {}
        if settings.target_cgroup is not None:
            self._process = CgroupSampler(settings.target_cgroup)  # a bad path stops start-up
        self._retention_lock = threading.Lock()
        self._retention_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retention")
        self._retention_future: Future[Any] | None = None
        self._closing = False
        store.on_growth(settings.retention_every_events, self._retention_due)

    def warm_up(self) -> None:
        """Import Evidently's stattests ahead of the first check (it takes seconds)."""
        stattests()
        self.warm = True

    def close(self, timeout: float) -> None:
        # a report being rendered is not waited for: it is a view, rendered again after a restart
        self._reports.shutdown(wait=False, cancel_futures=True)
        # a retention run stops after its current chunk (one transaction, committed or not)
        self._closing = True
        self._retention_pool.shutdown(wait=True, cancel_futures=True)
        if self.gpu is not None:
            self.gpu.close()

    def models(self, refresh: bool = False) -> list[str]:
        """Watched models that have events (the store is asked again at each check)."""
        if refresh or self._models is None:
            stored = self.store.models()
            if self.settings.models:
                self._models = [m for m in self.settings.models if m in stored]
            else:
                self._models = [m for m in stored if self.catalog.watched(m)]
        return list(self._models)

    # -- the check ------------------------------------------------------------------------------
    def check(self, models: list[str] | None = None, claim: bool = False) -> dict[str, ModelStatus]:
        """Check ``models`` (None: every watched one with events) and return the status. With
        ``claim`` (the periodic check), only the windows this replica claims first in the store."""
        with self._lock:
            stattests()  # Evidently's tests, imported once (usually by the warm-up already)
            self.warm = True
            now = self.clock()
            self.errors.scrape(now)
            for model in models or self.models(refresh=True):
                if claim and not self._claimed(model, now):
                    continue  # another replica checks this window
                try:
                    self._check_model(model, now)
                    self._judge_challenger(model, now)
                except Exception as exc:  # one broken model must not stop the others' checks
                    log.exception("check of model %s failed", model)
                    self._status.setdefault(model, ModelStatus())["error"] = \
                        f"{type(exc).__name__}: {exc}"
            self._check_resources(now)
            return self.status()

    def _judge_challenger(self, model: str, now: float) -> None:
        """The live gate's verdict on ``model``'s challenger, acted on (monitoring/live_gate.py)."""
        verdict = self.live_gate.check(model, now)
        if verdict is not None:
            self._status.setdefault(model, ModelStatus())["live_gate"] = verdict.record()
            if verdict.action == Action.retire:  # as after a job whose challenger lost
                self.engine.retry_on_labels(model, now, self.settings.retrain_retry_labels)
        else:
            self._status.get(model, ModelStatus()).pop("live_gate", None)

    def _claimed(self, model: str, now: float) -> bool:
        """Whether this replica checks ``model``'s window now: windows are ``check_interval_s``
        long, and the first replica to claim one in the shared store checks it."""
        slot = int(now // self.settings.check_interval_s)
        taken = self.store.claim_evaluation(model, slot, self.replica, now)
        self.metrics.window_checks.labels(model, "checked" if taken else "skipped").inc()
        return taken

    def _context(self, model: str, version: int) -> VersionContext | None:
        key = (model, version)
        if key in self._contexts:
            return self._contexts[key]
        try:
            mv = self.catalog.registry.get(model, version)
        except RegistryError as exc:
            log.warning("no registry entry for %s v%d: %s", model, version, exc)
            return None
        meta = mv.metadata
        try:
            ref = mv.reference()
        except RegistryError as exc:
            ctx = VersionContext(meta, None, ConfidenceCalibration(None), None, str(exc))
        else:
            profile = ReferenceProfile(
                ref, meta.feature_names, method=self.settings.drift_method,
                threshold=self.settings.drift_threshold,
                prediction_categorical=meta.task == Task.classification,
                false_alarm_rate=self.settings.drift_false_alarm_rate, categories=meta.categories)
            proba_cols = [c for c in ref.columns if c.startswith(REF_PROBA_PREFIX)]
            proba_cols.sort(key=lambda c: int(c[len(REF_PROBA_PREFIX):]))
            calibration = _calibration(ref, proba_cols)
            ctx = VersionContext(meta, profile, calibration, ref)
        self._contexts[key] = ctx
        return ctx

    def _check_model(self, model: str, now: float) -> None:
        s = self.settings
        recent = self.store.window(model, last_n=s.window_events, features=False)
        if not len(recent):
            return
        latest = int(recent.version[-1])
        ctx = self._context(model, latest)
        current = self.store.window(model, version=latest, last_n=s.window_events)
        status = ModelStatus(version=latest, window_rows=len(current))

        data_quality = self._data_quality(ctx, current)
        drift: DriftResult | None = None
        if ctx is not None and ctx.profile is not None and current.features is not None:
            drift = check_drift(ctx.profile, current.features, current.prediction, model=model,
                                version=latest, drift_share=s.drift_share,
                                min_rows=s.min_window_rows)
            self._publish_drift(model, drift)
            status["drift"] = drift.summary()
            if drift.judged and self._report_due(model, drift, now):
                self._schedule_report(model, latest, ctx, current, drift, data_quality)
        else:
            status["drift"] = {"judged": False, "note": ctx.note if ctx else "not in registry"}
        self._publish_data_quality(model, data_quality)
        if data_quality is not None:
            status["data_quality"] = data_quality.summary()

        qualities: dict[int, Quality] = {}
        for version in sorted(set(recent.version.tolist())):
            vctx = ctx if version == latest else self._context(model, version)
            if vctx is None or vctx.meta.task != Task.classification:
                continue
            win = current if version == latest else self.store.window(
                model, version=version, last_n=s.window_events)
            by_time = self.store.labelled_version(model, version, now - s.window_seconds,
                                                  s.time_window_rows, features=False)
            outside = (data_quality if version == latest
                       else self._data_quality(vctx, win))
            qualities[version] = _quality(
                version, win, by_time, vctx.calibration,
                None if outside is None else outside.out_of_support_rows_share,
                s.max_out_of_support_share, vctx.meta.gate_metric or DEFAULT_GATE_METRIC)
        self._publish_quality(model, qualities)
        status["quality"] = {str(v): q.__dict__ for v, q in qualities.items()}

        lag = label_lag(recent.ts, recent.label_ts)
        timed = self.store.latencies(model, now - s.window_seconds, s.time_window_rows)
        quantiles = latency_quantiles(timed)
        errors = self.errors.error_rate(model)
        entries: list[tuple[Gauge, tuple[str, ...], float]] = []
        if lag is not None:
            entries.append((self.metrics.label_lag, (model,), lag))
        for q, value in (quantiles or {}).items():
            entries.append((self.metrics.latency, (model, f"{q:g}"), value))
        if errors is not None:
            entries.append((self.metrics.error_rate, (model,), errors.rate))
        self._replace(model, "ops", entries)
        status["label_lag_s"] = lag
        status["latency_s"] = {f"{q:g}": v for q, v in (quantiles or {}).items()}
        status["latency_rows"] = len(timed)
        status["error_rate"] = None if errors is None else errors.rate
        status["requests_in_window"] = None if errors is None else errors.requests
        self._status[model] = status

        window = ModelWindow(drift, qualities.get(latest), quantiles, len(timed), errors,
                             data_quality)

        def observe(rule: Rule) -> Observation:
            return MODEL_OBSERVERS[rule.metric](rule, window)

        for firing in self.engine.evaluate("model", model, observe, now, model=model,
                                           labelled_since=lru_cache(maxsize=None)(
                                               partial(self.store.count_labelled, model))):
            self.on_fire(firing, latest)

    @staticmethod
    def _data_quality(ctx: VersionContext | None, win: Window) -> DataQuality | None:
        """Missing and out-of-support shares of a version's window, when it has a reference."""
        if ctx is None or ctx.profile is None or win.features is None or not len(win):
            return None
        p = ctx.profile
        return window_quality(p.feature_names, p.lower, p.upper, win.features)

    # -- publishing -----------------------------------------------------------------------------
    def _replace(self, model: str, group: str,
                 entries: list[tuple[Gauge, tuple[str, ...], float]]) -> None:
        """Set a group of gauges for ``model`` and remove the group's label sets not set now."""
        new = set()
        for gauge, labels, value in entries:
            gauge.labels(*labels).set(value)
            new.add((gauge, labels))
        for gauge, labels in self._published.get((model, group), set()) - new:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        self._published[(model, group)] = new

    def _publish_drift(self, model: str, drift: DriftResult) -> None:
        m = self.metrics
        if not drift.judged:  # the gauges keep describing the last judged window
            return
        entries: list[tuple[Gauge, tuple[str, ...], float]] = [
            (m.drift_share, (model,), drift.share), (m.drift_window_rows, (model,), drift.rows),
            (m.data_drift, (model,), float(drift.dataset_drift))]
        for c in drift.features:
            entries += [(m.drift_score, (model, c.column), c.score),
                        (m.drift_detected, (model, c.column), float(c.drifted)),
                        (m.drift_method, (model, c.column, c.method), c.threshold)]
        for u in drift.unknown:
            entries += [(m.unknown_category_share, (model, u.column), u.share),
                        (m.unknown_category_rise, (model, u.column), float(u.risen))]
        if drift.multivariate is not None:
            entries += [(m.multivariate_drift_score, (model,), drift.multivariate.statistic),
                        (m.multivariate_drift_detected, (model,),
                         float(drift.multivariate.drifted))]
        if drift.prediction is not None:
            entries += [(m.prediction_drift_score, (model,), drift.prediction.score),
                        (m.prediction_drift_detected, (model,), float(drift.prediction.drifted))]
        self._replace(model, "drift", entries)

    def _publish_data_quality(self, model: str, quality: DataQuality | None) -> None:
        m = self.metrics
        entries: list[tuple[Gauge, tuple[str, ...], float]] = []
        if quality is not None:
            entries.append((m.out_of_support_rows, (model,), quality.out_of_support_rows_share))
            for f in quality.features:
                entries += [(m.missing, (model, f.feature), f.missing_share),
                            (m.out_of_support, (model, f.feature), f.out_of_support_share)]
        self._replace(model, "data_quality", entries)

    def _publish_quality(self, model: str, qualities: dict[int, Quality]) -> None:
        m = self.metrics
        entries: list[tuple[Gauge, tuple[str, ...], float]] = []
        for version, q in qualities.items():
            v = str(version)
            entries += [(m.labelled_samples, (model, v), q.labelled),
                        (m.label_coverage, (model, v), q.coverage)]
            if q.estimated_accuracy is not None:
                entries.append((m.estimated_accuracy, (model, v), q.estimated_accuracy))
            if q.estimate_lower is not None and q.estimate_upper is not None:
                entries += [(m.estimated_accuracy_lower, (model, v), q.estimate_lower),
                            (m.estimated_accuracy_upper, (model, v), q.estimate_upper)]
            if q.estimate_reliable is not None:
                entries.append((m.estimate_reliable, (model, v), float(q.estimate_reliable)))
            if q.estimate_gap is not None:
                entries.append((m.estimate_gap, (model, v), q.estimate_gap))
            if q.gate_score is not None:
                entries.append((m.gate_metric, (model, v, q.gate_metric), q.gate_score))
            for window, sc in q.scores.items():
                if sc is None:
                    continue
                for gauge, key in ((m.accuracy, "accuracy"), (m.precision, "precision"),
                                   (m.recall, "recall"), (m.f1, "f1")):
                    entries.append((gauge, (model, v, window), sc[key]))
        self._replace(model, "quality", entries)

    def _report_due(self, model: str, drift: DriftResult, now: float) -> bool:
        """A new report at most every ``REPORT_INTERVAL_S``, and at once when the dataset's drift
        flag turns on (which, with calibrated drift, unchanged data does in 1% of windows): not
        whenever the set of drifted features changes, which noise makes it do every few windows
        at fixed thresholds, and Evidently's report costs seconds of CPU."""
        last = self._last_report.get(model)
        onset = drift.dataset_drift and (last is None or not last[1])
        if last is not None and not onset and now - last[0] < self.settings.report_interval_s:
            return False
        self._last_report[model] = (now, drift.dataset_drift)
        return True

    def _schedule_report(self, model: str, version: int, ctx: VersionContext,
                         current: Window, drift: DriftResult,
                         data_quality: DataQuality | None) -> None:
        if self._report_future is not None and not self._report_future.done():
            return  # the previous report is still rendering; the next check makes a fresh one
        assert ctx.reference is not None and current.features is not None
        assert ctx.profile is not None
        names, profile = ctx.meta.feature_names, ctx.profile
        ref = window_frame(ctx.reference[names], names, ctx.meta.categorical_features)
        cur = window_frame(current.features, names, ctx.meta.categorical_features)
        pred_col = None
        if REF_PREDICTION in ctx.reference.columns:
            pred_col = "prediction"
            ref[pred_col] = ctx.reference[REF_PREDICTION].to_numpy()
            cur[pred_col] = current.prediction
        s = self.settings

        def render() -> None:
            try:
                extra = (sidecar_section(drift.multivariate, data_quality, drift.unknown)
                         + (importance_section(self.catalog.registry, model, version, drift,
                                               nice=s.report_nice) if s.report_importance else ""))
                write_drift_report(s.reports_dir, model, version, ref, cur,
                                   method=profile.method, threshold=profile.threshold,
                                   calibrated=profile.calibrated,
                                   drift_share=1 / len(names) if profile.calibrated
                                   else s.drift_share,
                                   max_rows=s.report_max_rows, keep=s.reports_keep,
                                   prediction_column=pred_col, extra_html=extra,
                                   categorical=ctx.meta.categorical_features)
            except Exception:
                log.exception("drift report for %s v%d failed", model, version)

        self._report_future = self._reports.submit(render)

    def wait_for_report(self, timeout: float = 120.0) -> None:
        """Block until the report being rendered (if any) is written (tests, shutdown)."""
        if self._report_future is not None:
            self._report_future.result(timeout)

    # -- resources ---------------------------------------------------------------------------
    def _check_resources(self, now: float) -> None:
        """Sample the watched process and the GPUs, publish their gauges, judge their rules."""
        target = self.settings.target_name
        sample = self._sample_process(target)
        gpus = self.gpu.sample() if self.gpu is not None else []
        self._publish_resources(target, sample, gpus)
        self._judge_resources(now, target, sample, gpus)

    def _sample_process(self, target: str) -> ProcessSample | None:
        """The watched process's CPU and memory now; None (and why, in the status) without one."""
        if self._process is None and self.settings.target_pid is not None:
            try:
                self._process = ProcessSampler(self.settings.target_pid,
                                               self.settings.include_children)
            except psutil.Error as exc:
                self._resource_status = {"target": target, "error": f"pid {self.settings.target_pid}: {exc}"}
        if self._process is None:
            return None
        try:
            return self._process.sample()
        except (psutil.Error, OSError, ValueError) as exc:
            self._resource_status = {"target": target, "error": str(exc)}
            if isinstance(self._process, ProcessSampler):
                self._process = None  # the process is gone; look for the pid again next time
            return None

    def _publish_resources(self, target: str, sample: ProcessSample | None,
                           gpus: list[GpuSample]) -> None:
        entries: list[tuple[Gauge, tuple[str, ...], float]] = []
        if sample is not None:
            entries.append((self.metrics.process_memory, (target,), sample.memory_bytes))
            if sample.cpu_ratio is not None:
                entries.append((self.metrics.process_cpu, (target,), sample.cpu_ratio))
            self._resource_status = {"target": target, "cpu_ratio": sample.cpu_ratio,
                                     "memory_bytes": sample.memory_bytes}
        for g in gpus:
            entries += [(self.metrics.gpu_utilization, (g.index,), g.utilization_ratio),
                         (self.metrics.gpu_memory_used, (g.index,), g.memory_used_bytes),
                         (self.metrics.gpu_memory_total, (g.index,), g.memory_total_bytes)]
        self._resource_status["gpus"] = [g.__dict__ for g in gpus]
        if self.gpu is not None and self.gpu.unavailable:
            self._resource_status["gpu_unavailable"] = self.gpu.unavailable
        self._replace("", "resources", entries)

    def _judge_resources(self, now: float, target: str, sample: ProcessSample | None,
                         gpus: list[GpuSample]) -> None:
        if sample is not None:
            def observe_process(rule: Rule) -> Observation:
                return PROCESS_OBSERVERS[rule.metric](sample)

            for firing in self.engine.evaluate("process", target, observe_process, now):
                self.on_fire(firing, None)
        for g in gpus:
            def observe_gpu(rule: Rule, g: GpuSample = g) -> Observation:
                return GPU_OBSERVERS[rule.metric](g)

            for firing in self.engine.evaluate("gpu", f"gpu{g.index}", observe_gpu, now):
                self.on_fire(firing, None)

    def retention(self, stopping: Callable[[], bool] = lambda: False) -> Retention:
        """Delete events beyond the retention bounds (age, count, bytes) and forget alerts not
        seen for the retention age or beyond ``retention_max_alerts``; one run at a time. A run
        ends after its current chunk once the evaluator closes or ``stopping()`` holds."""
        s = self.settings
        with self._retention_lock:
            done = self.store.retain(cutoff_ts=self.clock() - s.retention_max_age_s,
                                     max_events=s.retention_max_events,
                                     max_bytes=s.retention_max_bytes,
                                     max_alerts=s.retention_max_alerts,
                                     on_chunk=lambda _: not (self._closing or stopping()))
        self.metrics.store_bytes.set(self.store.used_bytes())
        if done.deleted or done.alerts:
            log.info("retention deleted %d events older than %.0f s, %d beyond %d events and "
                     "%d beyond %d bytes; forgot %d alerts", done.by_age, s.retention_max_age_s,
                     done.by_count, s.retention_max_events, done.by_bytes, s.retention_max_bytes,
                     done.alerts)
        return done

    def _retention_due(self) -> None:
        """The store stored ``retention_every_events`` more events: run retention now on its
        own thread (this is the writer's), unless a run is queued or running already."""
        if self._closing or (self._retention_future is not None
                             and not self._retention_future.done()):
            return
        with contextlib.suppress(RuntimeError):  # closed meanwhile
            self._retention_future = self._retention_pool.submit(self._logged_retention)

    def _logged_retention(self) -> None:
        try:
            self.retention()
        except Exception:
            log.exception("retention failed; it runs again at the next interval")

    def wait_for_retention(self, timeout: float = 120.0) -> None:
        """Wait for a retention run started by ingest (tests)."""
        if self._retention_future is not None:
            self._retention_future.result(timeout)

    def status(self) -> dict[str, ModelStatus]:
        return {m: st.copy() for m, st in self._status.items()}

    def resource_status(self) -> ResourceStatus:
        return self._resource_status.copy()


def _calibration(ref: Any, proba_cols: list[str]) -> ConfidenceCalibration:
    """Calibrate on the reference rows the model never trained on when the sample marks them
    (enough of them), else on all rows."""
    if not proba_cols:
        return ConfidenceCalibration(None)
    if REF_SPLIT in ref.columns:
        holdout = ref[ref[REF_SPLIT] == "holdout"]
        if len(holdout) >= MIN_CALIBRATION_ROWS:
            ref = holdout
    labels = ref[REF_LABEL].to_numpy() if REF_LABEL in ref.columns else None
    return ConfidenceCalibration.fit(ref[proba_cols].to_numpy(), labels)


def _quality(version: int, win: Window, by_time: Window, calibration: ConfidenceCalibration,
             out_of_support: float | None, max_out_of_support: float,
             gate_metric: str = DEFAULT_GATE_METRIC) -> Quality:
    scores: dict[str, Any] = {}
    for name, w in (("count", win), ("time", by_time)):
        mask = w.labelled
        sc = classification_scores(w.label[mask].astype(np.int64),
                                   w.prediction[mask].astype(np.int64))
        scores[name] = None if sc is None else sc.__dict__
    labelled = int(win.labelled.sum())
    estimate = (calibration.estimate(win.probabilities)
                if win.probabilities is not None else None)
    gap = _estimate_gap(win, calibration, scores["count"])
    mask = win.labelled
    gate = gate_score(gate_metric, win.label[mask], win.prediction[mask],
                      None if win.probabilities is None else win.probabilities[mask])
    return Quality(version=version, rows=len(win), labelled=labelled,
                   coverage=labelled / len(win) if len(win) else 0.0, scores=scores,
                   estimated_accuracy=None if estimate is None else estimate.value,
                   estimate_lower=None if estimate is None else estimate.lower,
                   estimate_upper=None if estimate is None else estimate.upper,
                   out_of_support_share=out_of_support,
                   estimate_reliable=None if estimate is None or out_of_support is None
                   else out_of_support <= max_out_of_support, estimate_gap=gap,
                   gate_metric=gate_metric, gate_score=gate)


def _estimate_gap(win: Window, calibration: ConfidenceCalibration,
                  realised: dict[str, Any] | None) -> float | None:
    if win.probabilities is None or realised is None or realised["n"] < MIN_GAP_LABELS:
        return None
    on_labelled = calibration.estimate(win.probabilities[win.labelled])
    return None if on_labelled is None else on_labelled.value - realised["accuracy"]


# -- observers: one per policy metric ----------------------------------------------------------
@dataclass(frozen=True)
class ModelWindow:
    """What a model's rules are observed on at one check."""

    drift: DriftResult | None
    quality: Quality | None
    """The newest version's."""
    quantiles: dict[float, float] | None
    latency_rows: int
    errors: ErrorRate | None
    data_quality: DataQuality | None


ModelObserver = Callable[[Rule, ModelWindow], Observation]
ProcessObserver = Callable[[ProcessSample], Observation]
GpuObserver = Callable[[GpuSample], Observation]


def _on_drift(observe: Callable[[Rule, DriftResult], Observation]) -> ModelObserver:
    """``observe`` of a judged drift result; no value (and its rows) while there is none."""
    def observer(rule: Rule, w: ModelWindow) -> Observation:
        if w.drift is None or not w.drift.judged:
            return Observation(None, 0 if w.drift is None else w.drift.rows)
        return observe(rule, w.drift)
    return observer


def _data_drift(rule: Rule, drift: DriftResult) -> Observation:
    return Observation(float(drift.dataset_drift), drift.rows, ", ".join(drift.drifted_features))


def _drift_share(rule: Rule, drift: DriftResult) -> Observation:
    return Observation(drift.share, drift.rows, ", ".join(drift.drifted_features))


def _feature_drift(rule: Rule, drift: DriftResult) -> Observation:
    hit = [f for f in drift.drifted_features if f in (rule.features or [])]
    return Observation(float(bool(hit)), drift.rows, ", ".join(hit))


def _multivariate_drift(rule: Rule, drift: DriftResult) -> Observation:
    mv = drift.multivariate
    if mv is None:
        return Observation(None, drift.rows)
    return Observation(float(mv.drifted), drift.rows, ", ".join(mv.pairs))


def _prediction_drift(rule: Rule, drift: DriftResult) -> Observation:
    if drift.prediction is None:
        return Observation(None, drift.rows)
    return Observation(float(drift.prediction.drifted), drift.rows)


def _on_data_quality(observe: Callable[[DataQuality], Observation]) -> ModelObserver:
    """``observe`` of the window's data quality; no value while it has no rows."""
    def observer(rule: Rule, w: ModelWindow) -> Observation:
        if w.data_quality is None or not w.data_quality.rows:
            return Observation(None, 0)
        return observe(w.data_quality)
    return observer


def _missing_share(quality: DataQuality) -> Observation:
    return Observation(quality.max_missing_share, quality.rows, quality.worst_missing())


def _out_of_support_share(quality: DataQuality) -> Observation:
    return Observation(quality.out_of_support_rows_share, quality.rows,
                       quality.out_of_support_features())


def _score(rule: Rule, w: ModelWindow) -> Observation:
    """A realised score (accuracy, f1, precision, recall) over the rule's window."""
    sc = None if w.quality is None else w.quality.scores.get(rule.window)
    return Observation(None, 0) if sc is None else Observation(sc[rule.metric], sc["n"])


def _gap(rule: Rule, w: ModelWindow) -> Observation:
    q = w.quality
    return (Observation(None, 0) if q is None or q.estimate_gap is None
            else Observation(q.estimate_gap, q.labelled))


def _estimated_accuracy(rule: Rule, w: ModelWindow) -> Observation:
    q = w.quality
    if q is None:
        return Observation(None, 0)
    if q.estimate_reliable is False:  # out of support: the estimate is no evidence
        return Observation(None, q.rows, "estimate unreliable: "
                           f"{q.out_of_support_share:.3f} of rows out of support")
    return Observation(q.estimated_accuracy, q.rows)


def _latency(quantile: float) -> ModelObserver:
    def observer(rule: Rule, w: ModelWindow) -> Observation:
        return Observation(None if w.quantiles is None else w.quantiles[quantile], w.latency_rows)
    return observer


def _error_rate(rule: Rule, w: ModelWindow) -> Observation:
    return (Observation(None, 0) if w.errors is None
            else Observation(w.errors.rate, w.errors.requests))


MODEL_OBSERVERS: dict[str, ModelObserver] = {
    "data_drift": _on_drift(_data_drift),
    "drift_share": _on_drift(_drift_share),
    "feature_drift": _on_drift(_feature_drift),
    "prediction_drift": _on_drift(_prediction_drift),
    "multivariate_drift": _on_drift(_multivariate_drift),
    "out_of_support_share": _on_data_quality(_out_of_support_share),
    "missing_share": _on_data_quality(_missing_share),
    "accuracy": _score,
    "f1": _score,
    "precision": _score,
    "recall": _score,
    "estimated_accuracy": _estimated_accuracy,
    "estimate_gap": _gap,
    "latency_p50": _latency(0.5),
    "latency_p95": _latency(0.95),
    "latency_p99": _latency(0.99),
    "error_rate": _error_rate,
}
"""The observer of each metric of a model's rules (``policy.METRICS`` scope ``model``)."""
PROCESS_OBSERVERS: dict[str, ProcessObserver] = {
    "cpu": lambda sample: Observation(sample.cpu_ratio, 1),
    "memory_bytes": lambda sample: Observation(sample.memory_bytes, 1),
}
GPU_OBSERVERS: dict[str, GpuObserver] = {
    "gpu_utilization": lambda gpu: Observation(gpu.utilization_ratio, 1),
    "gpu_memory_bytes": lambda gpu: Observation(gpu.memory_used_bytes, 1),
}


def check_observers(metrics: Mapping[str, MetricSpec] = METRICS) -> None:
    """Every policy metric has an observer of its scope and every observer a metric, or a
    RuntimeError names the ones that do not. Run on import: a metric added to
    ``policy.METRICS`` without an observer stops the sidecar from starting, instead of its rules
    never firing (they saw no value)."""
    tables: dict[str, Mapping[str, object]] = {
        "model": MODEL_OBSERVERS, "process": PROCESS_OBSERVERS, "gpu": GPU_OBSERVERS}
    missing = [f"{name} ({spec.scope})" for name, spec in metrics.items()
               if name not in tables[spec.scope]]
    unknown = [f"{name} ({scope})" for scope, table in tables.items() for name in table
               if name not in metrics or metrics[name].scope != scope]
    problems = ([f"no observer for {', '.join(missing)}"] if missing else []) + \
        ([f"no such metric for {', '.join(unknown)}"] if unknown else [])
    if problems:
        raise RuntimeError(f"policy metrics and observers disagree: {'; '.join(problems)}")


check_observers()
