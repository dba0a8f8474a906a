"""Shadow traffic: the version a model's ``challenger`` alias names answers a copy of the
production traffic, off the request path, and its answers go to the sidecar as shadow events.

While the alias names a version other than production, :mod:`serving.repository` loads it
beside production with its own :class:`~serving.models.ModelManager` (it swaps without downtime
when the alias moves). After each production model batch, the serving state hands the batch's
rows, request ids and production's predictions to :meth:`Shadow.offer`, which only appends them
to a bounded queue (no copy, no inference): callers already have their answers. One task scores
the queue (the batches that piled up, together) on a worker thread, or on the loop when a call
is faster than a thread hand-off (production's batcher's rule), and records the challenger's
predictions as events of mode ``shadow`` under the same request ids, so the sidecar joins a
label to both answers (:mod:`monitoring.live_gate` compares them).

``MODELLOOP_SERVING_SHADOW_SHARE`` has the challenger score a share of the rows only, chosen by
request id with the event sample's rule (:mod:`modelloop.sampling`): the same requests on every
worker, never one whose production event is not sent, always one marked as to be labelled. The
shadow is always the first to give way: a batch that does not fit the queue
(``MODELLOOP_SERVING_SHADOW_QUEUE_ROWS``) is dropped and counted, a challenger that fails or is
slow only loses its own answers, and callers never wait for it. Shadow needs the sidecar
(``MODELLOOP_SERVING_SIDECAR_URL``): its answers are only useful there.

``modelloop_serving_shadow_rows_total{model, result}`` counts rows ``scored``, ``dropped``
(queue full, or the worker stopping) and ``failed``; ``..._shadow_agreement_rows_total`` the
scored rows where the challenger predicted what production did (the agreement a dashboard
shows is their ratio).

Example (inside a running event loop)::

    shadow = Shadow("churn", manager, emitter, metrics, queue_rows=4096)
    await shadow.start()
    shadow.offer(x, production_predictions, ["req-1", "req-2"], [3, 1])
    await shadow.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from modelloop.sampling import quantize
from modelloop.schemas import MODE_SHADOW, monitored_features
from serving.events import EventEmitter
from serving.metrics import ServingMetrics
from serving.models import ModelManager
from serving.predictions import Predictions, interpret
from serving.sampling import EventSampler

logger = logging.getLogger(__name__)


class _Copy(NamedTuple):
    x: np.ndarray
    production: np.ndarray
    ids: Sequence[str]
    first_rows: Sequence[int]
    counts: Sequence[int]


class Shadow:
    """The challenger of one served model scoring copies of production batches (module
    docstring)."""

    def __init__(self, name: str, manager: ModelManager, emitter: EventEmitter,
                 metrics: ServingMetrics, queue_rows: int, *, max_call_rows: int = 256,
                 inline_below_s: float = 0.0005, share: float = 1.0) -> None:
        self.name = name
        self.manager = manager
        self.emitter = emitter
        self.share = quantize(share)
        self._sample = EventSampler(self.share)  # the rule that picks the rows (no budget)
        self.queue_rows = queue_rows
        self.max_call_rows = max_call_rows
        self.inline_below_s = inline_below_s
        self._queue: deque[_Copy] = deque()
        self._rows = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self._scored = metrics.shadow_rows.labels(model=name, result="scored")
        self._dropped = metrics.shadow_rows.labels(model=name, result="dropped")
        self._failed = metrics.shadow_rows.labels(model=name, result="failed")
        self._agreed = metrics.shadow_agreement.labels(model=name)
        self._duration = metrics.shadow_inference_duration.labels(model=name)

    @property
    def version(self) -> int:
        return self.manager.current.model_version

    @property
    def queued_rows(self) -> int:
        """Rows waiting for the challenger or being scored."""
        return self._rows

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"modelloop-shadow-{self.name}")

    def offer(self, x: np.ndarray, production: Predictions, ids: Sequence[str],
              counts: Sequence[int]) -> None:
        """Queue a copy of a production batch (event-loop thread; never blocks): its rows under
        the share (those the event sample keeps too: see ``MODELLOOP_SERVING_SHADOW_SHARE``),
        dropped and counted when the queue cannot hold them."""
        share = self.share
        if self.emitter.sampler is not None:  # (no rows the sidecar would get no event of)
            share = min(share, self.emitter.sampler.share(self.name))
        first_rows: Sequence[int] = [0] * len(ids)
        prediction = production.prediction
        if share < 1.0:
            sampler = self._sample if share == self.share else EventSampler(share)
            kept, _ = sampler.select(self.name, ids, first_rows, counts, measure=False)
            if kept.rows is not None:
                if not len(kept.rows):
                    return
                ids, first_rows, counts = [ids[r] for r in kept.requests], kept.first_rows, kept.counts
                x, prediction = x[kept.rows], prediction[kept.rows]
        n = len(x)
        if self._rows + n > self.queue_rows:
            self._dropped.inc(n)
            return
        self._queue.append(_Copy(x, prediction, ids, first_rows, counts))
        self._rows += n
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                item = self._take()
                try:
                    await self._score(item)
                except Exception:  # the task must outlive any failure: it is the only consumer
                    self._failure(len(item.x))
                finally:
                    self._rows -= len(item.x)  # held until scored: queued_rows counts them

    def _failure(self, rows: int) -> None:
        """Count a failed batch; log the first and then every 100th (a challenger that fails
        on every batch must not flood the log)."""
        self._failed.inc(rows)
        self._failures += 1
        if self._failures % 100 == 1:
            logger.exception("%s: shadow v%d failed on %d rows (%d failed batches so far)", self.name,
                             self.manager.current.model_version if self.manager.ready else -1, rows,
                             self._failures)

    def _take(self) -> _Copy:
        """The batches that piled up while the challenger ran, as one copy (one call, one group
        of events), up to ``max_call_rows`` rows (a larger batch goes alone)."""
        items = [self._queue.popleft()]
        rows, shape = len(items[0].x), items[0].x.shape[1:]
        while (self._queue and rows + len(self._queue[0].x) <= self.max_call_rows
               and self._queue[0].x.shape[1:] == shape):
            items.append(self._queue.popleft())
            rows += len(items[-1].x)
        if len(items) == 1:
            return items[0]
        return _Copy(np.concatenate([i.x for i in items]), np.concatenate([i.production for i in items]),
                     [rid for i in items for rid in i.ids], [f for i in items for f in i.first_rows],
                     [c for i in items for c in i.counts])

    async def _score(self, item: _Copy) -> None:
        runtime = self.manager.current
        start = time.perf_counter()
        # (a failure raises to _run, which counts it: the challenger's failure is its own)
        # as production's batcher does: a call faster than a thread hand-off runs on the loop
        if runtime.cost.estimate(runtime.work_rows(item.x)) < self.inline_below_s:
            outputs = runtime.predict(item.x)
        else:
            outputs = await asyncio.to_thread(runtime.predict, item.x)
        preds = interpret(runtime.metadata, outputs)
        elapsed = time.perf_counter() - start
        self._duration.observe(elapsed)
        self._scored.inc(len(item.x))
        self._agreed.inc(int(np.count_nonzero(preds.prediction == item.production)))
        meta = runtime.metadata
        x = item.x if item.x.ndim == 2 else monitored_features(item.x, runtime.input_dims)
        self.emitter.record_requests(meta.name, meta.version, item.ids, item.counts, x, preds,
                                     [elapsed] * len(item.ids), mode=MODE_SHADOW, first_rows=item.first_rows)

    async def close(self) -> None:
        """Stop scoring (what is queued is dropped and counted) and free the challenger."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._rows:
            self._dropped.inc(self._rows)
        self._queue.clear()
        self._rows = 0
        await self.manager.close()
