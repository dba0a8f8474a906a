"""Ingest: validate event batches, feedback and retraining requests at the boundary, and commit
events in groups.

A batch is checked whole before anything is written: JSON as RFC 8259 has it (no ``NaN``), the
schema (:class:`EventBatch`), then each event against its model version's metadata (watched
model, registered version, feature count, probabilities, class index, a prediction that is the
most probable class). One bad event rejects the batch with errors that name it
(``events[3].version: ...``), so the store never holds half a batch. A request id that comes
twice is not an error of the batch: the store keeps the first event and marks the id ambiguous
when the two differ (:meth:`~monitoring.store.EventStore.insert_batches`).

:class:`GroupCommitWriter` merges batches that arrive together into one transaction (one fsync)
and resolves each caller's future only after the commit: an acknowledged event is durable.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import queue
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import orjson
import pydantic_core
from pydantic import BaseModel, Field, StrictStr, TypeAdapter, ValidationError

from modelloop.categorical import columns, is_categorical
from modelloop.http import ApiError
from modelloop.registry import Registry, RegistryError
from modelloop.schemas import (
    MODE_SHADOW,
    ColumnBatch,
    EventBatch,
    EventColumns,
    Feedback,
    ModelMetadata,
    PackedMatrix,
    PredictionEvent,
    Task,
    Text,
)
from monitoring.records import EventRow, Stored, pack, pack_row
from monitoring.store import EventStore

log = logging.getLogger(__name__)
FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Features beyond float32 cannot come from serving (its models take float32); one such value
(1e300) would make a drift score of 1e297."""
PROB_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class TimeBounds:
    """Timestamps the sidecar takes: not older than retention keeps (the row would be deleted
    at once), not further ahead than the senders' clocks may run."""

    max_age_s: float = math.inf
    max_skew_s: float = math.inf

    def problem(self, ts: np.ndarray, now: float) -> tuple[int, str] | None:
        """The first timestamp out of bounds (its index and why), or None."""
        bad = ~((ts >= now - self.max_age_s) & (ts <= now + self.max_skew_s))
        if not bad.any():
            return None
        i = _first(bad)
        side = "in the future" if ts[i] > now else "older than the retention age"
        return i, (f"{ts[i]:.6g} is {side} (now {now:.0f}; at most {self.max_skew_s:g} s ahead "
                   f"and {self.max_age_s:g} s behind)")


class InputError(ApiError):
    """Refused input: HTTP status, a ``reason`` for the metrics (the error's ``code``), errors
    naming the fields (``events[3].version: ...``; the first one's field is the error's
    ``field``), and how many events or labels it refuses (``rejected``). Its body adds
    ``error_count`` and ``rejected`` to the core's shape (:mod:`modelloop.http`)."""

    def __init__(self, status: int, reason: str, errors: list[str], rejected: int = 1) -> None:
        named = _FIELD.match(errors[0]) if errors else None
        super().__init__(status, reason, named.group(1) if named else None, errors,
                         extra={"error_count": len(errors), "rejected": rejected})

    @property
    def reason(self) -> str:
        return self.code

    @property
    def rejected(self) -> int:
        return int(self.extra["rejected"])

    @property
    def errors(self) -> list[str]:
        return self.messages


_FIELD = re.compile(r"^([\w.\[\]-]+): ")
"""The field an error's message starts with (``events[3].version: ...``)."""


class NotStored(RuntimeError):
    """Valid events that were not stored: the store failed, or the sidecar is shutting down.
    Nothing was acknowledged, so the sender keeps the batch and retries it (503)."""


