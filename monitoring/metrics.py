"""The sidecar's Prometheus metrics (names and labels as in docs/metrics.md), on a registry
passed in so every test and process has its own.

Example::

    registry = CollectorRegistry()
    metrics = MonitorMetrics(registry)
    metrics.events_ingested.labels(model="churn").inc(100)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

from monitoring.records import JobStatus, Refusal, Requester

REJECT_REASONS = ("invalid_json", "invalid_event", "unknown_model", "wrong_shape", "too_large",
                  "too_slow", "unsupported_encoding", "malformed_body", "ambiguous_id", "invalid_feedback",
                  "invalid_label")
FEEDBACK_RESULTS = ("joined", "unknown", "duplicate", "ambiguous", "not_sampled")
JOB_TRIGGERS = tuple(r.value for r in Requester)
"""The ``trigger`` label of the retraining metrics: who may ask for a job."""
JOB_RESULTS = tuple(s.value for s in (JobStatus.started, JobStatus.succeeded, JobStatus.failed,
                                      JobStatus.skipped))
"""The ``result`` label of ``modelloop_retrain_jobs_total``: a job's states but ``running`` (a
started job counts as ``started`` once, then as how it ended)."""
DENY_REASONS = ("missing_key", "wrong_key", "wrong_role")
REFUSE_REASONS = tuple(r.value for r in Refusal)
"""The ``reason`` label of ``modelloop_retrain_refused_total``: why a request started no job."""
ERROR_REASONS = ("unexpected", "not_stored")
LIVE_GATE_DECISIONS = ("promote", "retire", "failed")


class MonitorMetrics:
    """Every metric the sidecar exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

        def g(name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        def c(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        # ingest and feedback
        self.events_ingested = c("modelloop_events_ingested_total", "Events stored.", ("model",))
        self.events_rejected = c("modelloop_events_rejected_total", "Events, labels and bodies "
                                 "refused (malformed, too large or slow, an ambiguous request id).",
                                 ("reason",))
        self.feedback = c("modelloop_feedback_total", "Labels received (joined, unknown, "
                          "duplicate, ambiguous, not_sampled).", ("model", "result"))
        self.events_seen = c("modelloop_events_seen_total", "Rows serving predicted that the "
                             "events stored stand for, those its sample left out included.",
                             ("model",))
        self.events_sample_share = g("modelloop_events_sample_share_ratio", "Share of the model's "
                                     "rows whose events serving sends (its last events said).",
                                     ("model",))
        # drift
        self.drift_score = g("modelloop_drift_score", "Per-feature drift score (the test's "
                             "statistic or p-value, see modelloop_drift_method_info).",
                             ("model", "feature"))
        self.drift_detected = g("modelloop_drift_detected", "Per-feature drift flag.",
                                ("model", "feature"))
        self.drift_method = g("modelloop_drift_method_info", "The Evidently test behind each "
                              "feature's drift score, and its threshold (value).",
                              ("model", "feature", "method"))
        self.drift_share = g("modelloop_drift_share_ratio", "Share of features drifted.", ("model",))
        self.data_drift = g("modelloop_data_drift_detected", "Dataset drift flag (with "
                            "DRIFT_METHOD=calibrated: any feature drifted, at the stated "
                            "false-alarm rate).", ("model",))
        self.prediction_drift_score = g("modelloop_prediction_drift_score",
                                        "Drift of the prediction distribution.", ("model",))
        self.prediction_drift_detected = g("modelloop_prediction_drift_detected",
                                           "Prediction drift flag.", ("model",))
        self.multivariate_drift_score = g(
            "modelloop_multivariate_drift_score", "Joint-distribution drift: the smallest p-value "
            "of the pairwise dependence tests (drift below DRIFT_FALSE_ALARM_RATE / pairs).",
            ("model",))
        self.multivariate_drift_detected = g("modelloop_multivariate_drift_detected",
                                             "Joint-distribution drift flag.", ("model",))
        self.unknown_category_share = g(
            "modelloop_unknown_category_share_ratio", "Per categorical feature: share of the "
            "judged window's values the model's vocabulary lacks (missing ones not counted).",
            ("model", "feature"))
        self.unknown_category_rise = g(
            "modelloop_unknown_category_rise_detected", "Per categorical feature: its share of "
            "unknown values rose against the reference (a drift of the feature).",
            ("model", "feature"))
        # the live gate (monitoring/live_gate.py)
        self.live_gate_rows = g("modelloop_live_gate_rows", "Labelled requests both the champion "
                                "and the shadowing challenger answered.", ("model",))
        self.live_gate_score = g("modelloop_live_gate_score", "Live accuracy (regression: MAE) "
                                 "of the champion and the challenger on those requests (NaN "
                                 "while none is judged).",
                                 ("model", "role"))
        self.live_gate_p_value = g("modelloop_live_gate_p_value", "The paired test's p-value at "
                                   "the last look (NaN before the first).", ("model",))
        self.live_gate_decisions = c("modelloop_live_gate_decisions_total", "Challengers "
                                     "promoted (promote), retired (retire), or failed to act on (failed).", ("model", "decision"))
        # data quality of the judged window
        self.missing = g("modelloop_missing_ratio", "Share of the window's rows missing the "
                         "feature.", ("model", "feature"))
        self.out_of_support = g("modelloop_out_of_support_ratio", "Share of the window's rows "
                                "with the feature outside the reference's range.",
                                ("model", "feature"))
        self.out_of_support_rows = g("modelloop_out_of_support_rows_ratio", "Share of the "
                                     "window's rows with any feature outside the reference's "
                                     "range.", ("model",))
        self.drift_window_rows = g("modelloop_drift_window_rows", "Rows in the last judged window.",
                                   ("model",))
        # quality
        mvw = ("model", "version", "window")
        self.accuracy = g("modelloop_accuracy_ratio", "Realised accuracy over a window.", mvw)
        self.f1 = g("modelloop_f1_ratio", "Realised macro F1 over a window.", mvw)
        self.precision = g("modelloop_precision_ratio", "Realised macro precision.", mvw)
        self.recall = g("modelloop_recall_ratio", "Realised macro recall.", mvw)
        self.gate_metric = g("modelloop_gate_metric_ratio", "The version's champion/challenger "
                             "gate metric (accuracy, f1, roc_auc or pr_auc, as stored with it) "
                             "over the count window's labelled events.",
                             ("model", "version", "metric"))
        self.estimated_accuracy = g("modelloop_estimated_accuracy_ratio",
                                    "Confidence-based accuracy estimate (no labels needed).",
                                    ("model", "version"))
        self.estimated_accuracy_lower = g("modelloop_estimated_accuracy_lower_ratio",
                                          "Lower end of the estimate's 95% interval.",
                                          ("model", "version"))
        self.estimated_accuracy_upper = g("modelloop_estimated_accuracy_upper_ratio",
                                          "Upper end of the estimate's 95% interval.",
                                          ("model", "version"))
        self.estimate_reliable = g("modelloop_estimate_reliable", "1 while the accuracy "
                                   "estimate is reliable (out-of-support rows at most "
                                   "MAX_OUT_OF_SUPPORT_SHARE).", ("model", "version"))
        self.estimate_gap = g("modelloop_estimate_gap_ratio", "The accuracy estimate minus the "
                              "realised accuracy on the same labelled rows (a concept shift "
                              "makes it large).", ("model", "version"))
        self.labelled_samples = g("modelloop_labelled_samples", "Labelled events in the window.",
                                  ("model", "version"))
        self.label_coverage = g("modelloop_label_coverage_ratio",
                                "Share of events in the window with a label.", ("model", "version"))
        self.label_lag = g("modelloop_label_lag_seconds", "Median delay from prediction to label.",
                           ("model",))
        # latency, errors, resources
        self.latency = g("modelloop_latency_seconds", "Latency quantiles from events over the "
                         "window.", ("model", "quantile"))
        self.error_rate = g("modelloop_error_rate_ratio", "Error rate over the window.", ("model",))
        self.process_cpu = g("modelloop_process_cpu_ratio", "CPU use of the watched serving "
                             "process (1.0 = one core).", ("target",))
        self.process_memory = g("modelloop_process_memory_bytes", "RSS of the watched serving "
                                "process.", ("target",))
        self.gpu_utilization = g("modelloop_gpu_utilization_ratio", "GPU utilisation (NVML).",
                                 ("gpu",))
        self.gpu_memory_used = g("modelloop_gpu_memory_used_bytes", "GPU memory used (NVML).",
                                 ("gpu",))
        self.gpu_memory_total = g("modelloop_gpu_memory_total_bytes", "GPU memory (NVML).",
                                  ("gpu",))
        # policy and jobs
        self.window_checks = c("modelloop_window_checks_total", "Periodic checks of a model's "
                               "window: checked here, or skipped because another replica sharing "
                               "the store checks that window.", ("model", "result"))
        self.threshold_breaches = c("modelloop_threshold_breaches_total", "Policy rules that fired.",
                                    ("rule",))
        self.retrain_jobs = c("modelloop_retrain_jobs_total", "Retraining jobs by trigger and "
                              "result.", ("model", "trigger", "result"))
        self.retrain_active = g("modelloop_retrain_job_active", "A retraining job is running.",
                                ("model",))
        self.retrain_last = g("modelloop_retrain_last_timestamp_seconds", "When a job last ended.",
                              ("model", "result"))
        # who may steer, and what is refused before any work
        self.denied = c("modelloop_monitor_denied_total", "Requests refused for a missing or "
                        "wrong key, or a key of another role.", ("reason",))
        self.retrain_refused = c("modelloop_retrain_refused_total", "Retraining requests refused "
                                 "before a job (unknown model, duplicate, busy, at the global cap).",
                                 ("trigger", "reason"))
        self.store_bytes = Gauge("modelloop_store_size_bytes", "Bytes the stored events take "
                                 "(as retention measures them), after each retention run.",
                                 registry=registry)
        self.ingest_busy = c("modelloop_ingest_busy_total", "Bodies answered 503 because the "
                             "ingest queue was full (the sender retries them).", ())
        self.errors = c("modelloop_monitor_errors_total", "Requests the sidecar failed: an "
                        "unexpected error (500, logged with its error id and traceback) or events "
                        "not stored (503: the store failed or the sidecar is stopping).", ("reason",))
        for reason in REJECT_REASONS:
            self.events_rejected.labels(reason)
        for reason in DENY_REASONS:
            self.denied.labels(reason)
        for reason in ERROR_REASONS:
            self.errors.labels(reason)
        for trigger in JOB_TRIGGERS:
            for reason in REFUSE_REASONS:
                self.retrain_refused.labels(trigger, reason)

    def initialise(self, models: Iterable[str], rules: Iterable[str]) -> None:
        """Create the counters' series at zero, so rates and alerts work from the first event."""
        for rule in rules:
            self.threshold_breaches.labels(rule)
        for model in models:
            for result in FEEDBACK_RESULTS:
                self.feedback.labels(model, result)
            for trigger in JOB_TRIGGERS:
                for result in JOB_RESULTS:
                    self.retrain_jobs.labels(model, trigger, result)
            self.retrain_active.labels(model).set(0)
            for decision in LIVE_GATE_DECISIONS:
                self.live_gate_decisions.labels(model, decision)
            self.live_gate_rows.labels(model).set(0)  # no challenger judged yet
            for role in ("champion", "challenger"):
                self.live_gate_score.labels(model, role).set(math.nan)
            self.live_gate_p_value.labels(model).set(math.nan)
