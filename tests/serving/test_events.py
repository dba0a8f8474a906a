"""EventEmitter against a real HTTP server: batching, the contract, retries, drops, never blocking."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from modelloop.schemas import ColumnBatch, ModelMetadata, Task, TensorSpec
from serving.events import EventEmitter
from serving.predictions import interpret
from tests.serving.conftest import events_of, free_port

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
                out = json.dumps({"accepted": len(events_of(body))}).encode()
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
        return [e for b in self.bodies for e in events_of(b)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def record(em: EventEmitter, base: str, n: int) -> np.ndarray:
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    x[0, 1] = np.nan  # a missing value travels as null
    proba = np.tile(np.array([[0.25, 0.75]], np.float32), (n, 1))
    em.record(model="m", version=3, base_id=base, x=x, preds=interpret(META, {"probabilities": proba}),
              latency_s=0.002, timestamp=1700000000.0)
    return x


async def until(check: Callable[[], Any], what: str, timeout: float = 10) -> None:
    """Poll check() on the event loop (the sender runs on it) until true or the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(main())


def test_events_follow_the_contract_in_batches(sink: Sink) -> None:
    sent: list[int] = []

    async def main() -> np.ndarray:
        em = EventEmitter(sink.url, batch_size=4, flush_interval_s=0.05, on_sent=lambda m, n: sent.append(n))
        await em.start()
        x = record(em, "r1", 6)
        record(em, "r2", 1)
        await until(lambda: len(sink.events) == 7, "7 events")
        await em.stop()
        assert em.sent == 7
        return x

    x = run(main)
    assert all(len(events_of(b)) <= 4 for b in sink.bodies)
    for body in sink.bodies:
        ColumnBatch.model_validate(body)
    assert sink.events[0] == {"request_id": "r1-0", "timestamp": 1700000000.0, "model": "m", "version": 3,
                              "mode": "realtime", "features": [0.0, None], "prediction": 1,
                              "probabilities": [0.25, 0.75], "latency_s": 0.002}
    assert [e["request_id"] for e in sink.events] == [f"r1-{i}" for i in range(6)] + ["r2-0"]
    assert [e["features"] for e in sink.events[1:6]] == x[1:].tolist()
    assert sum(sent) == 7


def test_a_model_batch_of_requests_is_one_entry_sent_whole(sink: Sink) -> None:
    """record_requests (what the batcher calls): the rows of several requests in one entry; each
    row gets its request's id and latency; the entry is never split, even past batch_size."""

    async def main() -> None:
        em = EventEmitter(sink.url, batch_size=4, flush_interval_s=0.05)
        await em.start()
        record(em, "first", 2)
        x = np.arange(12, dtype=np.float32).reshape(6, 2)
        proba = np.tile(np.array([[0.75, 0.25]], np.float32), (6, 1))
        em.record_requests(model="m", version=3, base_ids=("a", "b", "c"), counts=(1, 3, 2), x=x,
                           preds=interpret(META, {"probabilities": proba}), latencies=(0.5, 0.25, 0.125),
                           timestamp=1700000001.0)
        await until(lambda: len(sink.events) == 8, "8 events")
        await em.stop()

    run(main)
    assert [len(events_of(b)) for b in sink.bodies] == [2, 6]  # 6 rows sent whole past the 4 of a batch
    later = sink.events[2:]
    assert [e["request_id"] for e in later] == ["a-0", "b-0", "b-1", "b-2", "c-0", "c-1"]
    assert [e["latency_s"] for e in later] == [0.5, 0.25, 0.25, 0.25, 0.125, 0.125]
    assert [e["features"] for e in later] == np.arange(12, dtype=np.float32).reshape(6, 2).tolist()
    assert {e["timestamp"] for e in later} == {1700000001.0} and {e["prediction"] for e in later} == {0}


