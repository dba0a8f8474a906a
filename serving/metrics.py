"""The serving metric catalog (docs/metrics.md), built on a CollectorRegistry passed in.

Inside ``bentoml serve`` the worker processes run with ``PROMETHEUS_MULTIPROC_DIR`` set, so these
values live in BentoML's multiprocess files and BentoML's ``/metrics`` reports them summed over all
workers, next to its built-in metrics. In-process (tests, the batch CLI) they are plain values on
the registry given here.

Example::

    metrics = ServingMetrics(CollectorRegistry())
    metrics.rows.labels(model="churn", mode="realtime").inc(4)
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = tuple(float(2**i) for i in range(13))  # 1, 2, 4, ... 4096


class ServingMetrics:
    """Every serving metric of the catalog, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.model_info = Gauge(
            "modelloop_serving_model_info",
            "The model being served and the ONNX Runtime provider actually active (1).",
            ["model", "version", "provider"], registry=registry, multiprocess_mode="livemax",
        )
        self.requests = Counter(
            "modelloop_serving_requests_total", "HTTP requests by route and status code.",
            ["model", "route", "code"], registry=registry,
        )
        self.request_duration = Histogram(
            "modelloop_serving_request_duration_seconds",
            "Time from request received to response ready.",
            ["model", "route"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.inference_duration = Histogram(
            "modelloop_serving_inference_duration_seconds", "One ONNX Runtime call.",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.queue_wait = Histogram(
            "modelloop_serving_queue_wait_seconds", "Time a request waited for its batch.",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.batch_size = Histogram(
            "modelloop_serving_batch_size_rows", "Rows per ONNX Runtime call.",
            ["model"], buckets=BATCH_BUCKETS, registry=registry,
        )
        self.rows = Counter(
            "modelloop_serving_rows_total", "Rows predicted, by mode (realtime or batch).",
            ["model", "mode"], registry=registry,
        )
        self.errors = Counter(
            "modelloop_serving_errors_total",
            "Failed requests by reason (validation, overloaded, auth, internal, too_large, unavailable).",
            ["model", "reason"], registry=registry,
        )
        self.events_sent = Counter(
            "modelloop_serving_events_sent_total", "Prediction events the sidecar acknowledged.",
            ["model"], registry=registry,
        )
        self.events_dropped = Counter(
            "modelloop_serving_events_dropped_total",
            "Prediction events dropped (buffer_full, expired, rejected, shutdown).",
            ["model", "reason"], registry=registry,
        )
        self.events_sampled = Counter(
            "modelloop_serving_events_sampled_total",
            "Rows predicted with events asked for, by whether the sample kept their events (kept, "
            "left_out; serving/sampling.py).", ["model", "result"], registry=registry,
        )
        self.reloads = Counter(
            "modelloop_serving_reloads_total", "Model swaps by result (success, failure) and "
            "reason (swapped; missing_version, unresolved, broken).",
            ["model", "result", "reason"], registry=registry,
        )
        self.shadow_rows = Counter(
            "modelloop_serving_shadow_rows_total",
            "Rows of production traffic copied to the challenger (serving/shadow.py), by result "
            "(scored, dropped, failed).", ["model", "result"], registry=registry,
        )
        self.shadow_inference_duration = Histogram(
            "modelloop_serving_shadow_inference_duration_seconds",
            "One ONNX Runtime call of the challenger on a copied batch (beside "
            "modelloop_serving_inference_duration_seconds, production's).",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.shadow_agreement = Counter(
            "modelloop_serving_shadow_agreement_rows_total",
            "Shadow rows where the challenger predicted what production answered.",
            ["model"], registry=registry,
        )

        self.unknown_categories = Counter(
            "modelloop_unknown_category_total",
            "Categorical values that the model's vocabulary does not hold (its graph's unknown "
            "code), by feature (modelloop/categorical.py).", ["model", "feature"], registry=registry,
        )

    def set_model(self, model: str, version: int, provider: str, previous: tuple[int, str] | None) -> None:
        """Point ``model_info`` at the version now served (the one before drops to 0)."""
        if previous is not None and previous != (version, provider):
            self.model_info.labels(model=model, version=str(previous[0]), provider=previous[1]).set(0)
        self.model_info.labels(model=model, version=str(version), provider=provider).set(1)


class MetricBuffer:
    """Per-request metric updates summed in plain Python, written to the metrics by :meth:`flush`.

    Inside ``bentoml serve`` every prometheus_client update is a locked write to a memory-mapped
    file, and a request makes six of them: a measurable share of the CPU a small-model request
    costs (docs/serving.md). Summing here makes each a dict update; the serving state flushes every
    100 ms, so ``/metrics`` lags by at most that. Only the event-loop thread may use one buffer.

    Example::

        buffer.inc(metrics.rows.labels(model="m", mode="realtime"), 4)
        buffer.observe(metrics.queue_wait.labels(model="m"), 0.0012)
        buffer.flush()
    """

    def __init__(self) -> None:
        self._counts: dict[Any, float] = {}
        self._hists: dict[Any, list[Any]] = {}  # child -> [sum, count per bucket]

    def inc(self, child: Any, amount: float = 1.0) -> None:
        self._counts[child] = self._counts.get(child, 0.0) + amount

    def observe(self, child: Any, value: float) -> None:
        entry = self._hists.get(child)
        if entry is None:
            entry = self._hists[child] = [0.0, [0] * len(child._upper_bounds)]
        entry[0] += value
        # Histogram.observe counts a value in the first bucket whose bound is >= it
        entry[1][bisect_left(child._upper_bounds, value)] += 1

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        hists, self._hists = self._hists, {}
        for child, amount in counts.items():
            child.inc(amount)
        for child, (total, buckets) in hists.items():
            # Histogram has no public "observe many", and observe() per value costs ~10 times
            # more in multiprocess mode (a custom collector is not summed over the workers):
            # add the sums to its values as observe() does (BENCHMARKS.md, "Histograms through
            # the public API"; test_metrics_settings checks both ways expose the same samples)
            child._sum.inc(total)
            for i, n in enumerate(buckets):
                if n:
                    child._buckets[i].inc(n)
