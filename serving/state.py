"""Everything one serving worker holds, built from the settings, with one start/stop lifecycle.

Example::

    state = ServingState(ServingSettings(), CollectorRegistry())
    await state.start()        # loads the default model (raises ModelLoadError), events, swaps
    served = await state.repository.acquire("churn")   # any served model (serving/repository.py)
    ...
    await state.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from prometheus_client import CollectorRegistry

from modelloop.categorical import unknown_counts
from modelloop.registry import Registry
from modelloop.schemas import ModelMetadata, monitored_features
from serving.batcher import AdaptiveBatcher
from serving.events import EventEmitter
from serving.jobs import JobStore
from serving.metrics import MetricBuffer, ServingMetrics
from serving.models import RuntimeFactory
from serving.predictions import Predictions, from_columns
from serving.repository import ModelRepository
from serving.runtime import OnnxRuntime
from serving.sampling import EventSampler
from serving.settings import ServingSettings

logger = logging.getLogger(__name__)
METRICS_FLUSH_S = 0.1  # how stale /metrics may be; see MetricBuffer


class EventTag(NamedTuple):
    """What a real-time request hands the batcher for its events (:meth:`ServingState.event_tag`)."""

    request_id: str
    """The request's id (its rows' events are ``<request_id>-<row>``)."""
    started: float
    """When the request started (``time.perf_counter``): its events' latency runs from here."""


