"""Prediction events to the monitoring sidecar, off the request path.

The request path calls :meth:`EventEmitter.record` once per request: it appends a reference to the
request's arrays to a bounded buffer (O(1), no serialisation) or, when the buffer is full, counts
the rows as dropped. A background thread expands the buffer into one
:class:`~modelloop.schemas.PredictionEvent` per row and POSTs them in batches to
``{sidecar_url}/events`` as an :class:`~modelloop.schemas.EventBatch`, retrying failed sends with
exponential backoff and counting what it finally gives up on. Serving never waits for the sidecar.

Example::

    emitter = EventEmitter("http://127.0.0.1:8001", on_sent=..., on_dropped=...)
    emitter.start()
    emitter.record(model="churn", version=3, base_id="ab12", x=x, preds=preds, latency_s=0.004)
    emitter.stop()   # sends what is left, bounded by a deadline
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from modelloop.schemas import Mode
from serving.predictions import Predictions

logger = logging.getLogger(__name__)

# on_sent(model, n), on_dropped(model, reason, n)
SentHook = Callable[[str, int], None]
DroppedHook = Callable[[str, str, int], None]


@dataclass(slots=True)
class _Chunk:
    """The events of one request (or a slice of one), still as arrays."""

    model: str
    version: int
    mode: Mode
    base_id: str
    first_row: int
    x: np.ndarray
    preds: Predictions
    start: int
    stop: int
    latency_s: float
    timestamp: float

    @property
    def rows(self) -> int:
        return self.stop - self.start


def request_ids(base_id: str, n: int) -> list[str]:
    """Per-row request ids of a request: ``<base>-<row>``; feedback joins on these."""
    return [f"{base_id}-{i}" for i in range(n)]


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
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

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
        if self.url is None:
            return
        n = len(x)
        with self._lock:
            if self._rows + n > self.buffer_rows:
                full = True
            else:
                full = False
                self._buffer.append(_Chunk(model, version, mode, base_id, first_row, x, preds, 0, n, latency_s,
                                           time.time() if timestamp is None else timestamp))
                self._rows += n
        if full:
            self._drop(model, "buffer_full", n)
        elif self._rows >= self.batch_size:
            self._wake.set()

    def _drop(self, model: str, reason: str, n: int) -> None:
        self.dropped[reason] += n
        if self.on_dropped is not None:
            self.on_dropped(model, reason, n)

    # -- sender thread -----------------------------------------------------------------------
    def start(self) -> None:
        if self.url is None or self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="modelloop-events", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the sender after a last flush (what cannot be sent by the deadline is dropped)."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout_s)
        self._thread = None

    def _take(self) -> list[_Chunk]:
        """Up to batch_size rows from the front of the buffer (splitting a large request)."""
        taken: list[_Chunk] = []
        room = self.batch_size
        with self._lock:
            while self._buffer and room > 0:
                chunk = self._buffer[0]
                if chunk.rows <= room:
                    self._buffer.popleft()
                    taken.append(chunk)
                else:
                    part = _Chunk(chunk.model, chunk.version, chunk.mode, chunk.base_id, chunk.first_row, chunk.x,
                                  chunk.preds, chunk.start, chunk.start + room, chunk.latency_s,
                                  chunk.timestamp)
                    chunk.start += room
                    taken.append(part)
                room -= taken[-1].rows
                self._rows -= taken[-1].rows
        return taken

    @staticmethod
    def _events(chunks: list[_Chunk]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for c in chunks:
            preds = c.preds
            values = preds.prediction[c.start:c.stop].tolist()
            proba = preds.probabilities[c.start:c.stop] if preds.probabilities is not None else None
            for k, i in enumerate(range(c.start, c.stop)):
                events.append({
                    "request_id": f"{c.base_id}-{c.first_row + i}",
                    "timestamp": c.timestamp,
                    "model": c.model,
                    "version": c.version,
                    "mode": c.mode,
                    "features": c.x[i],  # numpy row; NaN is written as null
                    "prediction": values[k],
                    "probabilities": None if proba is None else proba[k],
                    "latency_s": c.latency_s,
                })
        return events

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=self.timeout_s) as client:
            while True:
                stopping = self._stopping.is_set()
                if self._rows < self.batch_size and not stopping:
                    self._wake.wait(self.flush_interval_s)
                    self._wake.clear()
                chunks = self._take()
                if chunks:
                    self._send(client, chunks)
                elif stopping:
                    return

    def _send(self, client: Any, chunks: list[_Chunk]) -> None:
        events = self._events(chunks)
        body = orjson.dumps({"events": events}, option=orjson.OPT_SERIALIZE_NUMPY)
        n = len(events)
        model = chunks[0].model
        delay = self.retry_backoff_s
        assert self.url is not None
        for attempt in range(self.max_retries + 1):
            problem = ""
            try:
                resp = client.post(self.url, content=body, headers={"content-type": "application/json"})
                if resp.status_code == 200:
                    self.sent += n
                    if self.on_sent is not None:
                        self.on_sent(model, n)
                    return
                problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):
                    break  # the sidecar refuses these events; sending them again cannot help
            except Exception as exc:  # connection refused, timeout, ...: the sidecar is away
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < self.max_retries and not self._stopping.is_set():
                self._stopping.wait(delay)
                delay *= 2
        logger.warning("dropped %d prediction events: sidecar %s: %s", n, self.url, problem)
        self._drop(model, "send_failed", n)