_UNION_TAG = re.compile(r"^(float|[\w-]+\[.*\])$")
"""A union member's tag in an error's location (``float``, ``function-after[...]``): pydantic's
words for which member failed, not a field a sender wrote."""


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and _UNION_TAG.match(part):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def format_validation(exc: ValidationError, prefix: str = "") -> list[str]:
    """Pydantic errors as ``events[3].version: Input should be ...`` lines."""
    lines: list[str] = []
    said: dict[str, bool] = {}
    for err in exc.errors(include_url=False):
        where = _loc(err["loc"])
        if prefix:
            where = f"{prefix}{'' if where.startswith('[') else '.'}{where}" if where != "body" else prefix
        # a union's members each say why a value failed them: one line per value, the member
        # of the value's own kind (a string's length, not that it is not a number)
        text = isinstance(err.get("input"), str)
        if where in said and (said[where] or not text or err["type"].startswith("float")):
            continue
        if where in said:
            lines = [line for line in lines if not line.startswith(f"{where}: ")]
        said[where] = text and not err["type"].startswith("float")
        lines.append(f"{where}: {err['msg']}")
    return lines


class ModelCatalog:
    """Metadata of watched model versions from the registry, cached (versions are immutable)."""

    def __init__(self, registry: Registry, models: Sequence[str] = ()) -> None:
        self.registry = registry
        self.models = list(models)
        self._cache: dict[tuple[str, int], ModelMetadata] = {}
        self._lock = threading.Lock()

    def watched(self, model: str) -> bool:
        return not self.models or model in self.models

    def watched_models(self) -> list[str]:
        return self.models or self.registry.models()

    def metadata(self, model: str, version: int) -> ModelMetadata:
        """The metadata of ``model`` v``version``; :class:`RegistryError` when it is not there."""
        key = (model, version)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        meta = self.registry.get(model, version).metadata
        with self._lock:
            self._cache[key] = meta
        return meta

    def check(self, model: str, version: int) -> ModelMetadata | str:
        """The metadata, or why events of this model version cannot be accepted."""
        if not self.watched(model):
            return f"model {model!r} is not watched by this sidecar (watching: {', '.join(self.models)})"
        try:
            return self.metadata(model, version)
        except RegistryError as exc:
            if model not in self.registry.models():
                return f"model {model!r} is not registered under {self.registry.root}"
            return str(exc)


_batch_adapter = TypeAdapter(EventBatch)
_columns_adapter = TypeAdapter(ColumnBatch)
_COLUMNS = re.compile(rb'^\s*\{\s*"columns"\s*:')


class Sampled(NamedTuple):
    """What a column group says of serving's event sample: the predictions of ``model`` that
    its rows stand for (``seen``: theirs and those the sample left out) and the share they were
    sent under (:class:`~modelloop.schemas.EventColumns`)."""

    model: str
    seen: int
    share: float


class ParsedEvents(NamedTuple):
    """A valid ``POST /events`` body: the rows to store, and what each of its column groups
    says of serving's sample. Parsing only reports the latter: it is told to the
    :class:`~monitoring.sampling.SampleBook` once the rows are committed
    (:meth:`monitoring.sidecar.Sidecar.stored_events` says which)."""

    rows: list[EventRow]
    sampled: list[Sampled]