class ServingState:
    """The model repository (a manager and a batcher per model), event emitter, job store and
    metrics of one worker."""

    def __init__(self, settings: ServingSettings, registry: CollectorRegistry,
                 factory: RuntimeFactory | None = None) -> None:
        self.settings = settings
        self.metrics = ServingMetrics(registry)
        key = settings.sidecar_key
        self.emitter = EventEmitter(
            str(settings.sidecar_url) if settings.sidecar_url else None,
            buffer_rows=settings.event_buffer_rows, batch_size=settings.event_batch_size,
            flush_interval_s=settings.event_flush_interval_s, retry_backoff_s=settings.event_retry_backoff_s,
            retry_backoff_max_s=settings.event_retry_backoff_max_s, max_age_s=settings.event_max_age_s,
            timeout_s=settings.event_timeout_s, max_body_bytes=settings.event_max_body_bytes,
            headers={"Authorization": f"Bearer {key.get_secret_value()}"} if key else None,
            on_sent=lambda model, n: self.metrics.events_sent.labels(model=model).inc(n),
            on_dropped=lambda model, reason, n: self.metrics.events_dropped.labels(
                model=model, reason=reason).inc(n),
            sampler=EventSampler(settings.event_share, settings.event_shares, settings.event_rows_per_s,
                                 settings.event_rows_per_s_by_model, settings.worker_count()),
            on_sampled=self._count_sampled,
        )
        self.repository = ModelRepository(Registry(settings.registry_dir), settings, self.metrics,
                                          self._make_batcher, factory, self.emitter)
        self.jobs = JobStore(settings.jobs_dir, chunk_rows=settings.chunk_rows,  # type: ignore[arg-type]
                             nan_policy=settings.nan_policy, max_upload_bytes=settings.max_upload_bytes,
                             retention_s=settings.job_retention_s)
        self.buffer = MetricBuffer()
        self.closers: list[Callable[[], None]] = []
        """Called at :meth:`stop`, after the models: what the routes started (the explanation
        process), so a stopping worker does not wait for explanations still queued."""
        self._flusher: asyncio.Task[None] | None = None
        # label children cached per model name: .labels() costs a lock and a dict lookup per call
        self._children: dict[tuple[Any, ...], Any] = {}

    def _make_batcher(self) -> AdaptiveBatcher:
        s = self.settings
        return AdaptiveBatcher(
            max_batch_rows=s.max_batch_rows, max_wait_s=s.max_batch_wait_s,
            max_queue_rows=s.max_queue_rows, batching=s.batching,
            inline_below_s=s.inline_below_s, observer=self._observe_batch, on_tagged=self._record_batch,
        )

    @property
    def ready(self) -> bool:
        return self.repository.ready

    async def start(self) -> None:
        await self.repository.start()  # raises ModelLoadError: start-up stops
        await self.emitter.start()
        self._flusher = asyncio.create_task(self._flush_metrics(), name="modelloop-metrics")
        # Modules, BentoML's app and the model stay for the worker's life: move them out of the
        # collector's reach so a full collection scans only what requests allocate. A request
        # allocates dozens of containers, so the default threshold (700) ran a collection every
        # few requests, and objects kept briefly (the event buffer) were promoted and rescanned
        # (its cost per request: docs/serving.md).
        gc.collect()
        gc.freeze()
        gc.set_threshold(self.settings.gc_threshold, 20, 10)
        logger.info("serving %s (default %s; events %s)", ", ".join(self.repository.names()),
                    self.repository.default or "none", self.emitter.url or "off")

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_S)
            self.buffer.flush()

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.repository.stop()
        for close in self.closers:
            try:
                close()
            except Exception:  # the others still close
                logger.exception("closing %r failed", close)
        await self.emitter.stop()
        self.buffer.flush()
        self.jobs.close()

    # -- metrics helpers (hot path) ----------------------------------------------------------
    def child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def _observe_batch(self, runtime: OnnxRuntime, rows: int, elapsed: float, waits: list[float]) -> None:
        name, buffer = runtime.name, self.buffer
        buffer.observe(self.child(self.metrics.inference_duration, name), elapsed)
        buffer.observe(self.child(self.metrics.batch_size, name), rows)
        wait_hist = self.child(self.metrics.queue_wait, name)
        for w in waits:
            buffer.observe(wait_hist, w)

    def event_tag(self, request_id: str, started: float) -> EventTag | None:
        """The tag a real-time request gives the batcher so that its rows become events (None:
        events are off, and the batcher hands nothing on): the one place that decides."""
        return EventTag(request_id, started) if self.emitter.enabled else None

    def _record_batch(self, runtime: OnnxRuntime, x: np.ndarray, preds: Predictions,
                      tagged: list[tuple[Any, int]]) -> None:
        """The events of a model batch's tagged requests (their :class:`EventTag` and row count),
        in one record (real-time mode); each request's latency runs from its start to the end
        of the batch."""
        now = time.perf_counter()
        ids = [tag.request_id for tag, _ in tagged]
        counts = [n for _, n in tagged]
        started = [tag.started for tag, _ in tagged]
        shadow = self.repository.shadow_of(runtime)
        if shadow is not None:  # the challenger scores a copy, later (serving/shadow.py)
            shadow.offer(x, preds, ids, counts)
        if x.ndim != 2:
            x = monitored_features(x, runtime.input_dims)
        meta = runtime.metadata
        self.emitter.record_requests(meta.name, meta.version, ids, counts, x, preds, [now - s for s in started])

    def _count_sampled(self, model: str, kept: int, left_out: int) -> None:
        """Rows whose events the sample kept and left out (any thread: not buffered)."""
        self.child(self.metrics.events_sampled, model, "kept").inc(kept)
        if left_out:
            self.child(self.metrics.events_sampled, model, "left_out").inc(left_out)

    def observe_request(self, model: str, route: str, code: int, seconds: float) -> None:
        self.buffer.inc(self.child(self.metrics.requests, model, route, str(code)))
        self.buffer.observe(self.child(self.metrics.request_duration, model, route), seconds)

    def count_rows(self, model: str, rows: int) -> None:
        """Rows predicted in real time (event-loop thread only: buffered)."""
        self.buffer.inc(self.child(self.metrics.rows, model, "realtime"), rows)

    def count_error(self, model: str, reason: str) -> None:
        self.child(self.metrics.errors, model, reason).inc()

    def count_unknown_categories(self, meta: ModelMetadata, counts: Mapping[str, int]) -> None:
        """Add a request's values unknown to the model's vocabularies (``unknown_counts``) to
        ``modelloop_unknown_category_total`` (any thread: not buffered)."""
        for feature, n in counts.items():
            if n:
                self.child(self.metrics.unknown_categories, meta.name, feature).inc(n)

    def record_batch_chunk(self, runtime: OnnxRuntime, scored: pa.Table, x: np.ndarray,
                           base_id: str, first_row: int) -> None:
        """Rows scored by a batch route: count them and send their events (mode ``batch``).
        Called from job threads too, so the count bypasses the (loop-only) buffer."""
        self.child(self.metrics.rows, runtime.name, "batch").inc(len(x))
        if runtime.categorical:
            self.count_unknown_categories(runtime.metadata, unknown_counts(runtime.metadata, x))
        self.emitter.record(model=runtime.name, version=runtime.model_version, base_id=base_id,
                            x=x, preds=from_columns(runtime.metadata, scored), latency_s=0.0,
                            mode="batch", first_row=first_row)
