"""A challenger's shadow answers give way first in serving's event buffer (serving/events.py):
when the buffer is full, waiting shadow segments are dropped before any production event."""

from __future__ import annotations

import numpy as np

from modelloop.schemas import MODE_SHADOW
from serving.events import EventEmitter
from serving.predictions import Predictions


def _preds(n: int) -> Predictions:
    return Predictions(np.zeros(n, np.int64), None, np.full((n, 2), 0.5, np.float32), None)


def test_a_full_buffer_drops_shadow_answers_before_production_events() -> None:
    dropped: list[tuple[str, str, int]] = []
    # never started: nothing is sent, so what the buffer keeps is what the rule decides
    emitter = EventEmitter("http://127.0.0.1:9", buffer_rows=1000, batch_size=100_000,
                           on_dropped=lambda model, reason, n: dropped.append((model, reason, n)))
    x = np.zeros((100, 3), np.float32)
    for i in range(4):  # production, then shadow answers of the same requests: 800 rows held
        emitter.record_requests("m", 1, [f"p{i}"], [100], x, _preds(100), [0.001])
        emitter.record_requests("m", 2, [f"p{i}"], [100], x, _preds(100), [0.001], mode=MODE_SHADOW)
    assert emitter.pending_rows == 800
    for i in range(4, 7):  # 300 more production rows: 100 over the buffer
        emitter.record_requests("m", 1, [f"p{i}"], [100], x, _preds(100), [0.001])
    segments = [*emitter._closed, *emitter._open.values()]
    held = {(seg.mode, seg.rows) for seg in segments}
    production = sum(seg.rows for seg in segments if seg.mode != MODE_SHADOW)
    assert production == 700, held  # every production event kept
    assert emitter.pending_rows <= 1000 and sum(n for _, _, n in dropped) >= 100
    assert all(reason == "buffer_full" for _, reason, _ in dropped)