def parse_events(body: bytes, catalog: ModelCatalog, received_at: float,
                 bounds: TimeBounds = TimeBounds()) -> ParsedEvents:
    """Validate a ``{"events": [...]}`` or ``{"columns": [...]}`` body (serving sends columns);
    the rows to store and what serving's sample says of them (the events form says nothing), or
    :class:`InputError`."""
    if _COLUMNS.match(body):
        return parse_columns(body, catalog, received_at, bounds)
    batch = _validate(_batch_adapter, body, _count_events)
    events = batch.events
    errors: list[tuple[int, str]] = []
    reasons: set[str] = set()
    metas, groups = _by_version(events, catalog, received_at, bounds, errors, reasons)
    rows: list[tuple[int, EventRow]] = []
    for key, idx in groups.items():
        # one matrix per model version (same width): finiteness checked and rows packed at once
        meta = metas[key]
        values = [events[i].features for i in idx]
        objects = isinstance(meta, ModelMetadata) and is_categorical(meta)
        if objects and isinstance(meta, ModelMetadata):  # the numbers only: checked for range
            values = [[row[j] for j in columns(meta)[0]] for row in values]
        feats = np.array(values, dtype=np.float64).reshape(len(idx), -1)  # None -> NaN
        probs = _matrix([events[i].probabilities for i in idx])
        bad = np.asarray((np.abs(feats) > FLOAT32_MAX).any(axis=1))  # inf too; NaN is missing
        bad_p: np.ndarray = (np.zeros(len(idx), bool) if probs is None else ~_distributions(probs))
        pred = np.array([events[i].prediction for i in idx], dtype=np.float64)
        classes = (isinstance(meta, ModelMetadata) and meta.task == Task.classification
                   and bool(meta.class_labels))  # the class index was checked against these
        bad_top = (~_most_probable(pred, probs) if classes and probs is not None
                   else np.zeros(len(idx), bool))
        for j, i in enumerate(idx):
            if bad[j]:
                errors.append((i, f"events[{i}].features: {_FEATURES_RULE}"))
                reasons.add("wrong_shape")
                continue
            ev = events[i]
            if bad_p[j]:
                errors.append((i, f"events[{i}].probabilities: {_PROBS_RULE}"))
                reasons.add("wrong_shape")
                continue
            if bad_top[j] and probs is not None:
                errors.append((i, f"events[{i}].prediction: {_top_problem(pred[j], probs[j])}"))
                reasons.add("wrong_shape")
                continue
            p_blob = probs[j].tobytes() if probs is not None else (
                None if ev.probabilities is None else pack(ev.probabilities))
            rows.append((i, EventRow(ev.request_id, ev.model, ev.version, ev.timestamp, ev.mode,
                                     pack_row(ev.features) if objects else feats[j].tobytes(),
                                     ev.prediction, p_blob, ev.latency_s, received_at)))
    if errors:
        errors.sort()
        reason = next(r for r in ("unknown_model", "wrong_shape", "invalid_event") if r in reasons)
        raise InputError(422, reason, [m for _, m in errors], len(events))
    rows.sort(key=lambda r: r[0])
    return ParsedEvents([r for _, r in rows], [])


VersionKey = tuple[str, int]


def _by_version(events: list[PredictionEvent], catalog: ModelCatalog, received_at: float,
                bounds: TimeBounds, errors: list[tuple[int, str]], reasons: set[str],
                ) -> tuple[dict[VersionKey, ModelMetadata | str], dict[VersionKey, list[int]]]:
    """Each model version's metadata (or why its events cannot be accepted), and the indexes of
    its events that fit it; an event that does not is added to ``errors`` (and its reason to
    ``reasons``) instead."""
    metas: dict[VersionKey, ModelMetadata | str] = {}
    groups: dict[VersionKey, list[int]] = {}
    for i, ev in enumerate(events):
        key = (ev.model, ev.version)
        meta = metas.get(key)
        if meta is None:
            meta = metas[key] = catalog.check(*key)
        if isinstance(meta, str):
            errors.append((i, f"events[{i}].model: {meta}"))
            reasons.add("unknown_model")
            continue
        kind = _kind_problem([ev.features], meta)
        if kind:
            errors.append((i, f"events[{i}].features[{kind[1]}]: {kind[2]}"))
            reasons.add("invalid_event")
            continue
        problem = _shape_problem(ev.features, ev.prediction, ev.probabilities, meta)
        late = bounds.problem(np.array([ev.timestamp]), received_at)
        if late is not None:
            problem = problem or f"timestamp: {late[1]}"
        if problem:
            errors.append((i, f"events[{i}].{problem}"))
            reasons.add("wrong_shape")
            continue
        groups.setdefault(key, []).append(i)
    return metas, groups


_NOT_JSON = re.compile(r"-?(NaN|Infinity)")
_LINE_COLUMN = re.compile(r"at line (\d+) column (\d+)$")


