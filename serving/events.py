"""Prediction events to the monitoring sidecar, off the request path.

The batcher calls :meth:`EventEmitter.record_requests` once per model batch (batch routes call
:meth:`EventEmitter.record` per chunk): it appends a reference to the batch's arrays, with the
requests' ids, row counts and latencies, to a bounded buffer (O(1), no serialisation) or, when the
buffer is full, counts the rows as dropped. A background task on the worker's event loop writes
the buffer as :class:`~modelloop.schemas.EventColumns` (one
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
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import orjson

from modelloop.schemas import Mode, PackedMatrix
from serving.poster import Poster, poster
from serving.predictions import Predictions

logger = logging.getLogger(__name__)

_SLICE = 256  # events built between two yields to the event loop
# on_sent(model, n), on_dropped(model, reason, n)
SentHook = Callable[[str, int], None]
DroppedHook = Callable[[str, str, int], None]


class _Chunk(NamedTuple):
    """The events of one request, or of the requests of one model batch, still as arrays.

    A tuple of strings, numbers, tuples of them and numeric arrays on purpose: the garbage
    collector stops tracking such tuples, so thousands of buffered requests do not get promoted
    through the generations and make every full collection slower (which showed as lost
    throughput and tail latency with events on)."""

    model: str
    version: int
    mode: str
    base_ids: tuple[str, ...]
    first_rows: tuple[int, ...]
    counts: tuple[int, ...]
    """Rows of each request, in the order of the arrays' rows."""
    latencies: tuple[float, ...]
    x: np.ndarray
    prediction: np.ndarray
    probabilities: np.ndarray | None
    start: int
    stop: int
    """The rows of the arrays still to send (only a one-request chunk is ever split)."""
    timestamp: float

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def requests(self) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...], tuple[float, ...]]:
        """Base ids, first rows, row counts and latencies of the requests of the rows to send."""
        if len(self.base_ids) == 1:
            return self.base_ids, (self.first_rows[0] + self.start,), (self.rows,), self.latencies
        return self.base_ids, self.first_rows, self.counts, self.latencies


def _key(c: _Chunk) -> tuple[str, int, str, int, int]:
    """Chunks with the same key go into one column group."""
    return (c.model, c.version, c.mode, c.x.shape[1],
            -1 if c.probabilities is None else c.probabilities.shape[1])


def _group_columns(group: list[_Chunk]) -> bytes:
    """One :class:`~modelloop.schemas.EventColumns` of chunks with the same key: one orjson call
    writes the group, features and probabilities packed as base64 bytes
    (:class:`~modelloop.schemas.PackedMatrix`; the 30 feature values of a row written as text
    cost about 0.7 us), a fifth of the cost of one JSON object per event, which showed as a
    tenth of a worker's throughput with events on."""
    whole = all(c.start == 0 and c.stop == len(c.x) for c in group)  # no request was split

    def rows(get: Callable[[_Chunk], np.ndarray]) -> np.ndarray:
        parts = [get(c) for c in group] if whole else [get(c)[c.start:c.stop] for c in group]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    first = group[0]
    ids, firsts, counts, latencies = zip(*map(_Chunk.requests, group), strict=True)
    flat = itertools.chain.from_iterable
    return orjson.dumps({
        "model": first.model, "version": first.version, "mode": first.mode,
        "request_ids": list(flat(ids)),
        "first_row": list(flat(firsts)),
        "rows": list(flat(counts)),
        "timestamp": list(flat(itertools.repeat(c.timestamp, len(c.base_ids)) for c in group)),
        "latency_s": list(flat(latencies)),
        "features": PackedMatrix.pack(rows(lambda c: c.x)),
        "prediction": rows(lambda c: c.prediction),
        "probabilities": None if first.probabilities is None else PackedMatrix.pack(rows(
            lambda c: c.probabilities)),  # type: ignore[arg-type, return-value]
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
        self._buffer: deque[_Chunk] = deque()
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

    def record_requests(self, *, model: str, version: int, base_ids: tuple[str, ...],
                        counts: tuple[int, ...], x: np.ndarray, preds: Predictions,
                        latencies: tuple[float, ...], mode: Mode = "realtime",
                        timestamp: float | None = None, first_rows: tuple[int, ...] | None = None) -> None:
        """Queue the events of requests whose rows are stacked in ``x`` (``counts[i]`` rows of
        request ``i``, in order; the requests of one model batch): one buffer entry for all of
        them, so the per-request cost of events is a share of one append. Rows of request ``i``
        get the ids ``<base_ids[i]>-<first_rows[i] + k>`` (``first_rows`` 0 by default)."""
        if self.url is None:
            return
        n = len(x)
        if first_rows is None:
            first_rows = (0,) * len(base_ids)
        with self._lock:
            if self._rows + n > self.buffer_rows:
                full = True
            else:
                full = False
                self._buffer.append(_Chunk(model, version, mode, base_ids, first_rows, counts, latencies, x,
                                           preds.prediction, preds.probabilities, 0, n,
                                           time.time() if timestamp is None else timestamp))
                self._rows += n
        if full:
            self._drop(model, "buffer_full", n)
        elif self._rows >= self.batch_size:
            self._poke()

    def _poke(self) -> None:
        """Wake the sender now (a full batch is waiting)."""
        if self._wake is None or self._loop is None or self._wake.is_set():
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _drop(self, model: str, reason: str, n: int) -> None:
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

    def _take(self) -> list[_Chunk]:
        """About batch_size rows from the front of the buffer: a large request is split, a model
        batch of requests is sent whole."""
        taken: list[_Chunk] = []
        room = self.batch_size
        with self._lock:
            if self._rows <= room:  # the usual case: everything buffered fits, take it at once
                taken, self._buffer, self._rows = list(self._buffer), deque(), 0
                return taken
            while self._buffer and room > 0:
                chunk = self._buffer[0]
                if chunk.rows <= room or (len(chunk.base_ids) > 1 and not taken):
                    self._buffer.popleft()  # (a batch of requests goes whole, even a bit over)
                    taken.append(chunk)
                elif len(chunk.base_ids) > 1:
                    break  # it goes whole in the next send
                else:  # a large request: send its first rows now, keep the rest at the front
                    taken.append(chunk._replace(stop=chunk.start + room))
                    self._buffer[0] = chunk._replace(start=chunk.start + room)
                room -= taken[-1].rows
                self._rows -= taken[-1].rows
        return taken

    async def _body(self, chunks: list[_Chunk]) -> bytes:
        """The ColumnBatch JSON: one column group per run of chunks of the same model version
        and widths (they differ only across a model swap), at most _SLICE rows each, with a
        yield to the loop between groups."""
        groups: list[bytes] = []
        group: list[_Chunk] = []
        group_key: tuple[str, int, str, int, int] | None = None
        size = 0
        for c in chunks:
            key = _key(c)  # once per chunk: this loop runs once per buffer entry
            if group and (size >= _SLICE or key != group_key):
                groups.append(_group_columns(group))
                group, size = [], 0
                await asyncio.sleep(0)  # let requests in between slices
            if not group:
                group_key = key
            group.append(c)
            size += c.rows
        if group:
            groups.append(_group_columns(group))
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
                chunks = self._take()
                if chunks:
                    await self._send(client, chunks)
                elif self._stopping:
                    return
        finally:
            await client.aclose()

    async def _send(self, client: Poster, chunks: list[_Chunk]) -> None:
        body = await self._body(chunks)
        n = sum(c.rows for c in chunks)
        model = chunks[0].model
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
