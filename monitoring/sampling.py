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
smallest and the largest share stay ``unknown``. Shares are kept in memory (by hour), so a
restarted sidecar answers ``unknown`` until serving's next events tell it the share again.

Example::

    book = SampleBook(metrics, horizon_s=86400)
    book.note("churn", seen=1024, share=0.0625, now=time.time())
    book.left_out(["ab12-3", "ab12-4"], now=time.time())   # ({ids no share in effect kept}, "churn")
"""

from __future__ import annotations

import threading

from modelloop.sampling import kept_by
from monitoring.metrics import MonitorMetrics

_BUCKET_S = 3600.0


class SampleBook:
    """Rows seen and shares noted per model (thread-safe; see the module docstring)."""

    def __init__(self, metrics: MonitorMetrics, horizon_s: float) -> None:
        self.metrics = metrics
        self.horizon_s = horizon_s
        self._shares: dict[str, dict[int, float]] = {}  # model -> hour -> largest share
        self._lock = threading.Lock()

    def note(self, model: str, seen: int, share: float, now: float) -> None:
        """Events of ``model`` that stand for ``seen`` predicted rows were stored, sent under
        ``share`` (:meth:`monitoring.sidecar.Sidecar.stored_events` says when)."""
        self.metrics.events_seen.labels(model).inc(seen)
        self.metrics.events_sample_share.labels(model).set(share)
        hour = int(now // _BUCKET_S)
        with self._lock:
            hours = self._shares.setdefault(model, {})
            hours[hour] = max(share, hours.get(hour, 0.0))

    def largest_share(self, now: float) -> float | None:
        """The largest share noted in the horizon, any model; None when none was."""
        oldest = int((now - self.horizon_s) // _BUCKET_S)
        with self._lock:
            for hours in self._shares.values():
                for hour in [h for h in hours if h < oldest]:
                    del hours[hour]
            shares = [s for hours in self._shares.values() for s in hours.values()]
        return max(shares, default=None)

    def left_out(self, request_ids: list[str], now: float) -> tuple[set[str], str]:
        """Those of ``request_ids`` (rows without an event) that serving's sample certainly left
        out, and the ``model`` label to count them under (the one model sampled, else
        ``unknown``: feedback does not name its model)."""
        largest = self.largest_share(now)
        with self._lock:
            models = [m for m, hours in self._shares.items() if hours]
        label = models[0] if len(models) == 1 else "unknown"
        if largest is None or largest >= 1.0:
            return set(), label
        return {rid for rid in request_ids if kept_by(rid, largest) is False}, label