def test_a_new_model_version_mode_or_width_starts_a_new_column_group(sink: Sink) -> None:
    """Records of one model version, mode and widths share a column group; a swap (a new version),
    batch rows or a regressor after them start the next group, and every event keeps its order."""
    reg = ModelMetadata(name="m", version=4, task=Task.regression, inputs=[TensorSpec(name="input", shape=[None, 3])],
                        outputs=[TensorSpec(name="prediction", shape=[None, 1])], feature_names=["a", "b", "c"])

    async def main() -> None:
        em = EventEmitter(sink.url, batch_size=100, flush_interval_s=5)
        await em.start()
        record(em, "a", 2)
        record(em, "b", 1)  # same version: same group
        em.record(model="m", version=4, base_id="c", x=np.ones((2, 3), np.float32), latency_s=0.001,
                  preds=interpret(reg, {"prediction": np.array([[1.5], [2.5]], np.float32)}))
        em.record(model="m", version=4, base_id="d", x=np.ones((1, 3), np.float32), latency_s=0.0, mode="batch",
                  preds=interpret(reg, {"prediction": np.array([[3.5]], np.float32)}))
        record(em, "e", 1)
        await em.stop()  # the last flush sends everything in one body

    run(main)
    (body,) = sink.bodies
    groups = [(g["version"], g["mode"], g["request_ids"], g["probabilities"] is None) for g in body["columns"]]
    assert groups == [(3, "realtime", ["a", "b"], False), (4, "realtime", ["c"], True), (4, "batch", ["d"], True),
                      (3, "realtime", ["e"], False)]
    assert [e["request_id"] for e in sink.events] == ["a-0", "a-1", "b-0", "c-0", "c-1", "d-0", "e-0"]
    assert [e["prediction"] for e in sink.events[3:6]] == [1.5, 2.5, 3.5]
    assert sink.events[3]["features"] == [1.0, 1.0, 1.0] and sink.events[3]["probabilities"] is None


def test_a_backlog_drains_in_sends_of_batch_size(sink: Sink) -> None:
    """Events that piled up (the sidecar was slow) go batch_size rows per send, not a column
    group per send."""

    async def main() -> None:
        em = EventEmitter(sink.url, batch_size=500, flush_interval_s=0.05)
        x = np.ones((5, 2), np.float32)
        preds = interpret(META, {"probabilities": np.full((5, 2), 0.5, np.float32)})
        for b in range(400):  # model batches of 5 one-row requests, buffered before the sender runs
            em.record_requests("m", 3, [f"r{b}-{i}" for i in range(5)], [1] * 5, x, preds, [0.001] * 5)
        await em.start()
        await until(lambda: len(sink.events) == 2000, "2000 events")
        await em.stop()

    run(main)
    assert [len(events_of(b)) for b in sink.bodies] == [500] * 4
    assert [e["request_id"] for e in sink.events][:7] == [f"r0-{i}-0" for i in range(5)] + ["r1-0-0", "r1-1-0"]


def test_a_request_of_no_rows_sends_nothing_and_spoils_no_batch(sink: Sink) -> None:
    """A header-only file scored by a batch route records 0 rows: no event (the sidecar refuses a
    request of 0 rows, which would have cost the whole send)."""

    async def main() -> EventEmitter:
        em = EventEmitter(sink.url, flush_interval_s=0.05)
        await em.start()
        empty = interpret(META, {"probabilities": np.zeros((0, 2), np.float32)})
        em.record(model="m", version=3, base_id="empty", x=np.zeros((0, 2), np.float32), preds=empty,
                  latency_s=0.0, mode="batch")
        em.record(model="m", version=3, base_id="job", x=np.ones((5, 2), np.float32), latency_s=0.0, mode="batch",
                  preds=interpret(META, {"probabilities": np.full((5, 2), 0.5, np.float32)}))
        await until(lambda: len(sink.events) == 5, "5 events")
        await em.stop()
        return em

    em = run(main)
    assert {e["request_id"] for e in sink.events} == {f"job-{i}" for i in range(5)}
    assert em.dropped == {"buffer_full": 0, "send_failed": 0} and sink.attempts == 1


def test_large_requests_are_split_across_batches_and_rows_numbered(sink: Sink) -> None:
    """A large request is cut into column groups (at most 256 rows, batch_size split evenly: 200
    for 600) as it is sent, batch_size rows per send."""

    async def main() -> None:
        em = EventEmitter(sink.url, batch_size=600, flush_interval_s=0.05)
        await em.start()
        n = 1000
        proba = np.tile(np.array([[0.5, 0.5]], np.float32), (n, 1))
        em.record(model="m", version=3, base_id="job", x=np.zeros((n, 2), np.float32), first_row=5000,
                  preds=interpret(META, {"probabilities": proba}), latency_s=0.0, mode="batch")
        await until(lambda: len(sink.events) == n, "1000 events")
        await em.stop()

    run(main)
    assert [len(events_of(b)) for b in sink.bodies] == [600, 400]
    assert [[g["rows"] for g in b["columns"]] for b in sink.bodies] == [[[200]] * 3, [[200]] * 2]
    assert [g["first_row"] for b in sink.bodies for g in b["columns"]] == [[5000 + 200 * i] for i in range(5)]
    assert [e["request_id"] for e in sink.events] == [f"job-{5000 + i}" for i in range(1000)]
    assert {e["mode"] for e in sink.events} == {"batch"}


