"""The records the sidecar's store reads and writes: an event row as stored, what a batch of
them came to, a window of events as numpy arrays, what a feedback id points at, and a retraining
job."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
import orjson

from modelloop.schemas import PredictionEvent

if TYPE_CHECKING:
    import pandas as pd

_F8 = np.dtype("<f8")


def pack(values: Sequence[float | None]) -> bytes:
    """Floats (``None`` for missing) as a float64 blob."""
    return np.array([np.nan if v is None else v for v in values], dtype=_F8).tobytes()


def pack_row(values: Sequence[float | str | None]) -> bytes:
    """A row with strings (a model with categorical features) as JSON text, padded with a space
    to a length that is not a multiple of 8: a float64 blob's always is, which is how
    :func:`to_window` tells the two encodings apart without asking the registry. NaN is stored
    as null (missing)."""
    blob = orjson.dumps(list(values))
    return blob + b" " if len(blob) % 8 == 0 else blob


def is_row_json(blob: bytes) -> bool:
    """Whether a stored features blob is a :func:`pack_row` row (else packed float64)."""
    return len(blob) % 8 != 0


def _object_rows(blobs: Sequence[bytes]) -> np.ndarray:
    """JSON rows as an object matrix: floats, strings and None (missing)."""
    rows = [orjson.loads(b) for b in blobs]
    width = len(rows[0])
    if any(len(r) != width for r in rows):
        raise ValueError("window mixes feature widths; ask for one version")
    out = np.empty((len(rows), width), dtype=object)
    out[:] = rows
    return out


def window_frame(features: np.ndarray | pd.DataFrame, feature_names: list[str],
                 categorical: Sequence[str] = ()) -> pd.DataFrame:
    """A window's features (or a reference sample's) as a DataFrame in ``feature_names`` order:
    the ``categorical`` columns as strings (None missing), the others as float64 (NaN missing),
    whether the matrix is float (a numeric model) or object (rows with strings). What a
    retraining job and the drift report read, so a category reaches them as the string the
    model was sent."""
    import pandas as pd

    frame = pd.DataFrame(features, columns=feature_names)
    if not categorical and all(t != np.dtype(object) for t in frame.dtypes):
        return frame
    cats = set(categorical)
    for name in feature_names:
        if name in cats:
            frame[name] = frame[name].astype(object)
        elif frame[name].dtype == object:
            frame[name] = frame[name].to_numpy(dtype=np.float64)  # None -> NaN
    return frame


class EventRow(NamedTuple):
    """A validated event as stored: the columns of the ``events`` table, in order (a tuple, so a
    batch goes to ``executemany`` as it is)."""

    request_id: str
    model: str
    version: int
    ts: float
    mode: str
    features: bytes
    prediction: float
    probabilities: bytes | None
    latency_s: float
    received_at: float

    @classmethod
    def from_event(cls, ev: PredictionEvent, received_at: float, *, objects: bool = False) -> EventRow:
        """The row of an event; ``objects`` for a model with categorical features (every row of
        such a version is stored as :func:`pack_row`, whatever its values)."""
        return cls(
            ev.request_id, ev.model, ev.version, ev.timestamp, ev.mode,
            # a numeric model's values: numbers or None (ingest checked their kinds)
            pack_row(ev.features) if objects else pack(cast("list[float | None]", ev.features)),
            ev.prediction, None if ev.probabilities is None else pack(ev.probabilities),
            ev.latency_s, received_at,
        )


@dataclass
class Window:
    """Events of one query as arrays, newest last. ``label`` is NaN where no label arrived."""

    version: np.ndarray
    ts: np.ndarray
    prediction: np.ndarray
    latency_s: np.ndarray
    label: np.ndarray
    label_ts: np.ndarray
    features: np.ndarray | None = None
    probabilities: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def labelled(self) -> np.ndarray:
        return ~np.isnan(self.label)


@dataclass(frozen=True)
class LabelTarget:
    """What a feedback request id points at: its event's model and version, and whether the event
    already has a label."""

    model: str
    version: int
    labelled: bool
    ambiguous: bool = False
    """Two different predictions came with this id: no label is joined to it."""


@dataclass(frozen=True)
class Stored:
    """What one batch of events came to in the store."""

    new: dict[str, int]
    """Events stored, per model (the others were stored before: a re-send)."""
    conflicts: int = 0
    """Events not stored because their request id holds another prediction (the id is now
    ambiguous)."""
    shadow: int = 0
    """Shadow answers of a challenger in the batch (stored apart, :mod:`serving.shadow`)."""


class JobStatus(StrEnum):
    """Where a retraining job stands: its stored ``status``, what a trigger's ``poll`` reports
    (``running``, ``succeeded``, ``failed``), what a request for a job came to (``running``,
    ``failed``, ``skipped``), and the ``result`` label of ``modelloop_retrain_jobs_total``."""

    started = "started"
    """Recorded, not yet handed to the trigger (or found started by another replica)."""
    running = "running"
    """Started by the trigger."""
    succeeded = "succeeded"
    """Ended with exit status 0."""
    failed = "failed"
    """Could not start, ended with another exit status, vanished, or ran past the timeout."""
    skipped = "skipped"
    """Not allowed now: a request's outcome says why (its ``refused``)."""

    @property
    def active(self) -> bool:
        """Whether a job in this state counts as active (at most one per model)."""
        return self in (JobStatus.started, JobStatus.running)