def load_json(body: bytes) -> Any:
    """The body as JSON (RFC 8259: ``NaN`` and ``Infinity`` are not JSON; a missing feature is
    ``null``); a 400 naming what and where, else. The same parser as pydantic's, so numbers
    read as they always did."""
    try:
        return pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        msg = str(exc)
        where = _LINE_COLUMN.search(msg)
        if where:
            line, column = int(where.group(1)), int(where.group(2))
            text = body.split(b"\n", line)[line - 1].decode("utf-8", "replace") if line else ""
            token = _NOT_JSON.match(text, max(column - 1, 0))
            if token:
                msg = (f"{token.group()} is not JSON (a missing value is null) "
                       f"at line {line} column {column}")
        raise InputError(400, "invalid_json", [f"body: invalid JSON ({msg})"]) from None


def _validate(adapter: TypeAdapter[Any], body: bytes, count: Callable[[bytes], int]) -> Any:
    """The body validated by ``adapter``; what is not JSON is a 400, a schema error a 422
    counting ``count(body)`` rejected events."""
    data = load_json(body)
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise InputError(422, "invalid_event", format_validation(exc), count(body)) from exc


def parse_columns(body: bytes, catalog: ModelCatalog, received_at: float,
                  bounds: TimeBounds = TimeBounds()) -> ParsedEvents:
    """Validate a :class:`ColumnBatch` body: the schema, then each group against its model
    version with whole-matrix checks; errors name ``columns[g].field[row]``. A shadow group
    says nothing of the sample: a challenger's answers stand for no prediction made."""
    batch = _validate(_columns_adapter, body, _count_rows)
    errors: list[str] = []
    reasons: set[str] = set()
    rows: list[EventRow] = []
    total = sum(sum(g.rows) for g in batch.columns)
    for gi, g in enumerate(batch.columns):
        where = f"columns[{gi}]"
        meta = catalog.check(g.model, g.version)
        if isinstance(meta, str):
            errors.append(f"{where}.model: {meta}")
            reasons.add("unknown_model")
            continue
        kind = None if isinstance(g.features, PackedMatrix) else _kind_problem(g.features, meta)
        if kind:
            errors.append(f"{where}.features[{kind[0]}][{kind[1]}]: {kind[2]}")
            reasons.add("invalid_event")
            continue
        problem, feats, probs = _check_columns(g, meta)
        late = bounds.problem(np.asarray(g.timestamp, dtype=np.float64), received_at)
        if late is not None:
            problem = problem or f"timestamp[{late[0]}]: {late[1]}"
        if problem:
            errors.append(f"{where}.{problem}")
            reasons.add("wrong_shape")
            continue
        # column by column, then one tuple a row (zip and map: no Python code a row)
        ts = np.repeat(np.asarray(g.timestamp), g.rows).tolist()
        latency = np.repeat(np.asarray(g.latency_s), g.rows).tolist()
        blobs = [pack_row(row) for row in feats] if is_categorical(meta) else _row_bytes(feats)
        rows += map(_event_row, zip(
            g.row_ids(), itertools.repeat(g.model), itertools.repeat(g.version), ts,
            itertools.repeat(g.mode), blobs, g.prediction,
            itertools.repeat(None) if probs is None else _row_bytes(probs), latency,
            itertools.repeat(received_at)))
    if errors:
        reason = next(r for r in ("unknown_model", "wrong_shape", "invalid_event") if r in reasons)
        raise InputError(422, reason, errors, total)
    return ParsedEvents(rows, [Sampled(g.model, sum(g.rows) if g.seen is None else g.seen, g.share)
                               for g in batch.columns if g.mode != MODE_SHADOW])


_event_row = functools.partial(tuple.__new__, EventRow)
"""``EventRow._make`` without its Python frame: called once a stored event."""


def _row_bytes(matrix: np.ndarray) -> list[bytes]:
    """Each row of ``matrix`` as its bytes (what ``matrix[r].tobytes()`` gives), cut from one
    buffer: a slice a row instead of a view and a copy."""
    data = np.ascontiguousarray(matrix).tobytes()
    step = matrix.shape[1] * matrix.itemsize if matrix.ndim == 2 else 0
    if not step:
        return [b""] * len(matrix)
    return [data[i:i + step] for i in range(0, len(data), step)]


