"""Prediction events to the monitoring sidecar, off the request path.

The batcher calls :meth:`EventEmitter.record_requests` once per model batch (batch routes call
:meth:`EventEmitter.record` per chunk): it extends the open segment of a bounded buffer, the
requests' ids, row counts and latencies as per-column lists and the batch's arrays by reference
(a few C calls, no serialisation), or, when the buffer is full, counts the rows as dropped. A
background task on the worker's event loop writes each segment as one
:class:`~modelloop.schemas.EventColumns` (one
:class:`~modelloop.schemas.PredictionEvent` per row, column by column, features and probabilities
packed) and POSTs them in batches to ``{sidecar_url}/events`` as a
:class:`~modelloop.schemas.ColumnBatch` (:mod:`serving.poster`), retrying failed sends with
exponential backoff and counting what it finally gives up on. Serving never waits for the
sidecar.

Why a task and not a thread: the body is built in slices of a few hundred rows between which
the task yields to the loop, and the HTTP send is non-blocking. A thread would compete with the
event loop for the GIL in bursts (up to the 5 ms switch interval each time the loop makes a
system call), which cost about a tenth of the throughput and much of the tail latency here.

Example (inside a running event loop)::

    emitter = EventEmitter("http://127.0.0.1:8001", on_sent=..., on_dropped=...)
    await emitter.start()
    emitter.record(model="churn", version=3, base_id="ab12", x=x, preds=preds, latency_s=0.004)
    await emitter.stop()   # sends what is left, bounded by a deadline
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import orjson

from modelloop.schemas import Mode, PackedMatrix
from serving.poster import Poster, poster
from serving.predictions import Predictions

logger = logging.getLogger(__name__)

_SLICE = 256  # rows of a column group at most: the body is built a group at a time, with a yield

# on_sent(model, n), on_dropped(model, reason, n)
SentHook = Callable[[str, int], None]
DroppedHook = Callable[[str, str, int], None]


class _Segment:
    """Events of consecutive requests to one model version, already column by column: per-request
    lists that each record extends (one C call per column, no per-request object) and the model
    batches' arrays. One segment becomes one :class:`~modelloop.schemas.EventColumns` group.

    Only lists of strings and numbers and a few arrays: the garbage collector scans a handful of
    lists instead of an object per request (buffered objects promoted through the generations
    made every full collection slower, which showed as lost throughput with events on)."""

    __slots__ = (
        "counts",
        "first_rows",
        "ids",
        "latencies",
        "mode",
        "model",
        "predictions",
        "probabilities",
        "rows",
        "timestamps",
        "version",
        "widths",
        "xs",
    )

    def __init__(self, model: str, version: int, mode: str, widths: tuple[int, int]) -> None:
        self.model, self.version, self.mode, self.widths = model, version, mode, widths
        self.ids: list[str] = []
        self.first_rows: list[int] = []
        self.counts: list[int] = []
        self.timestamps: list[float] = []
        self.latencies: list[float] = []
        self.xs: list[np.ndarray] = []
        self.predictions: list[np.ndarray] = []
        self.probabilities: list[np.ndarray] = []
        self.rows = 0

    def add(self, ids: Sequence[str], first_rows: Sequence[int], counts: Sequence[int], ts: float,
            latencies: Sequence[float], x: np.ndarray, prediction: np.ndarray,
            probabilities: np.ndarray | None) -> _Segment:
        """Append requests whose rows are stacked in ``x``: each column grows by one extend."""
        self.ids += ids
        self.first_rows += first_rows
        self.counts += counts
        self.timestamps += [ts] * len(ids)
        self.latencies += latencies
        self.xs.append(x)
        self.predictions.append(prediction)
        if probabilities is not None:
            self.probabilities.append(probabilities)
        self.rows += len(x)
        return self

    def cut(self, k: int) -> tuple[_Segment, _Segment]:
        """A one-request segment as its first ``k`` rows and the rest (views, no copy)."""
        x, pred = self.xs[0], self.predictions[0]
        proba = self.probabilities[0] if self.probabilities else None

        def part(rows: slice) -> _Segment:
            return _Segment(self.model, self.version, self.mode, self.widths).add(
                self.ids, [self.first_rows[0] + rows.indices(len(x))[0]], [len(x[rows])], self.timestamps[0],
                self.latencies, x[rows], pred[rows], None if proba is None else proba[rows])

        return part(slice(0, k)), part(slice(k, None))

    def json(self) -> bytes:
        """The segment as one EventColumns object: one orjson call, features and probabilities
        packed as base64 bytes (:class:`~modelloop.schemas.PackedMatrix`; the 30 feature values
        of a row written as text cost about 0.7 us)."""

        def rows(parts: list[np.ndarray]) -> np.ndarray:
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        return orjson.dumps({
            "model": self.model, "version": self.version, "mode": self.mode,
            "request_ids": self.ids, "first_row": self.first_rows, "rows": self.counts,
            "timestamp": self.timestamps, "latency_s": self.latencies,
            "features": PackedMatrix.pack(rows(self.xs)),
            "prediction": rows(self.predictions),
            "probabilities": PackedMatrix.pack(rows(self.probabilities)) if self.probabilities else None,
        }, option=orjson.OPT_SERIALIZE_NUMPY)


class EventEmitter:
    """Bounded, batched, retried event delivery to the sidecar (see the module docstring)."""

    def __init__(
        self,
        sidecar_url: str | None,
        *,
        buffer_rows: int = 100_000,
        batch_size: int = 1000,
        flush_interval_s: float = 0.5,
        max_retries: int = 3,
        retry_backoff_s: float = 0.2,
        timeout_s: float = 2.0,
        on_sent: SentHook | None = None,
        on_dropped: DroppedHook | None = None,
    ) -> None:
        self.url = f"{sidecar_url.rstrip('/')}/events" if sidecar_url else None
        self.buffer_rows = buffer_rows
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.timeout_s = timeout_s
        self.on_sent = on_sent
        self.on_dropped = on_dropped
        self.sent = 0
        self.dropped: dict[str, int] = {"buffer_full": 0, "send_failed": 0}
        # at most _SLICE rows, and batch_size split evenly (500 -> 2 x 250), so a send of whole
        # segments fills batch_size instead of stopping at one segment and a remainder
        self._segment_rows = -(-batch_size // -(-batch_size // _SLICE))
        self._closed: deque[_Segment] = deque()  # full segments, oldest first
        self._open: _Segment | None = None  # the segment records go to
        self._rows = 0
        self._lock = threading.Lock()  # record() is also called from batch-job threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.url is not None

    @property
    def pending_rows(self) -> int:
        return self._rows

    # -- request path ------------------------------------------------------------------------
    def record(self, *, model: str, version: int, base_id: str, x: np.ndarray, preds: Predictions,
               latency_s: float, mode: Mode = "realtime", timestamp: float | None = None,
               first_row: int = 0) -> None:
        """Queue the events of one request, or count them dropped when the buffer is full.

        Row ``i`` gets the request id ``<base_id>-<first_row + i>``."""
        self.record_requests(model=model, version=version, base_ids=(base_id,), counts=(len(x),), x=x,
                             preds=preds, latencies=(latency_s,), mode=mode, timestamp=timestamp,
                             first_rows=(first_row,))

    def record_requests(self, model: str, version: int, base_ids: Sequence[str], counts: Sequence[int],
                        x: np.ndarray, preds: Predictions, latencies: Sequence[float],
                        mode: Mode = "realtime", timestamp: float | None = None,
                        first_rows: Sequence[int] | None = None) -> None:
        """Queue the events of requests whose rows are stacked in ``x`` (``counts[i]`` rows of
        request ``i``, in order; the requests of one model batch): their columns are extended in
        one go, so the per-request cost of events is a share of a few list extends. Rows of
        request ``i`` get the ids ``<base_ids[i]>-<first_rows[i] + k>`` (``first_rows`` 0 by
        default). The requests of one call are sent together (only a single request larger than
        a column group is split)."""
        if self.url is None:
            return
        n = len(x)
        if n == 0:  # a request of no rows has no events (and the sidecar takes none)
            return
        proba = preds.probabilities
        widths = (x.shape[1], -1 if proba is None else proba.shape[1])
        k = len(base_ids)
        with self._lock:
            full = self._rows + n > self.buffer_rows
            if not full:
                large = k == 1 and n > self._segment_rows
                seg = self._open
                if (large or seg is None or (seg.rows and seg.rows + n > self._segment_rows)
                        or seg.version != version or seg.model != model or seg.mode != mode or seg.widths != widths):
                    seg = self._new_segment(model, version, mode, widths)
                seg.add(base_ids, [0] * k if first_rows is None else first_rows, counts,
                        time.time() if timestamp is None else timestamp, latencies, x, preds.prediction, proba)
                if large:  # a closed segment of its own, cut into groups by _take as it is sent
                    self._closed.append(seg)  # (nothing here grows with its size)
                    self._open = None
                self._rows += n
        if full:
            self._drop(model, "buffer_full", n)
        elif self._rows >= self.batch_size:
            self._poke()

    def _new_segment(self, model: str, version: int, mode: str, widths: tuple[int, int]) -> _Segment:
        """Close the open segment and open a new one (with the lock held)."""
        if self._open is not None and self._open.rows:
            self._closed.append(self._open)
        self._open = _Segment(model, version, mode, widths)
        return self._open

    def _poke(self) -> None:
        """Wake the sender now (a full batch is waiting)."""
        if self._wake is None or self._loop is None or self._wake.is_set():
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _drop(self, model: str, reason: str, n: int) -> None:
        with self._lock:  # record() drops from other threads too
            self.dropped[reason] += n
        if self.on_dropped is not None:
            self.on_dropped(model, reason, n)

    # -- sender task -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the sender on the running event loop (nothing happens without a URL)."""
        if self.url is None or self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="modelloop-events")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the sender after a last flush (what cannot be sent by the deadline stays unsent)."""
        if self._task is None:
            return
        self._stopping = True
        assert self._wake is not None
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    def _take(self) -> list[_Segment]:
        """The oldest segments, about batch_size rows: whole segments while they fit (the first
        always goes, so a model batch larger than batch_size goes whole), and the next rows of a
        large request, at most a segment's worth."""
        taken: list[_Segment] = []
        room = self.batch_size
        with self._lock:
            if self._open is not None and self._open.rows:
                self._closed.append(self._open)
            self._open = None
            closed = self._closed
            while closed and room > 0:
                seg = closed[0]
                piece = min(room, self._segment_rows)
                if len(seg.ids) == 1 and seg.rows > piece:
                    seg, closed[0] = seg.cut(piece)
                elif seg.rows <= room or not taken:
                    closed.popleft()
                else:
                    break
                taken.append(seg)
                room -= seg.rows
                self._rows -= seg.rows
        return taken

    @staticmethod
    async def _body(segments: list[_Segment]) -> bytes:
        """The ColumnBatch JSON: one column group per segment, with a yield to the loop between
        groups (a group is at most _SLICE rows unless one model batch was larger)."""
        groups: list[bytes] = []
        for seg in segments:
            if groups:
                await asyncio.sleep(0)  # let requests in between groups
            groups.append(seg.json())
        return b'{"columns":[' + b",".join(groups) + b"]}"

    async def _run(self) -> None:
        assert self._wake is not None and self.url is not None
        client = poster(self.url, self.timeout_s)
        try:
            while True:
                if self._rows < self.batch_size and not self._stopping:
                    # a poke left over from before the last send must not cut this wait short:
                    # that would send many small batches, each costing a whole HTTP request
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
                segments = self._take()
                if segments:
                    await self._send(client, segments)
                elif self._stopping:
                    return
        finally:
            await client.aclose()

    async def _send(self, client: Poster, segments: list[_Segment]) -> None:
        body = await self._body(segments)
        n = sum(seg.rows for seg in segments)
        model = segments[0].model
        delay = self.retry_backoff_s
        assert self.url is not None
        problem = ""
        for attempt in range(self.max_retries + 1):
            try:
                answer = await client.post(body)
                if answer.status == 200:
                    self.sent += n
                    if self.on_sent is not None:
                        self.on_sent(model, n)
                    return
                problem = f"HTTP {answer.status}: {answer.text[:200]}"
                if 400 <= answer.status < 500 and answer.status not in (408, 429):
                    break  # the sidecar refuses these events; sending them again cannot help
            except Exception as exc:  # connection refused, timeout, ...: the sidecar is away
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < self.max_retries and not self._stopping:
                await asyncio.sleep(delay)
                delay *= 2
        logger.warning("dropped %d prediction events: sidecar %s: %s", n, self.url, problem)
        self._drop(model, "send_failed", n)