class Requester(StrEnum):
    """Who asked for a retraining job: a stored job's ``trigger`` and the ``trigger`` label of
    the retraining metrics."""

    policy = "policy"
    """A rule of the policy fired."""
    manual = "manual"
    """``POST /retrain``."""
    alertmanager = "alertmanager"
    """An Alertmanager notification (``POST /alertmanager``)."""


class Refusal(StrEnum):
    """Why a retraining request started no job: the ``reason`` label of
    ``modelloop_retrain_refused_total`` and a ``skipped`` outcome's ``refused``."""

    unknown_model = "unknown_model"
    """The model is not registered (the sidecar asks before a job is requested)."""
    not_watched = "not_watched"
    """This sidecar does not watch the model (asked before a job is requested, too)."""
    duplicate = "duplicate"
    """This trigger's job of the window was started already, by another replica or an earlier
    request."""
    model_busy = "model_busy"
    """Another job of the model is active."""
    at_capacity = "at_capacity"
    """``MODELLOOP_MONITOR_MAX_ACTIVE_JOBS`` jobs are active."""


@dataclass(frozen=True)
class JobRecord:
    """One retraining job as stored."""

    id: str
    model: str
    trigger: Requester
    kind: str
    reason: str
    status: JobStatus
    created_at: float
    ended_at: float | None
    handle: str
    detail: str

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> JobRecord:
        """A row of the jobs table (its columns in field order), its strings made enums."""
        id_, model, trigger, kind, reason, status, created_at, ended_at, handle, detail = row
        return cls(id_, model, Requester(trigger), kind, reason, JobStatus(status), created_at,
                   ended_at, handle, detail)

    @property
    def active(self) -> bool:
        return self.status.active



def to_window(rows: list[Any], features: bool) -> Window:
    n = len(rows)
    cols: list[Any] = (list(zip(*rows, strict=True)) if rows
                       else [() for _ in range(8 if features else 6)])

    def floats(i: int) -> np.ndarray:
        return np.array(cols[i], dtype=np.float64)  # NULL (None) becomes NaN

    win = Window(
        version=np.array(cols[0], dtype=np.int64), ts=floats(1), prediction=floats(2),
        latency_s=floats(3), label=floats(4), label_ts=floats(5),
    )
    if features:
        blobs = cols[6]
        width = len(blobs[0]) // 8 if n else 0
        if n and is_row_json(blobs[0]) and all(is_row_json(b) for b in blobs):
            win.features = _object_rows(blobs)
        elif all(len(b) == width * 8 for b in blobs):
            win.features = np.frombuffer(b"".join(blobs), dtype=_F8).reshape(n, width)
        else:  # rows of different versions can have different widths; the caller picks one
            raise ValueError("window mixes feature widths; ask for one version")
        probs = cols[7]
        if n and all(p is not None for p in probs):
            k = len(probs[0]) // 8
            if all(len(p) == k * 8 for p in probs):
                win.probabilities = np.frombuffer(b"".join(probs), dtype=_F8).reshape(n, k)
    return win
