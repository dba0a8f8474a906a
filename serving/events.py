"""Prediction events to the monitoring sidecar, off the request path.

The batcher calls :meth:`EventEmitter.record_requests` once per model batch (batch routes call
:meth:`EventEmitter.record` per chunk): it extends the open segment of its model (and mode) in a
bounded buffer, the requests' ids, row counts and latencies as per-column lists and the batch's
arrays by reference (a few C calls, no serialisation). A background task on the worker's event
loop writes each segment as one :class:`~modelloop.schemas.EventColumns` (one
:class:`~modelloop.schemas.PredictionEvent` per row, column by column, features and probabilities
packed) and POSTs them in batches to ``{sidecar_url}/events`` as a
:class:`~modelloop.schemas.ColumnBatch` over one kept-alive aiohttp connection
(:class:`SidecarClient`). Serving never waits for the sidecar.

While the sidecar is away (refused connections, timeouts, 5xx, 408, 429), the batch being sent
stays at the head of the buffer and is sent again, in order, after a backoff that doubles up to a
cap, with jitter, and never shorter than the sidecar's ``Retry-After``; newer events wait behind
it. Sending again is safe: the sidecar stores an event once per request id. Events are dropped,
and counted by reason, only as the oldest first: to make room in a full buffer
(``buffer_full``), past the age limit (``expired``), when the sidecar refuses them with another
4xx (``rejected``: the key, the size or the events are wrong, so sending again cannot help), or
when the worker stops before they could be sent (``shutdown``).

Why a task and not a thread: the body is built in slices of a few hundred rows between which
the task yields to the loop, and the HTTP send is non-blocking. A thread would compete with the
event loop for the GIL in bursts (up to the switch interval each time the loop makes a system
call), which cost throughput and much of the tail latency (measured: docs/serving.md).

Example (inside a running event loop)::

    emitter = EventEmitter("http://127.0.0.1:8001", headers={"Authorization": "Bearer k"},
                           on_sent=..., on_dropped=...)
    await emitter.start()
    emitter.record(model="churn", version=3, base_id="ab12", x=x, preds=preds, latency_s=0.004)
    await emitter.stop()   # sends what is left, bounded by a deadline
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import NamedTuple

import aiohttp
import numpy as np
import orjson

from modelloop.schemas import MODE_SHADOW, Mode, PackedMatrix
from serving.predictions import Predictions
from serving.sampling import EventSampler

logger = logging.getLogger(__name__)

_SLICE = 256  # rows of a column group at most: the body is built a group at a time, with a yield
MAX_BODY_BYTES = 16 * 1024 * 1024
"""The largest body of events sent in one POST by default: half the sidecar's default
MODELLOOP_MONITOR_MAX_BODY_BYTES (32 MiB), which refuses a larger body whole. A flight is
bounded in rows (batch_size), but rows of long categories are large: 1,000 rows of nine
1,024-character categories of emoji write 37 MB."""

# on_sent(model, n), on_dropped(model, reason, n), on_sampled(model, rows kept, rows left out)
SentHook = Callable[[str, int], None]
DroppedHook = Callable[[str, str, int], None]
SampledHook = Callable[[str, int, int], None]
DROP_REASONS = ("buffer_full", "expired", "rejected", "shutdown")


def new_request_id() -> str:
    """An id for a request that came without one: the microseconds since the epoch (13 hex
    digits), then 32 random bits. Ids that grow with time land next to each other in the
    sidecar's unique request-id index, where random ones each dirty another page: at 1M stored
    events, 13.8 against 46.2 us of SQLite store CPU per event (BENCHMARKS.md)."""
    return f"{time.time_ns() // 1000:013x}{secrets.token_hex(4)}"


class Answer(NamedTuple):
    status: int
    text: str
    retry_after: float | None = None
    """Seconds the sidecar asked to wait (``Retry-After``), None when it did not say."""


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, delay-seconds or an HTTP date (None when
    absent or unreadable; a date in the past is 0)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


class SidecarClient:
    """POSTs event bodies to one URL over one kept-alive connection (aiohttp; http or https).

    ``post`` returns the answer, or raises (refused, timed out, cut short); the emitter's
    retries, backoff and ``Retry-After`` decide what happens next. Made inside the running loop.
    """

    def __init__(self, url: str, timeout_s: float, headers: Mapping[str, str] | None = None) -> None:
        self.url = url
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1),
            headers={**(headers or {}), "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def post(self, body: bytes) -> Answer:
        try:
            return await self._post(body)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            # most often a kept-alive connection the sidecar closed while it was idle (then the
            # send fails at once, reset or disconnected); sending again at once, on a new
            # connection, is safe: the sidecar stores an event once per request id
            return await self._post(body)

    async def _post(self, body: bytes) -> Answer:
        async with self._session.post(self.url, data=body) as resp:
            text = await resp.text(errors="replace")
            return Answer(resp.status, text, retry_after(resp.headers.get("Retry-After")))

    async def aclose(self) -> None:
        await self._session.close()


def retryable(status: int) -> bool:
    """Whether a send answered with ``status`` may succeed later: the sidecar is busy, starting,
    failing or behind a proxy that cannot reach it (408, 429, 5xx but 501 and 505)."""
    return status in (408, 429) or (status >= 500 and status not in (501, 505))


class _Segment:
    """Events of consecutive requests to one model version, already column by column: per-request
    lists that each record extends (one C call per column, no per-request object) and the model
    batches' arrays. One segment becomes one :class:`~modelloop.schemas.EventColumns` group.

    Only lists of strings and numbers and a few arrays: the garbage collector scans a handful of
    lists instead of an object per request (buffered objects promoted through the generations
    made every full collection slower, which showed as lost throughput with events on)."""

    __slots__ = (
        "born",
        "counts",
        "first_rows",
        "ids",
        "latencies",
        "mode",
        "model",
        "predictions",
        "probabilities",
        "rows",
        "seen",
        "share",
        "timestamps",
        "version",
        "widths",
        "xs",
    )

    def __init__(self, model: str, version: int, mode: str, widths: tuple[int, int], born: float,
                 share: float = 1.0) -> None:
        self.model, self.version, self.mode, self.widths = model, version, mode, widths
        self.share = share  # of the model's rows sent while these were recorded (serving/sampling.py)
        self.seen = 0  # rows predicted that these events stand for, those left out by the sample too
        self.born = born  # time.monotonic() of its first row: what the age limit is judged by
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
            return _Segment(self.model, self.version, self.mode, self.widths, self.born, self.share).add(
                self.ids, [self.first_rows[0] + rows.indices(len(x))[0]], [len(x[rows])], self.timestamps[0],
                self.latencies, x[rows], pred[rows], None if proba is None else proba[rows])

        head, rest = part(slice(0, k)), part(slice(k, None))
        head.seen = self.seen
        return head, rest

    def halves(self) -> tuple[_Segment, _Segment]:
        """The segment (of two rows or more) as two of about half its rows each: whole requests,
        or of a single request its first and last rows."""
        if len(self.ids) == 1:
            return self.cut(self.rows // 2)
        k = len(self.ids) // 2
        r = sum(self.counts[:k])

        def part(requests: slice, rows: slice) -> _Segment:
            seg = _Segment(self.model, self.version, self.mode, self.widths, self.born, self.share)
            seg.ids, seg.first_rows, seg.counts = self.ids[requests], self.first_rows[requests], self.counts[requests]
            seg.timestamps, seg.latencies = self.timestamps[requests], self.latencies[requests]
            for mine, arrays in ((seg.xs, self.xs), (seg.predictions, self.predictions),
                                 (seg.probabilities, self.probabilities)):
                if arrays:
                    mine.append(_stacked(arrays)[rows])
            seg.rows = sum(seg.counts)
            return seg

        head, rest = part(slice(0, k), slice(0, r)), part(slice(k, None), slice(r, None))
        head.seen = self.seen
        return head, rest

    def trim(self, need: int) -> int:
        """Drop the oldest rows in place, at least ``need`` (whole requests; of a single request
        only its first ``need`` rows) or all; the number dropped."""
        if len(self.ids) == 1:
            dropped, gone = min(need, self.rows), 0
            self.first_rows[0] += dropped
            self.counts[0] -= dropped
        else:
            dropped = gone = 0
            while dropped < need and gone < len(self.counts):
                dropped += self.counts[gone]
                gone += 1
            for column in (self.ids, self.first_rows, self.counts, self.timestamps, self.latencies):
                del column[:gone]
        left = dropped
        while left:
            first = len(self.xs[0])
            for arrays in (self.xs, self.predictions, self.probabilities):
                if arrays:
                    if first <= left:
                        del arrays[0]
                    else:
                        arrays[0] = arrays[0][left:]
            left -= min(first, left)
        self.rows -= dropped
        return dropped

    def json(self) -> bytes:
        """The segment as one EventColumns object: one orjson call, features and probabilities
        packed as base64 bytes (:class:`~modelloop.schemas.PackedMatrix`), cheaper than writing
        each value as text (docs/serving.md); the rows of a model with categorical features,
        which hold strings, as lists (modelloop/categorical.py)."""

        rows = _stacked
        x = rows(self.xs)
        return orjson.dumps({
            "model": self.model, "version": self.version, "mode": self.mode,
            "request_ids": self.ids, "first_row": self.first_rows, "rows": self.counts,
            "timestamp": self.timestamps, "latency_s": self.latencies,
            # rows with strings (a model with categorical features): JSON lists, NaN as null
            "features": x.tolist() if x.dtype == object else PackedMatrix.pack(x),
            "prediction": rows(self.predictions),
            "probabilities": PackedMatrix.pack(rows(self.probabilities)) if self.probabilities else None,
            "seen": self.seen, "share": self.share,
        }, option=orjson.OPT_SERIALIZE_NUMPY)


def _stacked(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class EventEmitter:
    """Bounded, batched event delivery to the sidecar that keeps events through its outages (see
    the module docstring)."""

    def __init__(
        self,
        sidecar_url: str | None,
        *,
        buffer_rows: int = 250_000,
        batch_size: int = 1000,
        flush_interval_s: float = 0.5,
        retry_backoff_s: float = 0.2,
        retry_backoff_max_s: float = 2.0,
        max_age_s: float = 600.0,
        timeout_s: float = 2.0,
        max_body_bytes: int = MAX_BODY_BYTES,
        headers: Mapping[str, str] | None = None,
        on_sent: SentHook | None = None,
        on_dropped: DroppedHook | None = None,
        sampler: EventSampler | None = None,
        on_sampled: SampledHook | None = None,
    ) -> None:
        self.url = f"{sidecar_url.rstrip('/')}/events" if sidecar_url else None
        self.buffer_rows = buffer_rows
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self.on_sent = on_sent
        self.on_dropped = on_dropped
        self.sampler = sampler if sampler is not None and sampler.active else None
        self.on_sampled = on_sampled
        self._unsent_seen: dict[str, int] = {}  # per model: rows left out since its last group
        self.sent = 0
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self._headers = dict(headers or {})  # (the ingest key: given to the client, never logged)
        # at most _SLICE rows, and batch_size split evenly (500 -> 2 x 250), so a send of whole
        # segments fills batch_size instead of stopping at one segment and a remainder
        self._segment_rows = -(-batch_size // -(-batch_size // _SLICE))
        self._flight: tuple[_Segment, ...] = ()  # the batch being sent: the oldest rows held
        self._flight_rows = 0
        self._posting = False  # a POST of the flight is under way: it cannot be dropped meanwhile
        self._closed: deque[_Segment] = deque()  # full segments waiting, oldest first
        # the segments records go to, one per model and mode (in the order they were opened): a
        # server of many models, or a shadow beside production, interleaves their batches, and
        # one open segment for all cut a group (a JSON object, a sidecar insert) per batch
        self._open: dict[tuple[str, str], _Segment] = {}
        self._rows = 0  # in the flight, the closed segments and the open ones
        self._lock = threading.Lock()  # record() is also called from batch-job threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._backoff = retry_backoff_s  # the next wait after a failed send (before jitter)
        self._failing_since: float | None = None  # when the sends began to fail, while they do
        self._dropped_before = 0  # events dropped before that
        self._refusals: set[int] = set()  # statuses of refusals logged already

    @property
    def enabled(self) -> bool:
        return self.url is not None

    @property
    def pending_rows(self) -> int:
        """Events held, the batch being sent included."""
        return self._rows

    # -- request path ------------------------------------------------------------------------
    def record(self, *, model: str, version: int, base_id: str, x: np.ndarray, preds: Predictions,
               latency_s: float, mode: Mode = "realtime", timestamp: float | None = None,
               first_row: int = 0) -> None:
        """Queue the events of one request (see :meth:`record_requests`).

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
        a column group is split).

        When the buffer is full the oldest rows held are dropped to make room; only rows that
        cannot fit at all (more than the buffer, less a batch whose POST is under way) are
        dropped themselves."""
        if self.url is None:
            return
        n = len(x)
        if n == 0:  # a request of no rows has no events (and the sidecar takes none)
            return
        seen = 0 if mode == MODE_SHADOW else n  # a challenger's answers stand for no prediction made
        sampled = self._sample(model, base_ids, first_rows, counts, x, preds, latencies, seen)
        if sampled is None:
            return
        share, base_ids, first_rows, counts, latencies, x, preds = sampled
        n = len(x)
        proba = preds.probabilities
        widths = (x.shape[1], -1 if proba is None else proba.shape[1])
        k = len(base_ids)
        evicted: list[tuple[str, int]] = []
        with self._lock:
            fits = n <= self.buffer_rows - (self._flight_rows if self._posting else 0)
            if fits:
                if self._rows + n > self.buffer_rows:
                    evicted = self._evict(self._rows + n - self.buffer_rows)
                large = k == 1 and n > self._segment_rows
                seg = self._open.get((model, mode))
                if (large or seg is None or (seg.rows and seg.rows + n > self._segment_rows)
                        or seg.version != version or seg.widths != widths or seg.share != share):
                    seg = self._new_segment(model, version, mode, widths, share)
                seg.seen += seen + (self._unsent_seen.pop(model, 0) if seen and self._unsent_seen else 0)
                seg.add(base_ids, [0] * k if first_rows is None else first_rows, counts,
                        time.time() if timestamp is None else timestamp, latencies, x, preds.prediction, proba)
                if large:  # a closed segment of its own, cut into groups by _take as it is sent
                    self._closed.append(self._open.pop((model, mode)))  # (nothing here grows with its size)
                self._rows += n
            else:
                self.dropped["buffer_full"] += n
        if evicted:
            self._report(evicted, "buffer_full")
        if not fits:
            self._report([(model, n)], "buffer_full")
        elif self._rows >= self.batch_size:
            self._poke()

    def _sample(self, model: str, base_ids: Sequence[str], first_rows: Sequence[int] | None,
                counts: Sequence[int], x: np.ndarray, preds: Predictions, latencies: Sequence[float],
                seen: int) -> tuple[float, Sequence[str], Sequence[int] | None, Sequence[int], Sequence[float],
                           np.ndarray, Predictions] | None:
        """The rows of a record that the sampler keeps, with the share used (the arguments as
        they were when it keeps all, or there is no sampler); None when it keeps none (their count waits for the
        model's next group). Shadow rows (``seen`` 0: a challenger's answers to requests counted
        already) follow the same rule, so a kept request keeps its challenger's answer, but are
        neither counted nor measured against the budget."""
        n = len(x)
        if self.sampler is None:
            if self.on_sampled is not None and seen:
                self.on_sampled(model, n, 0)
            return 1.0, base_ids, first_rows, counts, latencies, x, preds
        kept, share = self.sampler.select(model, base_ids, [0] * len(base_ids) if first_rows is None
                                          else first_rows, counts, measure=bool(seen))
        m = n if kept.rows is None else len(kept.rows)
        if self.on_sampled is not None and seen:
            self.on_sampled(model, m, n - m)
        if kept.rows is None:
            return share, base_ids, first_rows, counts, latencies, x, preds
        if not m:
            with self._lock:
                self._unsent_seen[model] = self._unsent_seen.get(model, 0) + seen
            return None
        return (share, [base_ids[r] for r in kept.requests], kept.first_rows, kept.counts,
                [latencies[r] for r in kept.requests], x[kept.rows], preds.rows(kept.rows))

    def _new_segment(self, model: str, version: int, mode: str, widths: tuple[int, int],
                     share: float) -> _Segment:
        """Close the model's open segment of ``mode`` and open a new one (with the lock held)."""
        old = self._open.pop((model, mode), None)
        if old is not None and old.rows:
            self._closed.append(old)
        seg = self._open[model, mode] = _Segment(model, version, mode, widths, time.monotonic(), share)
        return seg

    def _close_open(self) -> None:
        """Close every open segment, oldest first (lock held)."""
        self._closed.extend(seg for seg in self._open.values() if seg.rows)
        self._open.clear()

    def _evict(self, need: int) -> list[tuple[str, int]]:
        """Drop at least ``need`` of the oldest rows (lock held): first of the batch in flight,
        unless its POST is under way, then of the waiting segments; whole requests, or the first
        rows of a single large one."""
        drops: list[tuple[str, int]] = []
        need = self._drop_shadow(need, drops)
        if need > 0 and self._flight and not self._posting:
            flight = deque(self._flight)
            need = self._trim(flight, need, drops)
            self._flight = tuple(flight)  # a new tuple: the sender builds its body again
            self._flight_rows = sum(seg.rows for seg in flight)
        need = self._trim(self._closed, need, drops)
        if need > 0 and self._open:
            self._close_open()  # the newest rows held, but the oldest left to drop
            self._trim(self._closed, need, drops)
        dropped = sum(n for _, n in drops)
        self._rows -= dropped
        self.dropped["buffer_full"] += dropped
        return drops

    def _drop_shadow(self, need: int, drops: list[tuple[str, int]]) -> int:
        """Drop whole waiting segments of a challenger's shadow answers first (serving/shadow.py:
        the shadow gives way to production's events); what is still needed."""
        if any(seg.mode == MODE_SHADOW for seg in self._closed):
            kept: deque[_Segment] = deque()
            for seg in self._closed:
                if need > 0 and seg.mode == MODE_SHADOW:
                    drops.append((seg.model, seg.rows))
                    need -= seg.rows
                else:
                    kept.append(seg)
            self._closed = kept
        for key in [key for key in self._open if key[1] == MODE_SHADOW]:
            if need <= 0:
                break
            seg = self._open.pop(key)
            drops.append((seg.model, seg.rows))
            need -= seg.rows
        return need

    def _trim(self, segments: deque[_Segment], need: int, drops: list[tuple[str, int]]) -> int:
        """Drop at least ``need`` rows from the head of ``segments``, noting ``(model, rows)``
        in ``drops``; what is still needed."""
        while need > 0 and segments:
            seg = segments[0]
            n = seg.trim(need)
            drops.append((seg.model, n))
            need -= n
            if not seg.rows:
                self._carry_seen(segments.popleft())
        return need

    def _carry_seen(self, seg: _Segment) -> None:
        """A dropped segment's predictions were made all the same: the count it carried
        (``seen``) goes with the model's next group, so the sidecar's count of predictions
        stays exact while events are lost (lock held)."""
        if seg.seen:
            self._unsent_seen[seg.model] = self._unsent_seen.get(seg.model, 0) + seg.seen

    def _expire(self, now: float) -> list[tuple[str, int]]:
        """Drop the segments recorded more than max_age_s before ``now`` (lock held); the buffer
        is in the order they were opened, so they are at its head."""
        limit = now - self.max_age_s
        gone: list[_Segment] = []
        if self._flight and self._flight[0].born < limit:
            gone += [s for s in self._flight if s.born < limit]
            self._flight = tuple(s for s in self._flight if s.born >= limit)
            self._flight_rows = sum(s.rows for s in self._flight)
        closed = self._closed
        while closed and closed[0].born < limit:
            gone.append(closed.popleft())
        if not closed:
            for key, seg in list(self._open.items()):
                if seg.born < limit:
                    gone.append(self._open.pop(key))
        return self._forget(gone, "expired")

    def _forget(self, segments: Sequence[_Segment], reason: str) -> list[tuple[str, int]]:
        """Take dropped segments off the count of rows held and count them dropped (lock held);
        ``(model, rows)`` of each, for :meth:`_report` once the lock is released."""
        rows = sum(seg.rows for seg in segments)
        self._rows -= rows
        self.dropped[reason] += rows
        for seg in segments:
            self._carry_seen(seg)
        return [(seg.model, seg.rows) for seg in segments]

    def _report(self, drops: Sequence[tuple[str, int]], reason: str) -> None:
        """Tell on_dropped, once per model."""
        if self.on_dropped is None or not drops:
            return
        per_model: dict[str, int] = {}
        for model, n in drops:
            per_model[model] = per_model.get(model, 0) + n
        for model, n in per_model.items():
            self.on_dropped(model, reason, n)

    def _poke(self) -> None:
        """Wake the sender now (a full batch is waiting)."""
        if self._wake is None or self._loop is None or self._wake.is_set():
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

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
        """Stop the sender after a last flush, which keeps trying until the deadline; what is
        still unsent then is dropped and counted (``shutdown``)."""
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
        with self._lock:
            left = [seg for seg in (*self._flight, *self._closed, *self._open.values()) if seg.rows]
            self._flight, self._flight_rows, self._posting = (), 0, False
            self._open.clear()
            self._closed.clear()
            drops = self._forget(left, "shutdown")
        if drops:
            logger.warning("stopped with %d prediction events not sent to the sidecar %s",
                           sum(n for _, n in drops), self.url)
            self._report(drops, "shutdown")

    def _take(self) -> bool:
        """Make the oldest segments, about batch_size rows, the batch in flight: whole segments
        while they fit (the first always goes, so a model batch larger than batch_size goes
        whole), and the next rows of a large request, at most a segment's worth. False when
        there are none."""
        taken: list[_Segment] = []
        room = self.batch_size
        with self._lock:
            self._close_open()
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
            self._flight = tuple(taken)
            self._flight_rows = self.batch_size - room
        return bool(taken)

    @staticmethod
    async def _groups(segments: Sequence[_Segment]) -> list[bytes]:
        """The column groups of the ColumnBatch JSON, one per segment, with a yield to the loop
        between groups (a group is at most _SLICE rows unless one model batch was larger)."""
        groups: list[bytes] = []
        for seg in segments:
            if groups:
                await asyncio.sleep(0)  # let requests in between groups
            groups.append(seg.json())
        return groups

    def _fit(self, flight: tuple[_Segment, ...], sizes: Sequence[int]) -> bool:
        """Cut the batch in flight, whose groups write ``sizes`` bytes, down to a body of at most
        max_body_bytes: the first segments that fit stay, the others go back to the head of the
        buffer; a first segment too large alone is cut in halves (and again when a half is). So
        no event is lost to the sidecar's limit on a body. False when it cannot be cut (one row:
        sent as it is)."""
        budget = self.max_body_bytes - len(b'{"columns":[]}')
        keep, used = 0, 0
        for size in sizes:
            used += size + 1  # (a comma between groups)
            if used > budget:
                break
            keep += 1
        with self._lock:
            if self._flight is not flight:
                return True  # changed meanwhile: built again
            if keep:
                kept, back = flight[:keep], flight[keep:]
            elif flight[0].rows > 1:
                head, rest = flight[0].halves()
                kept, back = (head,), (rest, *flight[1:])
            else:
                return False
            self._closed.extendleft(reversed(back))
            self._flight, self._flight_rows = kept, sum(seg.rows for seg in kept)
        return True

    async def _run(self) -> None:
        assert self._wake is not None and self.url is not None
        client = SidecarClient(self.url, self.timeout_s, self._headers)
        try:
            while True:
                if self._rows < self.batch_size and not self._stopping:
                    # a poke left over from before the last send must not cut this wait short:
                    # that would send many small batches, each costing a whole HTTP request
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
                if self._take():
                    await self._deliver(client)
                elif self._stopping:
                    return
        finally:
            await client.aclose()

    async def _deliver(self, client: SidecarClient) -> None:
        """Send the batch in flight until the sidecar takes or refuses it, or it is dropped (the
        oldest rows of a full buffer, or past the age limit); after each failure wait the
        backoff, at least the sidecar's Retry-After, and send it again."""
        body, built_for = b"", None  # the body of which flight
        while True:
            with self._lock:
                expired = self._expire(time.monotonic())
                flight = self._flight
                self._posting = bool(flight)
            self._report(expired, "expired")
            if not flight:
                return  # dropped, to make room or for its age
            answer, problem = None, ""
            try:
                if flight is not built_for:
                    groups = await self._groups(flight)
                    body, built_for = b'{"columns":[' + b",".join(groups) + b"]}", flight
                    if len(body) > self.max_body_bytes and self._fit(flight, list(map(len, groups))):
                        continue  # a smaller flight: built again
                answer = await client.post(body)
            except Exception as exc:  # connection refused, timeout, a broken answer: the sidecar is away
                problem = f"{type(exc).__name__}: {exc}"
            finally:
                with self._lock:
                    self._posting = False
            if answer is not None and 200 <= answer.status < 300:
                self._settle(flight, answer.status)
                return
            if answer is not None and not retryable(answer.status):
                self._settle(flight, answer.status, answer.text)
                return
            if answer is not None:
                problem = f"HTTP {answer.status}: {answer.text[:200]}"
            wait = self._backoff * random.uniform(0.5, 1.0)  # jitter: workers and replicas do not retry in step
            if answer is not None and answer.retry_after is not None:
                wait = max(wait, answer.retry_after)
            self._backoff = min(self._backoff * 2, self.retry_backoff_max_s)
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                self._dropped_before = sum(self.dropped.values())
                logger.warning("sidecar %s: %s; keeping prediction events (%d held) and sending them "
                               "again with backoff", self.url, problem, self._rows)
            await asyncio.sleep(wait)

    def _settle(self, flight: tuple[_Segment, ...], status: int, refusal: str | None = None) -> None:
        """The sidecar answered the flight: taken (2xx), or refused (``refusal``, its answer):
        dropped and counted, and logged once per status."""
        with self._lock:
            self._flight, self._flight_rows = (), 0
            if refusal is None:
                self._rows -= sum(seg.rows for seg in flight)
                drops = []
            else:
                drops = self._forget(flight, "rejected")
        self._backoff = self.retry_backoff_s
        if self._failing_since is not None:
            logger.info("sidecar %s answers again after %.1f s; %d prediction events dropped meanwhile",
                        self.url, time.monotonic() - self._failing_since,
                        sum(self.dropped.values()) - self._dropped_before)
            self._failing_since = None
        if refusal is not None:
            self._report(drops, "rejected")
            if status not in self._refusals:
                self._refusals.add(status)
                logger.warning("sidecar %s refused %d prediction events with HTTP %d: %s (they are dropped; "
                               "further refusals with %d are counted, not logged)", self.url,
                               sum(n for _, n in drops), status, _error_text(refusal), status)
            return
        n = sum(seg.rows for seg in flight)
        self.sent += n
        if self.on_sent is not None:
            per_model: dict[str, int] = {}
            for seg in flight:
                per_model[seg.model] = per_model.get(seg.model, 0) + seg.rows
            for model, rows in per_model.items():
                self.on_sent(model, rows)


def _error_text(body: str) -> str:
    """The ``error`` of the sidecar's JSON error body, else the start of the body."""
    with contextlib.suppress(ValueError, TypeError, KeyError):
        return str(orjson.loads(body)["error"])[:300]
    return body[:300]