Checked = tuple[str | None, np.ndarray, np.ndarray | None]


def _first(mask: np.ndarray) -> int:
    return int(np.argwhere(mask)[0][0])


_EMPTY = np.empty((0, 0))


def _column_matrix(values: list[list[float | str | None]] | list[list[float]] | PackedMatrix,
                   width: int | None,
                   field: str, tag: str) -> tuple[str | None, np.ndarray]:
    """A column of per-row values (JSON lists, or packed) as a float64 matrix of ``width``
    values per row (None: the width of its first row), or what does not fit."""
    if isinstance(values, PackedMatrix):
        if width is not None and values.shape[1] != width:
            return f"{field}.shape: expected {width} values per row for {tag}, got {values.shape[1]}", _EMPTY
        return None, values.array().astype(np.float64)
    rows: Sequence[Sequence[float | str | None]] = values  # no strings: their kinds were checked
    if width is None:
        width = len(rows[0]) if rows else 0
    r = next((r for r, v in enumerate(rows) if len(v) != width), None)
    if r is not None:
        return f"{field}[{r}]: expected {width} values for {tag}, got {len(rows[r])}", _EMPTY
    return None, np.array(rows, dtype=np.float64).reshape(-1, width)


def _check_columns(g: EventColumns, meta: ModelMetadata) -> Checked:
    """What does not fit the model version in a column group (whole-matrix checks), and the
    features and probabilities as float64 matrices (NaN for null)."""
    tag, n = f"{meta.name} v{meta.version}", meta.n_features
    empty = np.empty((0, n))
    if is_categorical(meta):
        problem, feats, numbers = _object_matrix(g.features, meta, tag)
    else:
        problem, feats = _column_matrix(g.features, n, "features", tag)
        numbers = feats
    if problem:
        return problem, empty, None
    if (too_big := np.abs(numbers) > FLOAT32_MAX).any():  # inf too; NaN is a missing value
        return f"features[{_first(too_big)}]: {_FEATURES_RULE}", empty, None
    pred = np.asarray(g.prediction, dtype=np.float64)
    if not np.isfinite(pred).all():
        return f"prediction[{_first(~np.isfinite(pred))}]: must be a finite number", empty, None
    k = len(meta.class_labels) if meta.task == Task.classification and meta.class_labels else None
    if k is not None and ((bad := (pred != np.round(pred)) | (pred < 0) | (pred >= k)).any()):
        r = _first(bad)
        return f"prediction[{r}]: expected a class index 0..{k - 1} for {tag}, got {pred[r]:g}", empty, None
    if g.probabilities is None:
        return None, feats, None
    problem, probs = _column_matrix(g.probabilities, k, "probabilities", tag)
    if problem:
        return problem, empty, None
    if not (ok := _distributions(probs)).all():
        return f"probabilities[{_first(~ok)}]: {_PROBS_RULE}", empty, None
    if k is not None and not (ok := _most_probable(pred, probs)).all():
        r = _first(~ok)
        return f"prediction[{r}]: {_top_problem(pred[r], probs[r])}", empty, None
    return None, feats, probs


def _object_matrix(values: list[list[float | str | None]] | PackedMatrix, meta: ModelMetadata,
                   tag: str) -> tuple[str | None, np.ndarray, np.ndarray]:
    """The rows of a model with categorical features (lists whose values' kinds were checked)
    as an object matrix, and its numeric columns as float64 (NaN for null); or what does not fit."""
    n = meta.n_features
    if isinstance(values, PackedMatrix):
        return (f"features: {tag} has categorical features ({', '.join(meta.categorical_features)}): "
                "send its rows as lists, strings in their positions", _EMPTY, _EMPTY)
    r = next((r for r, v in enumerate(values) if len(v) != n), None)
    if r is not None:
        return f"features[{r}]: expected {n} values for {tag}, got {len(values[r])}", _EMPTY, _EMPTY
    out = np.empty((len(values), n), dtype=object)
    out[:] = values
    numeric = columns(meta)[0]
    return None, out, np.asarray(out[:, numeric], dtype=np.float64)


