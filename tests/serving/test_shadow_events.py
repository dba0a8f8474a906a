"""A challenger's shadow answers give way first in serving's event buffer (serving/events.py):
when the buffer is full, waiting shadow segments are dropped before any production event."""

from __future__ import annotations

from pathlib import Path

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


def test_a_shadow_share_scores_the_rows_the_sample_rule_picks_and_every_labelled_request(
        model_home: Path) -> None:
    """With MODELLOOP_SERVING_SHADOW_SHARE below 1, the challenger (a real ONNX model) scores the
    rows whose ids score below the share by the event sample's rule, whole requests marked as to
    be labelled, and nothing else; its answers go out under the rows' own ids."""
    from prometheus_client import CollectorRegistry

    from modelloop.registry import Registry
    from modelloop.sampling import kept_by
    from serving.metrics import ServingMetrics
    from serving.models import ModelManager
    from serving.predictions import interpret
    from serving.sampling import LabelledId
    from serving.settings import ServingSettings
    from serving.shadow import Shadow
    from tests.serving.conftest import MODEL
    from tests.serving.test_events import Sink, run, until

    sink = Sink()
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)
    settings = ServingSettings(home=model_home, shadow_share=0.25)
    ids = [f"req{i}" for i in range(400)] + [LabelledId("marked")]
    counts = [1] * 400 + [3]
    x = np.random.default_rng(0).normal(size=(403, 20)).astype(np.float32)

    async def main() -> None:
        emitter = EventEmitter(sink.url, batch_size=100_000, flush_interval_s=0.05)
        await emitter.start()
        manager = ModelManager(Registry(model_home / "registry"), settings, metrics, name=MODEL, publish=False)
        runtime = manager.load_initial()
        shadow = Shadow(MODEL, manager, emitter, metrics, 4096, share=settings.shadow_share)
        await shadow.start()
        shadow.offer(x, interpret(runtime.metadata, runtime.predict(x)), ids, counts)
        await until(lambda: not shadow.queued_rows and emitter.sent, "the shadow's answers")
        await shadow.close()
        await emitter.stop()

    try:
        run(main)
    finally:
        sink.close()
    sent = [e["request_id"] for e in sink.events]
    picked = [f"req{i}-0" for i in range(400) if kept_by(f"req{i}-0", 0.25)]
    assert sent == [*picked, "marked-0", "marked-1", "marked-2"]
    assert 70 <= len(picked) <= 130  # a quarter of 400, give or take the hash's spread
    assert {e["mode"] for e in sink.events} == {"shadow"}
    assert registry.get_sample_value("modelloop_serving_shadow_rows_total",
                                     {"model": MODEL, "result": "scored"}) == len(sent)
