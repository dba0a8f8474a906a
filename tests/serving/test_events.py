"""EventEmitter against a real HTTP server: batching, the contract, retries, drops, never blocking."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from modelloop.schemas import EventBatch, ModelMetadata, Task, TensorSpec
from serving.events import EventEmitter
from serving.predictions import interpret
from tests.serving.conftest import free_port, wait_until

META = ModelMetadata(name="m", version=3, task=Task.classification,
                     inputs=[TensorSpec(name="input", shape=[None, 2])],
                     outputs=[TensorSpec(name="probabilities", shape=[None, 2])],
                     feature_names=["a", "b"], class_labels=["no", "yes"])


class Sink:
    """A real HTTP endpoint for POST /events answering with a scripted status sequence."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        self.statuses = statuses or []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                sink.attempts += 1
                status = sink.statuses.pop(0) if sink.statuses else 200
                if status == 200:
                    sink.bodies.append(body)
                out = json.dumps({"accepted": len(body["events"])}).encode()
                self.send_response(status)
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for b in self.bodies for e in b["events"]]


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.server.shutdown()
    s.server.server_close()


def record(em: EventEmitter, base: str, n: int) -> np.ndarray:
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    x[0, 1] = np.nan  # a missing value travels as null
    proba = np.tile(np.array([[0.25, 0.75]], np.float32), (n, 1))
    em.record(model="m", version=3, base_id=base, x=x, preds=interpret(META, {"probabilities": proba}),
              latency_s=0.002, timestamp=1700000000.0)
    return x


def test_events_follow_the_contract_in_batches(sink: Sink) -> None:
    sent: list[int] = []
    em = EventEmitter(sink.url, batch_size=4, flush_interval_s=0.05, on_sent=lambda m, n: sent.append(n))
    em.start()
    x = record(em, "r1", 6)
    record(em, "r2", 1)
    wait_until(lambda: len(sink.events) == 7, 10, "7 events")
    em.stop()
    assert all(len(b["events"]) <= 4 for b in sink.bodies)
    for body in sink.bodies:
        EventBatch.model_validate(body)
    first = sink.events[0]
    assert first == {"request_id": "r1-0", "timestamp": 1700000000.0, "model": "m", "version": 3,
                     "mode": "realtime", "features": [0.0, None], "prediction": 1,
                     "probabilities": [0.25, 0.75], "latency_s": 0.002}
    assert [e["request_id"] for e in sink.events] == [f"r1-{i}" for i in range(6)] + ["r2-0"]
    assert [e["features"] for e in sink.events[1:6]] == x[1:].tolist()
    assert sum(sent) == 7 and em.sent == 7


def test_failed_sends_are_retried_with_backoff() -> None:
    sink = Sink(statuses=[503, 503])
    em = EventEmitter(sink.url, flush_interval_s=0.02, max_retries=3, retry_backoff_s=0.01)
    em.start()
    record(em, "r", 2)
    wait_until(lambda: len(sink.events) == 2, 10, "delivery after two 503s")
    em.stop()
    assert sink.attempts == 3 and em.dropped == {"buffer_full": 0, "send_failed": 0}
    sink.server.shutdown()


@pytest.mark.parametrize(("statuses", "attempts"), [([422], 1), ([500, 500, 500], 3)],
                         ids=["refused-not-retried", "retries-exhausted"])
def test_undeliverable_events_are_dropped_and_counted(statuses: list[int], attempts: int) -> None:
    sink = Sink(statuses=statuses)
    dropped: list[tuple[str, int]] = []
    em = EventEmitter(sink.url, flush_interval_s=0.02, max_retries=2, retry_backoff_s=0.01,
                      on_dropped=lambda m, reason, n: dropped.append((reason, n)))
    em.start()
    record(em, "r", 3)
    wait_until(lambda: dropped, 10, "the drop")
    em.stop()
    assert dropped == [("send_failed", 3)] and sink.attempts == attempts
    sink.server.shutdown()


def test_a_hanging_sidecar_never_blocks_the_caller() -> None:
    received, release = threading.Event(), threading.Event()

    class Hang(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.set()
            release.wait(30)  # the sidecar holds the request: the sender thread is stuck in it

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hang)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    em = EventEmitter(f"http://127.0.0.1:{server.server_address[1]}", buffer_rows=50,
                      flush_interval_s=0.01, timeout_s=30, max_retries=0)
    em.start()
    record(em, "first", 1)
    wait_until(received.is_set, 10, "the sender to be stuck in a request")
    for i in range(200):  # would hang here if record() waited for the network
        record(em, f"r{i}", 1)
    assert em.dropped["buffer_full"] == 150 and em.pending_rows == 50
    release.set()
    em.stop()
    server.shutdown()
    server.server_close()


def test_closed_port_drops_after_retries() -> None:
    em = EventEmitter(f"http://127.0.0.1:{free_port()}", flush_interval_s=0.01, max_retries=1,
                      retry_backoff_s=0.01)
    em.start()
    record(em, "r", 5)
    wait_until(lambda: em.dropped["send_failed"] == 5, 10, "failed sends to be counted")
    em.stop()


def test_full_buffer_drops_new_events() -> None:
    dropped: list[tuple[str, int]] = []
    em = EventEmitter("http://127.0.0.1:9", buffer_rows=5, on_dropped=lambda m, r, n: dropped.append((r, n)))
    record(em, "a", 4)  # not started: nothing drains the buffer
    record(em, "b", 2)
    assert dropped == [("buffer_full", 2)] and em.pending_rows == 4


def test_no_url_means_no_events() -> None:
    em = EventEmitter(None)
    em.start()
    record(em, "a", 3)
    assert not em.enabled and em.pending_rows == 0
    em.stop()
