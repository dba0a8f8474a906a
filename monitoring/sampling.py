"""What serving's event sample told this sidecar: per model, how many rows its events stand for
(exported, so rates of what was predicted stay exact) and the shares it sent them under, which
answer feedback for a request id that has no event.

Serving keeps a row's event when the row's score (:mod:`modelloop.sampling`, a hash of its
request id) is below the share of its model at that time; shares are powers of two. Feedback
carries no model and no time, so an id without an event is answered ``not_sampled`` only when
its score is at least the largest share any model's events came with in the last
``horizon_s`` (then no share in effect, whichever model it belonged to, would have kept it);
otherwise it stays ``unknown`` (its event may still be on its way, or was lost). With a fixed
share this is exact; under a rows-per-second budget whose share moved, ids between the
smallest and the largest share stay ``unknown``. Shares are kept in the store, the largest per
model and hour, so a restarted sidecar, and a replica sharing the store that did not take the
model's events, answer the same.

Example::

    book = SampleBook(metrics, horizon_s=86400, store=store)
    book.note("churn", seen=1024, share=0.0625, now=time.time())
    book.left_out(["ab12-3", "ab12-4"], now=time.time())   # ({ids no share in effect kept}, "churn")
"""

from __future__ import annotations

import logging

from modelloop.sampling import kept_by
from monitoring.metrics import MonitorMetrics
from monitoring.store import EventStore, share_hour

log = logging.getLogger(__name__)


class SampleBook:
    """Rows seen and shares noted per model (see the module docstring); ``note`` is called by
    the one writer thread, ``left_out`` by any."""

    def __init__(self, metrics: MonitorMetrics, horizon_s: float, store: EventStore) -> None:
        self.metrics = metrics
        self.horizon_s = horizon_s
        self.store = store
        self._noted: dict[tuple[str, int], float] = {}  # (model, hour) -> the share stored

    def note(self, model: str, seen: int, share: float, now: float) -> None:
        """Events of ``model`` that stand for ``seen`` predicted rows were stored, sent under
        ``share`` (:meth:`monitoring.sidecar.Sidecar.stored_events` says when)."""
        self.metrics.events_seen.labels(model).inc(seen)
        self.metrics.events_sample_share.labels(model).set(share)
        hour = share_hour(now)
        if share <= self._noted.get((model, hour), 0.0):
            return  # stored already: a write only when an hour's largest share grows
        try:
            self.store.note_share(model, hour, share)
        except Exception as exc:  # the events are stored: noted again with the model's next ones
            log.warning("could not store the sample share of %s: %s", model, exc)
            return
        self._noted = {k: v for k, v in self._noted.items() if k[1] >= hour - 1}
        self._noted[(model, hour)] = share

    def largest_shares(self, now: float) -> dict[str, float]:
        """Per model, the largest share its events came under in the horizon, as the store has
        them (noted by this sidecar, before a restart, or by a replica sharing the store)."""
        out: dict[str, float] = {}
        for model, _, share in self.store.sample_shares(share_hour(now - self.horizon_s)):
            out[model] = max(share, out.get(model, 0.0))
        return out

    def left_out(self, request_ids: list[str], now: float) -> tuple[set[str], str]:
        """Those of ``request_ids`` (rows without an event) that serving's sample certainly left
        out, and the ``model`` label to count them under (the one model sampled, else
        ``unknown``: feedback does not name its model)."""
        if not request_ids:
            return set(), "unknown"
        shares = self.largest_shares(now)
        label = next(iter(shares)) if len(shares) == 1 else "unknown"
        largest = max(shares.values(), default=None)
        if largest is None or largest >= 1.0:
            return set(), label
        return {rid for rid in request_ids if kept_by(rid, largest) is False}, label