def test_failed_sends_are_retried_with_backoff() -> None:
    sink = Sink(statuses=[503, 503])

    async def main() -> EventEmitter:
        em = EventEmitter(sink.url, flush_interval_s=0.02, max_retries=3, retry_backoff_s=0.01)
        await em.start()
        record(em, "r", 2)
        await until(lambda: len(sink.events) == 2, "delivery after two 503s")
        await em.stop()
        return em

    em = run(main)
    sink.close()
    assert sink.attempts == 3 and em.dropped == {"buffer_full": 0, "send_failed": 0}


@pytest.mark.parametrize(("statuses", "attempts"), [([422], 1), ([500, 500, 500], 3)],
                         ids=["refused-not-retried", "retries-exhausted"])
def test_undeliverable_events_are_dropped_and_counted(statuses: list[int], attempts: int) -> None:
    sink = Sink(statuses=statuses)
    dropped: list[tuple[str, int]] = []

    async def main() -> None:
        em = EventEmitter(sink.url, flush_interval_s=0.02, max_retries=2, retry_backoff_s=0.01,
                          on_dropped=lambda m, reason, n: dropped.append((reason, n)))
        await em.start()
        record(em, "r", 3)
        await until(lambda: dropped, "the drop")
        await em.stop()

    run(main)
    sink.close()
    assert dropped == [("send_failed", 3)] and sink.attempts == attempts


def test_a_hanging_sidecar_never_blocks_the_caller() -> None:
    received, release = threading.Event(), threading.Event()

    class Hang(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.set()
            release.wait(30)  # the sidecar holds the request: the sender is stuck in it

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hang)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def main() -> EventEmitter:
        em = EventEmitter(f"http://127.0.0.1:{server.server_address[1]}", buffer_rows=50,
                          flush_interval_s=0.01, timeout_s=30, max_retries=0)
        await em.start()
        record(em, "first", 1)
        await until(received.is_set, "the sender to be stuck in a request")
        for i in range(200):  # would hang here if record() waited for the network
            record(em, f"r{i}", 1)
        assert em.dropped["buffer_full"] == 150 and em.pending_rows == 50
        await em.stop(timeout_s=0.2)  # the deadline wins over the stuck send
        return em

    run(main)
    release.set()
    server.shutdown()
    server.server_close()


def test_closed_port_drops_after_retries() -> None:
    async def main() -> EventEmitter:
        em = EventEmitter(f"http://127.0.0.1:{free_port()}", flush_interval_s=0.01, max_retries=1,
                          retry_backoff_s=0.01)
        await em.start()
        record(em, "r", 5)
        await until(lambda: em.dropped["send_failed"] == 5, "failed sends to be counted")
        await em.stop()
        return em

    assert run(main).sent == 0


def test_records_from_another_thread_are_sent(sink: Sink) -> None:
    async def main() -> None:
        em = EventEmitter(sink.url, batch_size=10, flush_interval_s=5)
        await em.start()
        thread = threading.Thread(target=lambda: record(em, "job", 10))  # like a batch-job thread
        thread.start()
        thread.join()
        await until(lambda: len(sink.events) == 10, "a full batch woken from another thread", timeout=3)
        await em.stop()

    run(main)


def test_full_buffer_drops_new_events() -> None:
    dropped: list[tuple[str, int]] = []
    em = EventEmitter("http://127.0.0.1:9", buffer_rows=5, on_dropped=lambda m, r, n: dropped.append((r, n)))
    record(em, "a", 4)  # not started: nothing drains the buffer
    record(em, "b", 2)
    assert dropped == [("buffer_full", 2)] and em.pending_rows == 4


def test_no_url_means_no_events() -> None:
    async def main() -> EventEmitter:
        em = EventEmitter(None)
        await em.start()
        record(em, "a", 3)
        await em.stop()
        return em

    em = run(main)
    assert not em.enabled and em.pending_rows == 0
