"""A deliberate, uniform sample of the prediction events serving sends to the sidecar.

When traffic is larger than monitoring needs (1024-row requests at full load fill any buffer),
each model sends the events of a share of its rows: a fixed share (``event_share``, per model
``event_shares``), and under a budget of rows per second (``event_rows_per_s``, per model
``event_rows_per_s_by_model``; all workers together, each worker taking its part) the share
follows the rows predicted, measured once a second. The share is a power of two, and which rows
it keeps is the rule of :mod:`modelloop.sampling` (a hash of the request id), which the sidecar
evaluates again to answer feedback for a request it has no event of as ``not_sampled``.

A request marked as one that will be labelled (``X-Modelloop-Label-Expected: 1``: its id is a
:class:`LabelledId`) keeps every row, so realised accuracy is computed on every labelled
request. Rows predicted and rows sampled are counted per model by the emitter's hooks, and each
group of events sent tells the sidecar how many rows it stands for (``seen``) and under which
share.

Example::

    sampler = EventSampler(share=0.25)
    kept = sampler.select("churn", ["ab12"], [0], [1024], keep_all=[False])
    kept.rows  # the indices of the rows whose events are sent (about 256, evenly spread)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from modelloop.sampling import GOLDEN, base_score, quantize

LABEL_EXPECTED_HEADER = "x-modelloop-label-expected"
MEASURE_S = 1.0  # how often a budget's share follows the rows predicted
MIN_ELAPSED_S = 0.01  # a burst's rate is measured over at least this long


class LabelledId(str):
    """A request id whose request will be labelled: the sample keeps all its rows."""

    __slots__ = ()


def labelled(request_id: str, header: str | None) -> str:
    """``request_id`` as a :class:`LabelledId` when the ``X-Modelloop-Label-Expected`` header
    (HTTP or gRPC metadata) is ``1`` or ``true``."""
    if header is not None and header.strip().lower() in ("1", "true"):
        return LabelledId(request_id)
    return request_id


class Kept(NamedTuple):
    """The rows of some requests that the sample keeps, as runs of consecutive rows: per run its
    request's index, its request id's first row and its length, and every kept row's index in
    the stacked rows (None: all of them)."""

    requests: list[int]
    first_rows: list[int]
    counts: list[int]
    rows: np.ndarray | None


class _Budget:
    """Rows predicted by one model since the last measure, and the share they allow."""

    __slots__ = ("rows", "share", "since")

    def __init__(self, share: float, since: float) -> None:
        self.rows, self.share, self.since = 0, share, since


class EventSampler:
    """Decides, per model, which rows' events are sent (see the module docstring)."""

    def __init__(self, share: float = 1.0, shares: Mapping[str, float] | None = None,
                 rows_per_s: float = 0.0, rows_per_s_by_model: Mapping[str, float] | None = None,
                 workers: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self._share = share
        self._shares = dict(shares or {})
        self._rate = rows_per_s / workers
        self._rates = {m: r / workers for m, r in (rows_per_s_by_model or {}).items()}
        self._clock = clock
        self._budgets: dict[str, _Budget] = {}

    @property
    def active(self) -> bool:
        """Whether any model may be sampled (otherwise every event is sent)."""
        return (self._share < 1 or any(s < 1 for s in self._shares.values())
                or self._rate > 0 or any(r > 0 for r in self._rates.values()))

    def configured(self, model: str) -> float:
        """The share set for ``model`` (its override, else the default)."""
        return self._shares.get(model, self._share)

    def share(self, model: str, rows: int = 0) -> float:
        """The share of ``model``'s rows sent now, with ``rows`` more predicted: the configured
        share, lowered to what the budget allows at the rows per second last measured."""
        configured = quantize(self.configured(model))
        rate = self._rates.get(model, self._rate)
        if rate <= 0:
            return configured
        now = self._clock()
        budget = self._budgets.get(model)
        if budget is None:
            budget = self._budgets[model] = _Budget(configured, now)
        budget.rows += rows
        elapsed = now - budget.since
        # measured each second, and at once when this second's rows at the share in effect
        # already exceed the budget (a burst after a quiet spell: the share was 1), so a burst
        # sends at most about a second's budget before the share follows it
        if elapsed >= MEASURE_S or budget.rows * budget.share > rate * MEASURE_S:
            seen = budget.rows / max(elapsed, MIN_ELAPSED_S)
            budget.share = min(configured, quantize(rate / seen) if seen > rate else 1.0)
            budget.rows, budget.since = 0, now
        return budget.share

    def select(self, model: str, base_ids: Sequence[str], first_rows: Sequence[int],
               counts: Sequence[int], keep_all: Sequence[bool] | None = None,
               measure: bool = True) -> tuple[Kept, float]:
        """The rows of these requests (``counts[i]`` rows of request ``i``, stacked, their ids
        ``<base_ids[i]>-<first_rows[i] + k>``) whose events are sent, and the share used.
        A request with ``keep_all[i]`` (default: its id is a :class:`LabelledId`) keeps all.
        ``measure``: count these rows against the budget (not a challenger's shadow answers)."""
        total = sum(counts)
        share = self.share(model, total if measure else 0)
        k = len(base_ids)
        if keep_all is None:
            keep_all = [isinstance(b, LabelledId) for b in base_ids]
        if share >= 1.0 or all(keep_all):
            return Kept(list(range(k)), list(first_rows), list(counts), None), share
        if total == k:  # a row each (1-row traffic): plain floats, the same arithmetic as below
            keep = [i for i in range(k)
                    if keep_all[i] or (base_score(base_ids[i]) + first_rows[i] * GOLDEN) % 1.0 < share]
            return Kept(keep, [first_rows[i] for i in keep], [1] * len(keep), np.asarray(keep, dtype=np.intp)), share
        counts_a = np.asarray(counts)
        request = np.repeat(np.arange(k), counts_a)
        starts = np.cumsum(counts_a) - counts_a
        row = np.arange(total) - starts[request] + np.asarray(first_rows)[request]
        u0 = np.fromiter((base_score(b) for b in base_ids), np.float64, k)
        mask = ((u0[request] + row * GOLDEN) % 1.0) < share  # modelloop.sampling.row_scores, stacked
        mask |= np.asarray(keep_all)[request]
        idx = np.flatnonzero(mask)
        if not len(idx):
            return Kept([], [], [], idx), share
        # a run starts where the kept rows skip a row or a new request begins
        new = np.ones(len(idx), dtype=bool)
        new[1:] = (np.diff(idx) != 1) | (np.diff(request[idx]) != 0)
        heads = np.flatnonzero(new)
        lengths = np.diff(np.append(heads, len(idx)))
        return Kept(request[idx[heads]].tolist(), row[idx[heads]].tolist(), lengths.tolist(), idx), share
