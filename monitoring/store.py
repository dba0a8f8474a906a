"""The sidecar's durable store: prediction events with their joined labels, retraining jobs, and
the Alertmanager alerts already acted on.

One interface, :class:`EventStore`, two engines: SQLite in WAL mode (the embedded default) and
PostgreSQL (shared by many replicas). Every write is one transaction that is committed before the
call returns, so whatever a caller acknowledges survives the process being killed.

Retention (:meth:`EventStore.retain`) deletes the oldest events by age, count and size in chunks
of :data:`RETENTION_CHUNK_ROWS` rows, one transaction each, so a large delete never holds a copy
of the table in the write-ahead log. SQLite files are made with ``auto_vacuum=INCREMENTAL``: the
pages a chunk frees are given back to the file system and the WAL is truncated after it, so the
file tracks what is kept. PostgreSQL's autovacuum makes deleted rows' space reusable.

Features and probabilities are stored as packed little-endian float64 blobs (NaN for a missing
value): ingest stays cheap, and a 100k-row window is read back as one numpy matrix.

Example::

    store = open_store("sqlite:///tmp/events.db")
    store.insert_events([EventRow.from_event(ev, received_at=time.time())])
    window = store.window("churn", version=1, last_n=5000)
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelloop.schemas import MODE_SHADOW
from monitoring.records import (
    EventRow,
    JobRecord,
    JobStatus,
    LabelTarget,
    Requester,
    Stored,
    Window,
    to_window,
)

log = logging.getLogger(__name__)

_REQUEST_ID, _MODEL, _MODE = (operator.itemgetter(EventRow._fields.index(name))
                              for name in ("request_id", "model", "mode"))
"""Columns of stored rows, read without a Python call a row."""
_TS, _NEWEST = operator.itemgetter(0), operator.itemgetter(1)
"""A ``ts, ...`` row's timestamp; a ``(version, newest ts)`` head's timestamp."""


def share_hour(ts: float) -> int:
    """The hour (since the epoch) of ``ts``: the unit the ``sample_shares`` table keeps."""
    return int(ts // 3600)


_EVENT_COLS = ("request_id, model, version, ts, mode, features, prediction, probabilities, "
               "latency_s, received_at")

RETENTION_CHUNK_ROWS = 50_000
"""Events deleted per transaction by retention. Each chunk's pages pass through the write-ahead
log (SQLite's WAL, PostgreSQL's too), so the chunk bounds what a large delete adds to it."""

SQLITE_VACUUM_AT_OPEN_MAX_BYTES = 256 * 1024 * 1024
"""A SQLite file made without incremental auto-vacuum and smaller than this is rebuilt with it
when opened (VACUUM, about a second per 100 MiB); a larger one is left as it is, with a warning."""

SQLITE_WAL_LIMIT_BYTES = 64 * 1024 * 1024
"""``journal_size_limit``: a WAL file larger than this is truncated to it after a checkpoint."""

KEEP_EVALUATIONS = 10_000
"""Windows of a model whose checker is kept (:meth:`EventStore.claim_evaluation`)."""

ADDED_COLUMNS = (("events", "ambiguous", "INTEGER NOT NULL DEFAULT 0"),)
"""Columns added since the first release, as (table, column, declaration): a store made before
gets them when it is opened (``CREATE TABLE IF NOT EXISTS`` leaves an existing table as it is)."""

ChunkCallback = Callable[[int], bool | None]
"""Called after each retention chunk with the events it deleted; returning False stops there."""


class _Chunks:
    """A caller's chunk callback that remembers whether it asked to stop."""

    def __init__(self, on_chunk: ChunkCallback | None) -> None:
        self.on_chunk = on_chunk
        self.stopped = False

    def __call__(self, n: int) -> bool:
        self.stopped = self.stopped or (self.on_chunk is not None and self.on_chunk(n) is False)
        return not self.stopped


@dataclass(frozen=True)
class Retention:
    """Events deleted by one :meth:`EventStore.retain`, by the bound that deleted them."""

    by_age: int = 0
    by_count: int = 0
    by_bytes: int = 0
    alerts: int = 0
    """Alerts forgotten (not seen for the retention age, or beyond the newest ``max_alerts``)."""

    @property
    def deleted(self) -> int:
        """Events deleted (alerts apart)."""
        return self.by_age + self.by_count + self.by_bytes


class StoreError(Exception):
    """The store could not be opened or written; the message names the store."""