def _kind_problem(rows: Sequence[Sequence[float | str | None]],
                  meta: ModelMetadata) -> tuple[int, int, str] | None:
    """The first value of ``rows`` of the wrong kind for its feature (its row, its position and
    why): a string where the model version takes a number, or a number where it takes a
    category's string."""
    cats = set(columns(meta)[1])
    if not cats and str not in set(map(type, itertools.chain.from_iterable(rows))):
        return None  # a numeric model's rows without a string: the common case, in C
    for r, row in enumerate(rows):
        for j, v in enumerate(row[:meta.n_features]):
            if v is None or (type(v) is str) == (j in cats):
                continue
            if j in cats:
                return r, j, (f"Input should be a string or null (feature {meta.feature_names[j]!r} "
                              f"of {meta.name} v{meta.version} is categorical), got {v!r}")
            return r, j, "Input should be a valid number"
    return None


_FEATURES_RULE = "values must be numbers within float32 range (|x| <= 3.4e38) or null"
_PROBS_RULE = f"values must be in [0, 1] and sum to 1 (within {PROB_SUM_TOLERANCE:g})"


def _distributions(probs: np.ndarray) -> np.ndarray:
    """Per row: every value in [0, 1] (NaN fails) and the row sums to 1."""
    in_range = ((probs >= 0) & (probs <= 1)).all(axis=1)
    return np.asarray(in_range & (np.abs(probs.sum(axis=1) - 1) <= PROB_SUM_TOLERANCE))


