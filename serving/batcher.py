"""Adaptive batching across concurrent requests, with a bounded queue that sheds load.

Requests put their rows on one queue per worker; a single consumer task takes everything that
queued up (same model version, up to ``max_batch_rows``) and runs it as one ONNX Runtime call. At
low load a request runs alone at once; under load, rows pile up while the previous batch runs and
the next call takes them together, so batches grow with the load and add no fixed delay
(``max_wait_s`` lets a batch wait for more while requests keep arriving, for heavy models).

A batch the warm-up cost model expects to run in less than ``inline_below_s`` runs on the event
loop, where a thread hand-off would cost more than the call; a slower one, and every batch of a
heavy model, runs on a thread so the loop keeps reading requests (and filling the next batch)
meanwhile.

The batcher only merges and splits. A request may carry an opaque ``tag``; after each call the
rows of the tagged requests go, with their tags, to one hook (``on_tagged``: the serving state
turns them into prediction events).

When the queue holds ``max_queue_rows``, new requests fail at once with :class:`Overloaded` (the
routes answer 503 with ``Retry-After``) instead of waiting without bound.

Example::

    batcher = AdaptiveBatcher(max_batch_rows=256, max_queue_rows=16384)
    await batcher.start()
    result = await batcher.predict(runtime, x)   # result.outputs, result.queue_wait_s
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from serving.predictions import Predictions, interpret
from serving.runtime import OnnxRuntime

logger = logging.getLogger(__name__)


HEAVY_BATCHES = 8
"""A model whose full batch (``max_batch_rows``) would take more than this many times
``inline_below_s`` (4 ms at the defaults; the benchmark's 4x1024 MLP takes about 10) is heavy:
all its batches run on the ONNX Runtime thread (:meth:`AdaptiveBatcher._inline`)."""


class Overloaded(Exception):
    """The queue is full: shed this request; retry after ``retry_after_s``."""

    def __init__(self, queued_rows: int, retry_after_s: float) -> None:
        super().__init__(f"{queued_rows} rows are already waiting for the model")
        self.queued_rows = queued_rows
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class BatchResult:
    outputs: dict[str, np.ndarray]
    predictions: Predictions
    """The outputs read as predictions (:func:`~serving.predictions.interpret`, once per batch)."""
    queue_wait_s: float
    runtime: OnnxRuntime


@dataclass(slots=True)
class _Item:
    runtime: OnnxRuntime
    x: np.ndarray
    future: asyncio.Future[BatchResult]
    enqueued: float
    tag: object | None
    """The caller's, opaque to the batcher: a tagged request's rows go to the ``on_tagged`` hook."""


# Called after each ONNX Runtime call: (runtime, rows, inference seconds, queue waits).
BatchObserver = Callable[[OnnxRuntime, int, float, list[float]], None]
TaggedHook = Callable[[OnnxRuntime, np.ndarray, Predictions, list[tuple[object, int]]], None]
"""Called after each ONNX Runtime call that served tagged requests whose callers still wait:
(runtime, the rows of those requests and their predictions, in order, and each one's (tag, row
count)). The whole batch when every request of it is such a request."""


class AdaptiveBatcher:
    """Merges concurrent requests into ONNX Runtime calls (see the module docstring)."""

    def __init__(
        self,
        *,
        max_batch_rows: int = 256,
        max_wait_s: float = 0.0,
        max_queue_rows: int = 16384,
        batching: bool = True,
        inline_below_s: float = 0.0005,
        observer: BatchObserver | None = None,
        on_tagged: TaggedHook | None = None,
    ) -> None:
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_s
        self.max_queue_rows = max_queue_rows
        self.batching = batching
        self.inline_below_s = inline_below_s
        self.observer = observer
        self.on_tagged = on_tagged
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._recent_s_per_row = 0.0

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
        self._task = asyncio.create_task(self._run(), name="modelloop-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop the consumer."""
        if self._task is None:
            return
        deadline = time.monotonic() + 10
        while self._queue and time.monotonic() < deadline and not self._task.done():
            await asyncio.sleep(0.01)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(Overloaded(0, 1.0))
        self._queue.clear()
        self._queued_rows = 0
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = None

    async def predict(self, runtime: OnnxRuntime, x: np.ndarray, tag: object | None = None) -> BatchResult:
        """Queue ``x`` for ``runtime`` and wait for its outputs. Raises Overloaded when full.
        With a ``tag`` (anything but None), the rows and their predictions go to the
        ``on_tagged`` hook, with the tag, after the call that ran them."""
        if self._wakeup is None:
            raise RuntimeError("the batcher is not started")
        rows = len(x)
        if self._queued_rows and self._queued_rows + rows > self.max_queue_rows:
            per_row = self._recent_s_per_row or runtime.cost.per_row_s
            raise Overloaded(self._queued_rows, max(1.0, self._queued_rows * per_row))
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(runtime, x, future, time.perf_counter(), tag))
        self._queued_rows += rows
        self._wakeup.set()
        return await future

    def _take(self) -> list[_Item]:
        """The next batch: queued items of the first item's model version and input shape, up to
        the row limit."""
        first = self._queue.popleft()
        items = [first]
        rows = len(first.x)
        if self.batching:
            queue = self._queue
            shape = first.x.shape[1:]  # a sequence model's requests may differ in length
            while (queue and queue[0].runtime is first.runtime and queue[0].x.shape[1:] == shape
                   and rows + len(queue[0].x) <= self.max_batch_rows):
                item = queue.popleft()
                items.append(item)
                rows += len(item.x)
        self._queued_rows -= rows
        return items

    async def _fill(self) -> None:
        """Wait for a fuller batch while requests keep arriving: until a gap of a few hundred
        microseconds with no new request, the batch is full, or max_wait_s has passed since the
        oldest request. Under closed-loop load this lets the clients whose answers just went out
        send their next request into this batch instead of the next one."""
        assert self._wakeup is not None
        deadline = self._queue[0].enqueued + self.max_wait_s
        gap = max(0.0002, self.max_wait_s / 8)
        while self._queued_rows < self.max_batch_rows:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), min(gap, remaining))
            except TimeoutError:
                return  # nothing new arrived for a while: run what we have

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.batching and self.max_wait_s > 0:
                await self._fill()
            items = self._take()
            try:
                await self._run_batch(loop, items)
            except Exception as exc:  # the model failed: every request of the batch gets the error
                logger.exception("inference failed for %d requests", len(items))
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)

    def _inline(self, runtime: OnnxRuntime, rows: float) -> bool:
        """Whether a batch of ``rows`` runs on the event loop: when the cost model expects it
        below ``inline_below_s``, unless the model is heavy, its full batch past
        ``HEAVY_BATCHES`` times that. A heavy model always runs on the thread, so the loop keeps
        reading requests while it runs and they pile up into its next batch (run inline, even
        its small batches held the loop, and its batches stayed small). A light one's batches
        run inline by their own size: judged at the full batch, a cost model fitted under load
        (0.2-0.7 ms for a 0.08 ms model, its calls slowed by the load sharing the cores) sent
        every batch of a small model through a hand-off: 0.73x against 0.79x req/s over 10
        models in BENCHMARKS.md, where batches hold a row or two."""
        cost = runtime.cost
        return (cost.estimate(rows) < self.inline_below_s
                and cost.estimate(self.max_batch_rows) < HEAVY_BATCHES * self.inline_below_s)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        runtime = items[0].runtime
        x = items[0].x if len(items) == 1 else np.concatenate([i.x for i in items])
        rows = len(x)
        start = time.perf_counter()
        if self._inline(runtime, runtime.work_rows(x)):
            outputs = runtime.predict(x)
        else:
            outputs = await loop.run_in_executor(self._executor, runtime.predict, x)
        elapsed = time.perf_counter() - start
        self._recent_s_per_row = elapsed / rows
        waits = [start - i.enqueued for i in items]
        preds = interpret(runtime.metadata, outputs)  # once per batch, each request gets its rows
        if len(items) == 1:
            item = items[0]
            if not item.future.done():  # done: the client went away
                item.future.set_result(BatchResult(outputs, preds, waits[0], runtime))
        else:
            offset = 0
            for item, wait in zip(items, waits, strict=True):
                part = slice(offset, offset + len(item.x))
                offset = part.stop
                if not item.future.done():
                    item.future.set_result(BatchResult({k: v[part] for k, v in outputs.items()},
                                                       preds.rows(part), wait, runtime))
        if self.observer is not None:
            self.observer(runtime, rows, elapsed, waits)
        if self.on_tagged is not None:
            self._hand_tagged(self.on_tagged, runtime, x, preds, items)

    @staticmethod
    def _hand_tagged(hook: TaggedHook, runtime: OnnxRuntime, x: np.ndarray, preds: Predictions,
                     items: list[_Item]) -> None:
        """Hand the rows of the tagged requests to ``hook``; a request whose caller went away
        (its future cancelled) got no answer, so its rows are left out too. A failure here is
        logged and never reaches the requests."""
        tagged = [i for i in items if i.tag is not None and not i.future.cancelled()]
        if not tagged:
            return
        try:
            if len(tagged) < len(items):  # only some requests: their rows only
                wanted = set(map(id, tagged))
                ends = np.cumsum([len(i.x) for i in items])
                keep = np.concatenate([np.arange(e - len(i.x), e)
                                       for i, e in zip(items, ends, strict=True) if id(i) in wanted])
                x, preds = x[keep], preds.rows(keep)
            hook(runtime, x, preds, [(i.tag, len(i.x)) for i in tagged])
        except Exception:
            logger.exception("the tagged-rows hook failed for %d requests", len(tagged))


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds (at least 1)."""
    return str(max(1, math.ceil(seconds)))