class EventStore:
    """SQL behind the store; subclasses supply connections and the dialect's few differences."""

    dialect = "sql"
    placeholder = "?"
    blob_type = "BLOB"
    real_type = "REAL"
    seq_type = "INTEGER PRIMARY KEY"
    add_column = "ADD COLUMN"
    integrity_errors: tuple[type[Exception], ...] = ()

    def __init__(self, prefix: str = "modelloop_") -> None:
        self.table_prefix = prefix
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._growth: tuple[int, Callable[[], None]] | None = None
        self._grown = 0

    # -- connection plumbing (engine specific) -----------------------------------------------
    def _writer(self) -> Any:
        raise NotImplementedError

    def _reader(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql.replace("?", self.placeholder).replace("{p}", self.table_prefix)

    def _begin(self, conn: Any) -> None:
        """Open the write transaction (PostgreSQL opens one implicitly)."""

    @contextlib.contextmanager
    def _write(self) -> Iterator[Any]:
        """A cursor inside one transaction on the writer connection, committed on exit."""
        with self._wlock:
            conn = self._writer()
            try:
                self._begin(conn)
                cur = conn.cursor()
                yield cur
                conn.commit()
            except BaseException:
                conn.rollback()
                raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[Any]:
        with self._rlock:
            yield self._reader().cursor()  # readers autocommit: each query sees the latest commits

    # -- schema ------------------------------------------------------------------------------
    def create_schema(self) -> None:
        r, b = self.real_type, self.blob_type
        ddl = [
            f"""CREATE TABLE IF NOT EXISTS {{p}}events (
                seq {self.seq_type}, request_id TEXT NOT NULL UNIQUE, model TEXT NOT NULL,
                version INTEGER NOT NULL, ts {r} NOT NULL, mode TEXT NOT NULL, features {b} NOT NULL,
                prediction {r} NOT NULL, probabilities {b}, latency_s {r} NOT NULL,
                received_at {r} NOT NULL, label {r}, label_ts {r},
                ambiguous INTEGER NOT NULL DEFAULT 0)""",
            # one index for every read of a window: a version's newest events, and a model's
            # newest over its versions (a range per version, merged: see _newest); each index
            # costs ingest about 1 us an event, so the two it replaced (by version and arrival,
            # by model and time) were dropped (issue #21)
            "CREATE INDEX IF NOT EXISTS {p}events_mvt ON {p}events (model, version, ts)",
            "DROP INDEX IF EXISTS {p}events_mvs",
            "DROP INDEX IF EXISTS {p}events_mts",
            # the labelled events only (a row enters it when its label is joined, so ingest does
            # not pay for it): a check reads a version's newest labelled events without walking
            # every event of the window (monitoring/evaluate.py)
            "CREATE INDEX IF NOT EXISTS {p}events_labelled ON {p}events (model, version, ts) "
            "WHERE label IS NOT NULL",
            # the replica that checks a model's window (one per window, across replicas)
            f"""CREATE TABLE IF NOT EXISTS {{p}}evaluations (
                model TEXT NOT NULL, slot BIGINT NOT NULL, replica TEXT NOT NULL, at {r} NOT NULL,
                PRIMARY KEY (model, slot))""",
            f"""CREATE TABLE IF NOT EXISTS {{p}}jobs (
                id TEXT PRIMARY KEY, model TEXT NOT NULL, trigger TEXT NOT NULL,
                kind TEXT NOT NULL, reason TEXT NOT NULL, status TEXT NOT NULL,
                active INTEGER NOT NULL, created_at {r} NOT NULL, ended_at {r},
                handle TEXT NOT NULL, detail TEXT NOT NULL)""",
            # at most one active job per model, also across replicas sharing PostgreSQL
            "CREATE UNIQUE INDEX IF NOT EXISTS {p}jobs_active ON {p}jobs (model) WHERE active = 1",
            f"""CREATE TABLE IF NOT EXISTS {{p}}alerts (
                fingerprint TEXT NOT NULL, starts_at TEXT NOT NULL, received_at {r} NOT NULL,
                PRIMARY KEY (fingerprint, starts_at))""",
            # a challenger's answers to the requests production answered (serving/shadow.py),
            # joined to their events (and labels) by request id
            f"""CREATE TABLE IF NOT EXISTS {{p}}shadow (
                request_id TEXT NOT NULL, version INTEGER NOT NULL, model TEXT NOT NULL,
                ts {r} NOT NULL, prediction {r} NOT NULL, probabilities {b},
                PRIMARY KEY (request_id, version))""",
            "CREATE INDEX IF NOT EXISTS {p}shadow_ts ON {p}shadow (ts)",  # retention's delete
            # the largest share of its rows each model's events were sampled under, per hour
            # (monitoring/sampling.py): feedback for a row the sample left out is told so, also
            # after a restart and on a replica that did not store the model's events
            f"""CREATE TABLE IF NOT EXISTS {{p}}sample_shares (
                model TEXT NOT NULL, hour BIGINT NOT NULL, share {r} NOT NULL,
                PRIMARY KEY (model, hour))""",
        ]
        with self._write() as cur:
            self._lock_schema(cur)
            for stmt in ddl:
                cur.execute(self._sql(stmt))
            for table, column, decl in ADDED_COLUMNS:
                if column not in self._columns(cur, table):
                    cur.execute(self._sql(f"ALTER TABLE {{p}}{table} {self.add_column} {column} {decl}"))

    def _columns(self, cur: Any, table: str) -> set[str]:
        """The names of a table's columns."""
        raise NotImplementedError

    def _lock_schema(self, cur: Any) -> None:
        """Make replicas that open the store at once change its schema one at a time (SQLite's
        write transaction already does)."""

    def drop_schema(self) -> None:
        """Drop the store's tables (the tests, after a case on a shared PostgreSQL)."""
        with self._write() as cur:
            cur.execute(self._sql("DROP TABLE IF EXISTS {p}evaluations"))
            for table in ("events", "jobs", "alerts", "shadow", "sample_shares"):
                cur.execute(self._sql(f"DROP TABLE IF EXISTS {{p}}{table}"))

    # -- events ------------------------------------------------------------------------------
    def insert_events(self, rows: Sequence[EventRow]) -> int:
        """Store ``rows`` in one transaction; returns how many were new (see
        :meth:`insert_batches`)."""
        return sum(self.insert_batches([rows])[0].new.values())

    def insert_batches(self, batches: Sequence[Sequence[EventRow]]) -> list[Stored]:
        """Several batches in one transaction (one commit); per batch, what it came to.

        A request id names one prediction. An event already stored under its id is skipped: the
        very same event (all its columns but ``received_at``) is a re-send (serving sends a batch
        again when the acknowledgement was lost), which is not stored or counted twice. A
        different prediction under a stored id (or twice in one batch) is not stored either, and
        the id is marked ambiguous: whichever event came first, a label for that id cannot be
        told apart from one meant for the other, so none is joined to it (and one joined before
        is removed)."""
        insert = self._sql(f"INSERT INTO {{p}}events ({_EVENT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?) "
                           "ON CONFLICT (request_id) DO NOTHING")
        out: list[Stored] = []
        due = None
        with self._write() as cur:
            for rows in batches:
                shadow = [r for r in rows if r.mode == MODE_SHADOW] if MODE_SHADOW in set(map(_MODE, rows)) else []
                if shadow:
                    rows = [r for r in rows if r.mode != MODE_SHADOW]
                    self._add_shadow(cur, shadow)
                clashes: list[str] = []
                if len(set(map(_REQUEST_ID, rows))) < len(rows):  # an id twice in the batch
                    firsts: dict[str, EventRow] = {}
                    for r in rows:
                        first = firsts.setdefault(r.request_id, r)
                        if first is not r and not _same_event(first, r):
                            clashes.append(r.request_id)
                    rows = list(firsts.values())
                new, differing = self._add_rows(cur, insert, list(rows))
                clashes += differing
                if clashes:
                    cur.executemany(self._sql(
                        "UPDATE {p}events SET ambiguous = 1, label = NULL, label_ts = NULL "
                        "WHERE request_id = ?"), [(rid,) for rid in dict.fromkeys(clashes)])
                out.append(Stored(new, len(clashes), len(shadow)))
            if self._growth is not None:
                self._grown += sum(sum(st.new.values()) for st in out)
                if self._grown >= self._growth[0]:
                    self._grown, due = 0, self._growth[1]
        if due is not None:
            try:
                due()
            except Exception:  # the events are committed: a failing hook must not say otherwise
                log.exception("the store's growth callback failed")
        return out

    def _add_rows(self, cur: Any, insert: str,
                  rows: list[EventRow]) -> tuple[dict[str, int], list[str]]:
        """Insert ``rows`` (distinct ids) but those whose id is stored; returns the new ones per
        model, and the ids stored before with another prediction."""
        models = set(map(_MODEL, rows))
        by_model: dict[str, list[EventRow]] = {models.pop(): rows} if len(models) == 1 else {}
        if not by_model:
            for r in rows:
                by_model.setdefault(r.model, []).append(r)
        new = {}
        for model, group in by_model.items():
            cur.executemany(insert, group)
            new[model] = int(cur.rowcount)
        if sum(new.values()) == len(rows):
            return new, []
        return new, self._differing(cur, rows)  # some ids were stored before

    def _differing(self, cur: Any, rows: Sequence[EventRow]) -> list[str]:
        """The ids of ``rows`` stored with another prediction (inside the write transaction)."""
        mine = {r.request_id: r for r in rows}
        ids = list(mine)
        out = []
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            cur.execute(self._sql(f"SELECT {_EVENT_COLS} FROM {{p}}events "
                                  f"WHERE request_id IN ({','.join('?' * len(chunk))})"), chunk)
            out += [row[0] for row in cur.fetchall()
                    if not _same_event(EventRow(*row), mine[row[0]])]
        return out

    def _add_shadow(self, cur: Any, rows: list[EventRow]) -> None:
        """Store a challenger's shadow answers (one per request id and version; a re-send is
        skipped)."""
        cur.executemany(self._sql(
            "INSERT INTO {p}shadow (request_id, version, model, ts, prediction, probabilities) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT (request_id, version) DO NOTHING"),
            [(r.request_id, r.version, r.model, r.ts, r.prediction, r.probabilities) for r in rows])

    def live_pairs(self, model: str, champion: int, challenger: int,
                   since: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The labelled requests ``model`` v``champion`` answered since ``since`` that the
        shadow v``challenger`` answered too: (labels, champion's predictions, challenger's),
        oldest first. Ambiguous ids are left out, as for every other label."""
        with self._read() as cur:
            cur.execute(self._sql(
                "SELECT e.label, e.prediction, s.prediction FROM {p}events e "
                "JOIN {p}shadow s ON s.request_id = e.request_id AND s.model = e.model AND s.version = ? "
                "WHERE e.model = ? AND e.version = ? AND e.ts >= ? AND e.label IS NOT NULL "
                "AND e.ambiguous = 0 ORDER BY e.seq"), (challenger, model, champion, since))
            rows = cur.fetchall()
        out = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
        return out[:, 0], out[:, 1], out[:, 2]

    def count_shadow(self, model: str, version: int) -> int:
        with self._read() as cur:
            cur.execute(self._sql("SELECT COUNT(*) FROM {p}shadow WHERE model = ? AND version = ?"),
                        (model, version))
            return int(cur.fetchone()[0])

    def on_growth(self, every_events: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time ``every_events`` more new events have been stored through
        this object (on the inserting thread, after the commit: it must return quickly)."""
        with self._wlock:
            self._growth, self._grown = (every_events, callback), 0

    def count_events(self, model: str | None = None) -> int:
        with self._read() as cur:
            if model is None:
                cur.execute(self._sql("SELECT COUNT(*) FROM {p}events"))
            else:
                cur.execute(self._sql("SELECT COUNT(*) FROM {p}events WHERE model = ?"), (model,))
            return int(cur.fetchone()[0])

    def count_labelled(self, model: str, since: float) -> int:
        """Labels of ``model``'s events received after ``since`` (never an ambiguous event's)."""
        with self._read() as cur:
            # (label IS NOT NULL: through the index of labelled events, not every event)
            cur.execute(self._sql("SELECT COUNT(*) FROM {p}events WHERE model = ? AND label IS NOT NULL "
                                  "AND label_ts > ? AND ambiguous = 0"), (model, since))
            return int(cur.fetchone()[0])

    def models(self) -> list[str]:
        """The models with events, in name order: a walk of the (model, ...) index from one name to
        the next (a few lookups a model), where ``SELECT DISTINCT`` read every event's entry."""
        with self._read() as cur:
            cur.execute(self._sql(
                "WITH RECURSIVE m(model) AS (SELECT MIN(model) FROM {p}events UNION ALL "
                "SELECT (SELECT MIN(model) FROM {p}events WHERE model > m.model) FROM m "
                "WHERE m.model IS NOT NULL) SELECT model FROM m WHERE model IS NOT NULL"))
            return [r[0] for r in cur.fetchall()]

    def versions(self, model: str, since: float | None = None) -> list[int]:
        """Versions of ``model`` with events (since ``since``), oldest first."""
        with self._read() as cur:
            heads = self._heads(cur, model)
        return sorted(v for v, newest in heads if since is None or newest >= since)

    def _heads(self, cur: Any, model: str) -> list[tuple[int, float]]:
        """Each version of ``model`` with the timestamp of its newest event, newest first: a walk
        of the (model, version, ts) index from one version to the next, a few lookups each."""
        cur.execute(self._sql(
            "WITH RECURSIVE v(version) AS (SELECT MIN(version) FROM {p}events WHERE model = ? "
            "UNION ALL SELECT (SELECT MIN(version) FROM {p}events WHERE model = ? "
            "AND version > v.version) FROM v WHERE v.version IS NOT NULL) "
            "SELECT version, (SELECT MAX(ts) FROM {p}events WHERE model = ? "
            "AND version = v.version) FROM v WHERE version IS NOT NULL"), (model, model, model))
        return sorted(((int(v), float(ts)) for v, ts in cur.fetchall()), key=_NEWEST, reverse=True)

    def _newest(self, cur: Any, cols: str, model: str, version: int | None,
                since: float | None, last_n: int | None) -> list[tuple[Any, ...]]:
        """``ts, {cols}`` of the newest ``last_n`` events of ``model`` (and ``version``) not older
        than ``since``, newest first, each version's read newest first from the (model, version,
        ts) index. Over all versions, they are read in the order of their newest event and merged,
        until the next one's newest event is older than the ``last_n``-th newest kept: so a
        check reads about the events it keeps, not every event of a model's versions."""
        sql = f"SELECT ts, {cols} FROM {{p}}events WHERE model = ? AND version = ?"
        tail = " ORDER BY ts DESC" + (f" LIMIT {int(last_n)}" if last_n is not None else "")
        floor = -math.inf if since is None else since
        versions = ([(version, math.inf)] if version is not None else self._heads(cur, model))
        kept: list[tuple[Any, ...]] = []
        for v, newest in versions:
            if newest < floor:
                break  # this version and the next ones hold nothing newer than what is kept
            if floor == -math.inf:
                cur.execute(self._sql(sql + tail), (model, v))
            else:
                cur.execute(self._sql(sql + " AND ts >= ?" + tail), (model, v, floor))
            kept += cur.fetchall()
            if version is None:
                kept.sort(key=_TS, reverse=True)
            if last_n is not None and len(kept) >= last_n:
                del kept[last_n:]
                floor = max(floor, kept[-1][0]) if last_n else math.inf
        return kept

    def window(
        self, model: str, *, version: int | None = None, last_n: int | None = None,
        since: float | None = None, features: bool = True,
    ) -> Window:
        """The newest ``last_n`` events of ``model`` (and ``version``) not older than ``since``
        by their timestamps, newest last (over all versions without ``version``)."""
        cols = "version, ts, prediction, latency_s, label, label_ts"
        if features:
            cols += ", features, probabilities"
        with self._read() as cur:
            rows = [r[1:] for r in self._newest(cur, cols, model, version, since, last_n)]
        rows.reverse()
        return to_window(rows, features)

    # -- retention ---------------------------------------------------------------------------
    def retain(self, *, cutoff_ts: float | None = None, max_events: int | None = None,
               max_bytes: int | None = None, max_alerts: int | None = None,
               chunk_rows: int = RETENTION_CHUNK_ROWS,
               on_chunk: ChunkCallback | None = None) -> Retention:
        """Forget alerts (with ``max_alerts``: those not seen since ``cutoff_ts`` and beyond the
        newest ``max_alerts``, see :meth:`forget_alerts`), then delete events older than
        ``cutoff_ts``, then beyond the newest ``max_events``, then the oldest until
        :meth:`used_bytes` is at most ``max_bytes``; chunked as :meth:`delete_older`
        (``on_chunk`` returning False stops the three deletes of events)."""
        chunks = _Chunks(on_chunk)
        age = count = size = alerts = 0
        if max_alerts is not None:
            alerts = self.forget_alerts(-math.inf if cutoff_ts is None else cutoff_ts, max_alerts,
                                        chunk_rows)
        if cutoff_ts is not None:
            age = self.delete_older(cutoff_ts, chunk_rows=chunk_rows, on_chunk=chunks)
        if max_events is not None and not chunks.stopped:
            count = self.keep_newest(max_events, chunk_rows=chunk_rows, on_chunk=chunks)
        if max_bytes is not None and not chunks.stopped:
            size = self.keep_bytes(max_bytes, chunk_rows=chunk_rows, on_chunk=chunks)
        if age or count or size:
            self.forget_shadow()
        if cutoff_ts is not None:
            self.forget_shares(share_hour(cutoff_ts))  # the hours before the cutoff's
        return Retention(age, count, size, alerts)

    # -- sample shares -----------------------------------------------------------------------
    def note_share(self, model: str, hour: int, share: float) -> None:
        """``model``'s events of ``hour`` (since the epoch) came under ``share``: the largest
        noted for that hour stays."""
        with self._write() as cur:
            cur.execute(self._sql(
                "INSERT INTO {p}sample_shares (model, hour, share) VALUES (?, ?, ?) "
                "ON CONFLICT (model, hour) DO UPDATE SET share = excluded.share "
                "WHERE excluded.share > {p}sample_shares.share"), (model, hour, share))

    def sample_shares(self, since_hour: int) -> list[tuple[str, int, float]]:
        """``(model, hour, largest share)`` noted for ``since_hour`` and the hours after."""
        with self._read() as cur:
            cur.execute(self._sql("SELECT model, hour, share FROM {p}sample_shares WHERE hour >= ?"),
                        (since_hour,))
            return [(str(m), int(h), float(sh)) for m, h, sh in cur.fetchall()]

    def forget_shares(self, before_hour: int) -> None:
        with self._write() as cur:
            cur.execute(self._sql("DELETE FROM {p}sample_shares WHERE hour < ?"), (before_hour,))

    def forget_shadow(self) -> None:
        """Delete the shadow answers older than the oldest event kept (their events are gone,
        so no label can join them)."""
        with self._write() as cur:
            cur.execute(self._sql("DELETE FROM {p}shadow WHERE ts < "
                                  "COALESCE((SELECT MIN(ts) FROM {p}events), 1e308)"))

    def delete_older(self, cutoff_ts: float, *, chunk_rows: int = RETENTION_CHUNK_ROWS,
                     on_chunk: ChunkCallback | None = None) -> int:
        """Delete the events older than ``cutoff_ts`` (prediction time), oldest first, at most
        ``chunk_rows`` per transaction; returns how many were deleted. ``on_chunk(n)`` is called
        after each chunk is committed and its pages freed, before the WAL is checkpointed and
        truncated (so a caller sees the WAL at its largest); returning False stops there."""
        return self._delete_oldest("ts < ?", (cutoff_ts,), chunk_rows, on_chunk)

    def keep_newest(self, max_events: int, *, chunk_rows: int = RETENTION_CHUNK_ROWS,
                    on_chunk: ChunkCallback | None = None) -> int:
        """Delete all but the newest ``max_events`` events, chunked as :meth:`delete_older`;
        returns how many were deleted."""
        with self._read() as cur:
            cur.execute(self._sql(f"SELECT seq FROM {{p}}events ORDER BY seq DESC "
                                  f"LIMIT 1 OFFSET {int(max_events)}"))
            row = cur.fetchone()
        if row is None:
            return 0
        return self._delete_oldest("seq <= ?", (row[0],), chunk_rows, on_chunk)

    def keep_bytes(self, max_bytes: int, *, chunk_rows: int = RETENTION_CHUNK_ROWS,
                   on_chunk: ChunkCallback | None = None) -> int:
        """Delete the oldest events until :meth:`used_bytes` is at most ``max_bytes``, chunked as
        :meth:`delete_older`; returns how many were deleted. How many to delete is estimated
        from the bytes per event, at first on average, then from what the last pass freed per
        event (pages left part full free less than the average)."""
        chunks = on_chunk if isinstance(on_chunk, _Chunks) else _Chunks(on_chunk)
        used, rows = self.used_bytes(), self.count_events()
        per_event = used / max(rows, 1)
        floor = per_event / 4  # not fooled into deleting everything by a pass that freed little
        deleted = 0
        for _ in range(4):
            if used <= max_bytes or rows == 0 or chunks.stopped:
                break
            n = self.keep_newest(max(0, rows - math.ceil((used - max_bytes) / per_event)),
                                 chunk_rows=chunk_rows, on_chunk=chunks)
            deleted += n
            before, (used, rows) = used, (self.used_bytes(), self.count_events())
            if n:
                per_event = max(floor, (before - used) / n)
        return deleted

    def _delete_oldest(self, where: str, args: tuple[Any, ...], chunk_rows: int,
                       on_chunk: ChunkCallback | None) -> int:
        sql = self._sql(f"DELETE FROM {{p}}events WHERE seq IN (SELECT seq FROM {{p}}events "
                        f"WHERE {where} ORDER BY seq LIMIT {int(chunk_rows)})")
        total = 0
        while True:
            with self._write() as cur:
                cur.execute(sql, args)
                n = int(cur.rowcount)
            total += n
            if n == 0:
                break
            self._free_pages()
            stop = on_chunk is not None and on_chunk(n) is False
            self.checkpoint()
            if n < chunk_rows or stop:
                break
        return total

    def used_bytes(self) -> int:
        """Bytes the stored events take (see the engines)."""
        raise NotImplementedError

    def _free_pages(self) -> None:
        """Give the pages a delete freed back to the file system, where the engine can."""

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database and truncate it, where the engine can."""

    # -- feedback ----------------------------------------------------------------------------
    def label_targets(self, request_ids: Sequence[str]) -> dict[str, LabelTarget]:
        """Model, version and label state of the events with these request ids (the known ones)."""
        out: dict[str, LabelTarget] = {}
        ids = list(dict.fromkeys(request_ids))
        with self._read() as cur:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                cur.execute(self._sql(f"SELECT request_id, model, version, label, ambiguous "
                                      f"FROM {{p}}events WHERE request_id IN ({marks})"), chunk)
                for rid, model, version, label, ambiguous in cur.fetchall():
                    out[rid] = LabelTarget(model, int(version), label is not None, bool(ambiguous))
        return out

    def set_labels(self, labels: Sequence[tuple[str, float, float]]) -> list[str]:
        """Join ``(request_id, label, label_ts)`` to events without a label, in one transaction;
        never to an ambiguous id. Returns the ids that were joined (the others were labelled or
        found ambiguous meanwhile, or are unknown)."""
        sql = self._sql("UPDATE {p}events SET label = ?, label_ts = ? "
                        "WHERE request_id = ? AND label IS NULL AND ambiguous = 0")
        joined = []
        with self._write() as cur:
            for rid, label, label_ts in labels:
                cur.execute(sql, (label, label_ts, rid))
                if cur.rowcount == 1:
                    joined.append(rid)
        return joined

    def labelled_version(self, model: str, version: int, since: float | None = None,
                         limit: int = 100_000, features: bool = True) -> Window:
        """The newest ``limit`` labelled events of one model version (not older than ``since``, by
        their timestamps), newest last; never an ambiguous one (which holds no label anyway). Read through the index
        of labelled events: the cost follows the labels, not the traffic."""
        cols = "version, ts, prediction, latency_s, label, label_ts"
        if features:
            cols += ", features, probabilities"
        sql = (f"SELECT {cols} FROM {{p}}events WHERE model = ? AND version = ? "
               "AND label IS NOT NULL AND ambiguous = 0 AND ts >= ? "
               f"ORDER BY ts DESC LIMIT {int(limit)}")
        with self._read() as cur:
            cur.execute(self._sql(sql), (model, version, since or 0.0))
            rows = cur.fetchall()
        rows.reverse()
        return to_window(rows, features)

    def latencies(self, model: str, since: float, limit: int) -> np.ndarray:
        """The latencies of the newest ``limit`` events of ``model`` not older than ``since``
        (newest by timestamp, over its versions: see :meth:`_newest`)."""
        with self._read() as cur:
            rows = self._newest(cur, "latency_s", model, None, since, limit)
        return np.fromiter((r[1] for r in rows), np.float64, len(rows))

    # -- evaluations -------------------------------------------------------------------------
    def claim_evaluation(self, model: str, slot: int, replica: str, now: float) -> bool:
        """Take the check of ``model``'s window ``slot`` for ``replica``: True for the first
        replica to ask, False once one has (a row per window, unique by its key, which sidecar
        replicas sharing PostgreSQL all write to). The row stays as the record of who checked
        the window; rows over :data:`KEEP_EVALUATIONS` windows old are deleted."""
        with self._write() as cur:
            cur.execute(self._sql("INSERT INTO {p}evaluations (model, slot, replica, at) VALUES (?,?,?,?) "
                                  "ON CONFLICT (model, slot) DO NOTHING"), (model, slot, replica, now))
            taken = cur.rowcount == 1
            cur.execute(self._sql("DELETE FROM {p}evaluations WHERE model = ? AND slot < ?"),
                        (model, slot - KEEP_EVALUATIONS))
        return taken

    def evaluations(self, model: str) -> list[tuple[int, str, float]]:
        """``(slot, replica, at)`` of the windows of ``model`` checked, oldest first."""
        with self._read() as cur:
            cur.execute(self._sql("SELECT slot, replica, at FROM {p}evaluations WHERE model = ? "
                                  "ORDER BY slot"), (model,))
            return [(int(a), str(b), float(c)) for a, b, c in cur.fetchall()]

    # -- jobs ----------------------------------------------------------------------------------
    def start_job(self, job: JobRecord) -> str | None:
        """Record a new active job. Returns None, or why it cannot start: another job of the
        model is active, or a job of this name already ran."""
        with self._write() as cur:
            cur.execute(self._sql("SELECT id FROM {p}jobs WHERE model = ? AND active = 1"),
                        (job.model,))
            row = cur.fetchone()
            if row is not None:
                return f"job {row[0]} of model {job.model!r} is still active"
            cur.execute(self._sql("SELECT status FROM {p}jobs WHERE id = ?"), (job.id,))
            row = cur.fetchone()
            if row is not None:
                return f"job {job.id} already ran for this window ({row[0]})"
            cur.execute(self._sql("INSERT INTO {p}jobs (id, model, trigger, kind, reason, status, "
                                  "active, created_at, ended_at, handle, detail) "
                                  "VALUES (?,?,?,?,?,?,1,?,NULL,?,?)"),
                        (job.id, job.model, Requester(job.trigger).value, job.kind, job.reason,
                         JobStatus(job.status).value, job.created_at, job.handle, job.detail))
        return None

    def try_start_job(self, job: JobRecord) -> str | None:
        """:meth:`start_job`, where a replica that won the race in between also means no."""
        try:
            return self.start_job(job)
        except self.integrity_errors:
            return f"another replica started a job of model {job.model!r} first"

    def update_job(self, job_id: str, status: JobStatus, *, handle: str | None = None,
                   detail: str | None = None, ended_at: float | None = None) -> None:
        status = JobStatus(status)  # a state that is not one is refused here, not stored
        active = 1 if status.active else 0
        with self._write() as cur:
            cur.execute(self._sql("UPDATE {p}jobs SET status = ?, active = ?, "
                                  "handle = COALESCE(?, handle), detail = COALESCE(?, detail), "
                                  "ended_at = COALESCE(?, ended_at) WHERE id = ?"),
                        (status.value, active, handle, detail, ended_at, job_id))

    def jobs(self, model: str | None = None, *, active_only: bool = False,
             limit: int = 50, job_id: str | None = None) -> list[JobRecord]:
        where, args = [], []
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if job_id is not None:
            where.append("id = ?")
            args.append(job_id)
        if active_only:
            where.append("active = 1")
        sql = ("SELECT id, model, trigger, kind, reason, status, created_at, ended_at, handle, "
               "detail FROM {p}jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
               + f" ORDER BY created_at DESC LIMIT {int(limit)}")
        with self._read() as cur:
            cur.execute(self._sql(sql), args)
            return [JobRecord.from_row(r) for r in cur.fetchall()]

    # -- alerts --------------------------------------------------------------------------------
    def first_seen_alerts(self, alerts: Sequence[tuple[str, str]], now: float) -> list[bool]:
        """Remember alerts ``(fingerprint, starts_at)`` in one transaction; per alert, True the
        first time this fingerprint fires from ``starts_at``. One seen before is marked seen
        ``now`` (Alertmanager re-sends a firing alert every ``repeat_interval``), so retention
        forgets only alerts that stopped coming."""
        seen = self._sql("UPDATE {p}alerts SET received_at = ? WHERE fingerprint = ? AND starts_at = ?")
        insert = self._sql("INSERT INTO {p}alerts (fingerprint, starts_at, received_at) "
                           "VALUES (?,?,?) ON CONFLICT DO NOTHING")
        out = []
        with self._write() as cur:
            for fingerprint, starts_at in alerts:
                cur.execute(seen, (now, fingerprint, starts_at))
                if cur.rowcount:
                    out.append(False)
                    continue
                cur.execute(insert, (fingerprint, starts_at, now))
                out.append(int(cur.rowcount) == 1)
        return out

    def forget_alerts(self, cutoff: float, max_alerts: int,
                      chunk_rows: int = RETENTION_CHUNK_ROWS) -> int:
        """Delete the alerts not seen since ``cutoff``, then all but the newest ``max_alerts``,
        ``chunk_rows`` per transaction; returns how many were deleted."""
        pick = ("WHERE received_at < ? LIMIT {n}",
                "ORDER BY received_at DESC, fingerprint DESC, starts_at DESC LIMIT {n} OFFSET {keep}")
        total = 0
        for where, args in zip(pick, ((cutoff,), ()), strict=True):
            sql = self._sql("DELETE FROM {p}alerts WHERE (fingerprint, starts_at) IN "
                            "(SELECT fingerprint, starts_at FROM {p}alerts "
                            + where.format(n=int(chunk_rows), keep=int(max_alerts)) + ")")
            while True:
                with self._write() as cur:
                    cur.execute(sql, args)
                    n = int(cur.rowcount)
                total += n
                if n < chunk_rows:
                    break
        return total


class SQLiteStore(EventStore):
    """The embedded store: one SQLite file in WAL mode; one writer connection, one reader."""

    dialect = "sqlite"
    integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: Path, prefix: str = "modelloop_", synchronous: str = "FULL",
                 vacuum_at_open_max_bytes: int = SQLITE_VACUUM_AT_OPEN_MAX_BYTES) -> None:
        super().__init__(prefix)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous
        self._w = self._connect()
        self._r = self._connect()
        self.create_schema()
        self._make_incremental(vacuum_at_open_max_bytes)

    def _connect(self) -> sqlite3.Connection:
        try:
            # autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE) by writers
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0,
                                   isolation_level=None)
            # takes effect in a new file (before its first table), else at the next VACUUM
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_LIMIT_BYTES}")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc
        return conn

    def _columns(self, cur: Any, table: str) -> set[str]:
        cur.execute(self._sql(f"PRAGMA table_info({{p}}{table})"))
        return {row[1] for row in cur.fetchall()}

    def _begin(self, conn: Any) -> None:
        # take the write lock up front, so a read-then-write block cannot interleave
        conn.execute("BEGIN IMMEDIATE")

    def _writer(self) -> sqlite3.Connection:
        return self._w

    def _reader(self) -> sqlite3.Connection:
        return self._r

    def _pragma(self, name: str) -> int:
        with self._wlock:
            return int(self._w.execute(f"PRAGMA {name}").fetchone()[0])

    def _make_incremental(self, vacuum_max_bytes: int) -> None:
        """A file made before the store set ``auto_vacuum`` keeps its size whatever is deleted
        (its free pages are reused by new events). A small one is rebuilt now; a large one is
        left as it is, because rebuilding it would hold up start-up for minutes and need its
        size again in free disk (VACUUM copies the database, here through the WAL)."""
        if self._pragma("auto_vacuum") == 2:
            return
        size = self.used_bytes()
        if size > vacuum_max_bytes:
            log.warning("SQLite store %s (%d MiB) was made without incremental auto-vacuum: "
                        "retention frees space for new events, but the file will not shrink. "
                        "To convert it, stop the sidecar and run: sqlite3 %s "
                        "'PRAGMA auto_vacuum=INCREMENTAL; VACUUM;' (needs its size free on disk)",
                        self.path, size >> 20, self.path)
            return
        with self._wlock:
            self._w.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._w.execute("VACUUM")
            self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        log.info("SQLite store %s (%d MiB) rebuilt with incremental auto-vacuum", self.path,
                 size >> 20)

    def used_bytes(self) -> int:
        """The database's pages in use (the whole file: events dominate), without free pages."""
        with self._wlock:
            size, pages, free = (int(self._w.execute(f"PRAGMA {name}").fetchone()[0])
                                 for name in ("page_size", "page_count", "freelist_count"))
        return (pages - free) * size

    def _free_pages(self) -> None:
        with self._wlock:
            # executescript steps the pragma to its end (execute frees one page per step)
            self._w.executescript("PRAGMA incremental_vacuum")

    def checkpoint(self) -> None:
        with self._wlock:
            self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def close(self) -> None:
        with self._wlock, self._rlock:
            with contextlib.suppress(sqlite3.Error):
                # fold the WAL back into the database file on a clean shutdown
                self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._r.close()
            self._w.close()


class PostgresStore(EventStore):
    """The shared store for many replicas: PostgreSQL through psycopg 3."""

    dialect = "postgresql"
    placeholder = "%s"
    blob_type = "BYTEA"
    real_type = "DOUBLE PRECISION"
    seq_type = "BIGSERIAL PRIMARY KEY"
    add_column = "ADD COLUMN IF NOT EXISTS"  # replicas starting together may both add it

    def __init__(self, url: str, prefix: str = "modelloop_") -> None:
        import psycopg

        super().__init__(prefix)
        self.integrity_errors = (psycopg.IntegrityError,)
        self.url = url
        self._w: Any = None
        self._r: Any = None
        self.create_schema()

    def _connect(self, autocommit: bool = False) -> Any:
        import psycopg

        try:
            return psycopg.connect(self.url, connect_timeout=10, autocommit=autocommit)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL store {redact_url(self.url)}: "
                             f"{str(exc).strip()}") from exc

    def _lock_schema(self, cur: Any) -> None:
        # until commit: two replicas migrating a store at once (an index built, then the ones it
        # replaces dropped) would each hold the table's SHARE lock and wait for the other's
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{self.table_prefix}schema",))

    def _columns(self, cur: Any, table: str) -> set[str]:
        cur.execute("SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = %s", (self.table_prefix + table,))
        return {row[0] for row in cur.fetchall()}

    def _reader(self) -> Any:
        if self._r is None or self._r.closed or self._r.broken:
            self._r = self._connect(autocommit=True)
        return self._r

    def _writer(self) -> Any:
        if self._w is None or self._w.closed or self._w.broken:
            self._w = self._connect()
        return self._w

    def _add_rows(self, cur: Any, insert: str,
                  rows: list[EventRow]) -> tuple[dict[str, int], list[str]]:
        """As the base class, with the rows sent as one binary array per column and inserted by
        one statement (``unnest``, in their order). The server's work per row is the insert
        itself: a temporary table filled by COPY and merged from (the way before) cost it a
        second write per row and catalog changes per transaction, 47-49k against 52-59k events
        a second on two cores (BENCHMARKS.md)."""
        if not rows:  # (a batch of shadow answers only)
            return {}, []
        columns = [list(column) for column in zip(*rows, strict=True)]
        cur.execute(self._sql(
            f"WITH ins AS (INSERT INTO {{p}}events ({_EVENT_COLS}) SELECT {_EVENT_COLS} FROM unnest("
            f"{_PG_ARRAYS}) WITH ORDINALITY AS s({_EVENT_COLS}, n) ORDER BY n "
            "ON CONFLICT (request_id) DO NOTHING RETURNING model) "
            "SELECT model, count(*) FROM ins GROUP BY model"), columns)
        new = dict.fromkeys(columns[1], 0) | {m: int(n) for m, n in cur.fetchall()}
        if sum(new.values()) == len(rows):
            return new, []
        return new, self._differing(cur, rows)  # some ids were stored before

    def used_bytes(self) -> int:
        """An estimate of the bytes the events take, indexes included: the rows times the
        newest 1000 rows' average size (and a line pointer each), scaled by the share of the
        indexes in the table's files. Not the files' size itself: PostgreSQL does not shrink
        them after a delete (autovacuum makes the space reusable), so that size would not fall
        and every retention run would delete more."""
        with self._read() as cur:
            cur.execute(self._sql(
                "SELECT (SELECT count(*) FROM {p}events), "
                "(SELECT avg(pg_column_size(e.*)) FROM "
                "(SELECT * FROM {p}events ORDER BY seq DESC LIMIT 1000) e), "
                "pg_total_relation_size('{p}events'), pg_table_size('{p}events')"))
            rows, row_bytes, total, table = cur.fetchone()
        if not rows:
            return 0
        return int(rows * (float(row_bytes) + 4) * total / max(table, 1))

    def close(self) -> None:
        with self._wlock, self._rlock:
            for conn in (self._w, self._r):
                if conn is not None:
                    conn.close()


_PG_ARRAYS = ", ".join(f"%b::{t}[]" for t in ("text", "text", "int4", "float8", "text", "bytea", "float8",
                                             "bytea", "float8", "float8"))
"""The events' columns (:data:`_EVENT_COLS`) as binary array parameters of their types."""

_SAME_COLS = ("{t}.model, {t}.version, {t}.ts, {t}.mode, {t}.features, {t}.prediction, "
              "{t}.probabilities, {t}.latency_s")
"""The columns two events of one request id must share to be the same prediction (every one but
``received_at``, as :func:`_same_event`)."""


def _same_event(a: EventRow, b: EventRow) -> bool:
    """The same prediction: every column but ``received_at`` (what a re-send changes) equal;
    features and probabilities compared as their packed bytes, so a missing value (NaN)
    matches itself."""
    return a[:-1] == b[:-1]


def redact_url(url: str) -> str:
    # never log a password from the URL
    head, sep, tail = url.partition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, creds = head.partition("//")
    return f"{scheme}//{creds.split(':', 1)[0]}:***@{tail}"


def open_store(url: str, prefix: str = "modelloop_", sqlite_synchronous: str = "FULL") -> EventStore:
    """Open (and create the tables of) the store at ``url``: ``sqlite:///path`` or
    ``postgresql://...``."""
    if url.startswith("sqlite:///"):
        return SQLiteStore(Path(url[len("sqlite:///"):]), prefix, sqlite_synchronous)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, prefix)
    raise StoreError(f"unsupported store URL {url!r}: use sqlite:///PATH or postgresql://...")