def _most_probable(pred: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per row: the predicted class (an index in range, checked before) is a most probable one
    (serving predicts the argmax; a tie at the top may go either way)."""
    top = probs[np.arange(len(pred)), pred.astype(np.int64)]
    return np.asarray(top >= probs.max(axis=1))


def _top_problem(pred: float, probs: np.ndarray) -> str:
    return (f"class {pred:g} is not the most probable class of the event's probabilities "
            f"(class {int(probs.argmax())}: {probs.max():.6g}; class {pred:g}: "
            f"{probs[int(pred)]:.6g})")


def _count_rows(body: bytes) -> int:
    """Rows of a column batch that failed validation (for the rejected counter)."""
    try:
        data = orjson.loads(body)
        return max(1, sum(len(g.get("prediction") or []) for g in data["columns"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return 1


def _matrix(values: list[list[float] | None]) -> np.ndarray | None:
    """The probabilities of a group as one matrix, when every event has them at one width."""
    if not values or values[0] is None:
        return None
    width = len(values[0])
    if any(v is None or len(v) != width for v in values):
        return None
    return np.array(values, dtype=np.float64)


def _shape_problem(features: Sequence[float | str | None], prediction: float,
                   probabilities: list[float] | None, meta: ModelMetadata) -> str | None:
    tag = f"{meta.name} v{meta.version}"
    if len(features) != meta.n_features:
        return f"features: expected {meta.n_features} values for {tag}, got {len(features)}"
    if meta.task == Task.classification and meta.class_labels:
        k = len(meta.class_labels)
        if prediction != int(prediction) or not 0 <= prediction < k:
            return f"prediction: expected a class index 0..{k - 1} for {tag}, got {prediction:g}"
        if probabilities is not None and len(probabilities) != k:
            return f"probabilities: expected {k} values for {tag}, got {len(probabilities)}"
    return None


def _count_events(body: bytes) -> int:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 1
    events = data.get("events") if isinstance(data, dict) else None
    return len(events) if isinstance(events, list) and events else 1


# -- feedback ------------------------------------------------------------------------------------
_feedback_list = TypeAdapter(list[Feedback])


def parse_feedback(body: bytes, now: float | None = None,
                   bounds: TimeBounds = TimeBounds()) -> tuple[list[Feedback], bool]:
    """One ``{request_id, label}`` object or ``{"feedback": [...]}``; the labels, and whether it
    was the single form (its errors name ``label``, not ``feedback[0].label``). Timestamps out
    of ``bounds`` around ``now`` are refused."""
    items, single = _parse_feedback(body)
    if now is not None:
        stamped = [(i, f.timestamp) for i, f in enumerate(items) if f.timestamp is not None]
        if stamped:
            late = bounds.problem(np.array([t for _, t in stamped], dtype=np.float64), now)
            if late is not None:
                i = stamped[late[0]][0]
                where = "timestamp" if single else f"feedback[{i}].timestamp"
                raise InputError(422, "invalid_feedback", [f"{where}: {late[1]}"], len(items))
    return items, single


def _parse_feedback(body: bytes) -> tuple[list[Feedback], bool]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InputError(400, "invalid_json", [f"body: invalid JSON ({exc})"]) from exc
    if isinstance(data, dict) and "feedback" in data:
        items, prefix = data["feedback"], "feedback"
        if not isinstance(items, list) or not items:
            raise InputError(422, "invalid_feedback", ["feedback: must be a non-empty list"])
        try:
            return _feedback_list.validate_python(items), False
        except ValidationError as exc:
            raise InputError(422, "invalid_feedback", format_validation(exc, prefix), len(items)) from exc
    try:
        return [Feedback.model_validate(data)], True
    except ValidationError as exc:
        raise InputError(422, "invalid_feedback", format_validation(exc)) from exc


_INDEX = re.compile(r"[0-9]{1,9}")
_DECIMAL = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def resolve_label(label: str | int | float, meta: ModelMetadata) -> float | str:
    """The stored value of a label, or a string saying why it does not fit the model version.

    A classifier's label is a class name exactly as the model has it, or a class index: a
    whole JSON number, or a string of ASCII digits (``"1"``; not ``" 1 "``, ``"-0"`` or other
    scripts' digits). Any other task's label is a finite number, or a string of one in plain
    decimal notation (``"3.5"``, ``"-1e3"``), as a CSV column holds it.
    """
    tag = f"{meta.name} v{meta.version}"
    if meta.task == Task.classification and meta.class_labels:
        labels = meta.class_labels
        if isinstance(label, str):
            if label in labels:
                return float(labels.index(label))
            if not _INDEX.fullmatch(label):
                return f"{label!r} is not a class of {tag} (classes: {', '.join(labels)})"
            label = int(label)
        if isinstance(label, float) and not label.is_integer():
            return f"{label!r} is not a class index of {tag}"
        if not 0 <= label < len(labels):
            return f"class index {label:g} is out of range for {tag} (0..{len(labels) - 1})"
        return float(int(label))
    if isinstance(label, str) and not _DECIMAL.fullmatch(label):
        return f"{label!r} is not a number (the target of {tag})"
    value = float(label)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        return f"{label!r} is not a finite number within float32 range"
    return value


# -- retraining requests -----------------------------------------------------------------------------
class RetrainRequest(BaseModel):
    """``POST /retrain``: the model to retrain and why (``manual request`` when left out)."""

    model: StrictStr = Field(min_length=1)
    reason: Text | None = Field(None, max_length=1000)


_RETRAIN_RULES = {"model": "model: required, the name of the model to retrain",
                  "reason": "reason: must be a string of at most 1000 characters (no NUL)"}


def parse_retrain(body: bytes) -> RetrainRequest:
    """A ``POST /retrain`` body (an empty one is ``{}``); one line per field that is wrong."""
    try:
        return RetrainRequest.model_validate_json(body or b"{}")
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise InputError(400, "invalid_json", ["body: invalid JSON"]) from exc
        fields = {str(e["loc"][0]) if e["loc"] else "model" for e in exc.errors()}
        raise InputError(422, "invalid_request",
                         [_RETRAIN_RULES[f] for f in ("model", "reason") if f in fields]) from exc


# -- group commit ----------------------------------------------------------------------------------
TRIM_AFTER_BYTES = 4 * 1024 * 1024


def release_freed_memory() -> None:
    """Hand memory freed after a large body back to the kernel (glibc's ``malloc_trim``): its
    parsed rows spread over the heap, and glibc would keep those pages for the life of the
    process. Measured with 8 parallel 20 MiB bodies: in ``scripts/bench_sidecar_memory.py``."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        return


@dataclass
class _Pending:
    body: bytes
    future: Future[tuple[int, Stored]] = field(default_factory=Future)
    parsed: ParsedEvents = field(default_factory=lambda: ParsedEvents([], []))


class GroupCommitWriter:
    """One thread validates and writes every event batch; batches that arrive together share a
    transaction (one commit, one fsync).

    Validation runs on this thread too, not on the request threads: it is CPU-bound Python, so
    parallel threads would not speed it up, and a parse thread holding the GIL would stall the
    writer at every row, since SQLite hands the GIL back between rows.
    """

    def __init__(self, store: EventStore, parse: Callable[[bytes], ParsedEvents],
                 max_batches: int = 64,
                 on_stored: Callable[[ParsedEvents, Stored], None] | None = None) -> None:
        """``on_stored(parsed, stored)`` is called on this thread for each batch once it is
        committed (what the batch was, what it came to in the store), before its caller's future
        resolves; never for a batch refused or not stored. So what follows from a batch besides
        its rows follows once it is stored, not from each try of the sender."""
        self.store = store
        self.parse = parse
        self.on_stored = on_stored
        self.max_batches = max_batches
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="event-writer", daemon=True)
        self._closed = False
        self._lock = threading.Lock()
        self._thread.start()

    def submit(self, body: bytes) -> Future[tuple[int, Stored]]:
        """Queue a request body; the future resolves once its events are committed, to the
        number of events and what they came to in the store (the new ones per model; an event
        whose request id was stored before is not stored again). Or it raises
        :class:`InputError` for a bad batch, :class:`NotStored` when the store failed or the
        writer is closed (nothing of it stored either way), and whatever else parsing raised:
        a bug, which the app answers 500 and logs."""
        pending = _Pending(body)
        with self._lock:
            if self._closed:
                pending.future.set_exception(NotStored("the sidecar is shutting down"))
                return pending.future
            self._queue.put(pending)
        return pending.future

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            group = [first]
            while len(group) < self.max_batches:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
            self._commit(group)

    def _commit(self, group: list[_Pending]) -> None:
        try:
            self._write(group)
        finally:
            if sum(len(p.body) for p in group) >= TRIM_AFTER_BYTES:
                release_freed_memory()

    def _write(self, group: list[_Pending]) -> None:
        valid = []
        for p in group:
            try:
                p.parsed = self.parse(p.body)
            except Exception as exc:  # this batch only is refused (InputError) or failed (a bug)
                p.future.set_exception(exc)
                continue
            valid.append(p)
        if not valid:
            return
        try:
            new = self.store.insert_batches([p.parsed.rows for p in valid])
        except Exception as exc:
            log.error("could not store %d event batches: %s", len(valid), exc)
            for p in valid:
                failure = NotStored(str(exc))
                failure.__cause__ = exc
                p.future.set_exception(failure)
            return
        for p, stored in zip(valid, new, strict=True):
            self._stored(p.parsed, stored)
            p.future.set_result((len(p.parsed.rows), stored))

    def _stored(self, parsed: ParsedEvents, stored: Stored) -> None:
        if self.on_stored is None:
            return
        try:
            self.on_stored(parsed, stored)
        except Exception:  # the events are committed: a failing hook must not say otherwise
            log.exception("the writer's on_stored hook failed")

    def close(self, timeout: float = 20.0) -> None:
        """Stop taking batches and commit every one already queued (the shutdown flush)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)
