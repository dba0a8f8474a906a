"""EventEmitter against a real HTTP server: batching, the contract, holding events through an
outage, retries, refusals, drops of the oldest, the ingest key, never blocking."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelloop.schemas import ColumnBatch, ModelMetadata, Task, TensorSpec
from serving.events import DROP_REASONS, Answer, EventEmitter, SidecarClient, retry_after
from serving.predictions import interpret
from tests.serving.conftest import events_of, free_port

META = ModelMetadata(name="m", version=3, task=Task.classification,
                     inputs=[TensorSpec(name="input", shape=[None, 2])],
                     outputs=[TensorSpec(name="probabilities", shape=[None, 2])],
                     feature_names=["a", "b"], class_labels=["no", "yes"])


class Sink:
    """A real HTTP endpoint for POST /events answering with a scripted sequence: a status, or a
    status with headers and an error text (as the sidecar writes them); 200 once the script is
    through. It keeps the accepted bodies, and the headers and arrival time of every request."""

    def __init__(self, answers: list[int | tuple[int, dict[str, str], str]] | None = None,
                 port: int = 0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []
        self.answers = answers or []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                sink.attempts += 1
                sink.times.append(time.monotonic())
                sink.headers.append(dict(self.headers))
                answer = sink.answers.pop(0) if sink.answers else 200
                status, headers, error = answer if isinstance(answer, tuple) else (answer, {}, "refused")
                if status == 200:
                    sink.bodies.append(body)
                    out = json.dumps({"accepted": len(events_of(body))}).encode()
                else:
                    out = json.dumps({"error": error, "errors": [error]}).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
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


def test_interleaved_models_and_modes_each_keep_one_column_group(sink: Sink) -> None:
    """Batches of several models (a server of many models) and a shadow's answers between
    production's arrive interleaved; each model and mode still fills one group, not a group per
    batch (a group is a JSON object to write and an insert in the sidecar)."""
    other = META.model_copy(update={"name": "n"})
    proba = np.array([[0.25, 0.75]], np.float32)

    async def main() -> None:
        em = EventEmitter(sink.url, batch_size=1000, flush_interval_s=5)
        await em.start()
        for i in range(30):
            x = np.full((1, 2), i, np.float32)
            em.record_requests("m", 3, [f"m{i}"], [1], x, interpret(META, {"probabilities": proba}), [0.001])
            em.record_requests("n", 3, [f"n{i}"], [1], x, interpret(other, {"probabilities": proba}), [0.001])
            em.record_requests("m", 4, [f"m{i}"], [1], x, interpret(META, {"probabilities": proba}), [0.001],
                               mode="shadow")
        await em.stop()

    run(main)
    (body,) = sink.bodies
    groups = [(g["model"], g["version"], g["mode"], len(g["request_ids"])) for g in body["columns"]]
    assert groups == [("m", 3, "realtime", 30), ("n", 3, "realtime", 30), ("m", 4, "shadow", 30)]
    assert [e["request_id"] for e in sink.events if e["model"] == "n"] == [f"n{i}-0" for i in range(30)]
    assert [e["features"][0] for e in sink.events if e["mode"] == "shadow"] == list(map(float, range(30)))


def test_rows_dropped_from_a_full_buffer_still_count_as_predictions(sink: Sink) -> None:
    """A segment pushed out of a full buffer loses its events, not its count of predictions
    made (``seen``): the model's next group carries it, so the sidecar's count stays exact."""
    proba = np.array([[0.25, 0.75]], np.float32)

    def rows(n: int) -> tuple[np.ndarray, Any]:
        return np.zeros((n, 2), np.float32), interpret(META, {"probabilities": np.repeat(proba, n, axis=0)})

    async def main() -> None:
        em = EventEmitter(sink.url, buffer_rows=100, batch_size=1000, flush_interval_s=5)
        em.record_requests("m", 1, ["a"], [50], *rows(50), [0.001])   # pushed out whole below
        em.record_requests("m", 2, ["b"], [100], *rows(100), [0.001])  # its first 10 rows, later
        em.record_requests("m", 3, ["c"], [10], *rows(10), [0.001])
        assert em.dropped["buffer_full"] == 60
        await em.start()
        await em.stop()

    run(main)
    groups = [g for b in sink.bodies for g in b["columns"]]
    assert [(g["version"], sum(g["rows"])) for g in groups] == [(2, 90), (3, 10)]
    assert sum(g["seen"] for g in groups) == 160  # every prediction made, sent or not


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
    assert not any(em.dropped.values()) and sink.attempts == 1


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


def test_failed_sends_are_retried_until_delivered() -> None:
    """Busy, failing or unreachable through a proxy: each is sent again, the same batch in order."""
    sink = Sink(answers=[503, 500, 502, 504, 429, 408])

    async def main() -> EventEmitter:
        em = EventEmitter(sink.url, flush_interval_s=0.02, retry_backoff_s=0.01, retry_backoff_max_s=0.02)
        await em.start()
        record(em, "r", 2)
        await until(lambda: len(sink.events) == 2, "delivery after six failed sends")
        await em.stop()
        return em

    em = run(main)
    sink.close()
    assert sink.attempts == 7 and em.sent == 2 and not any(em.dropped.values())
    assert [e["request_id"] for e in sink.events] == ["r-0", "r-1"]


def test_a_sidecar_that_is_down_loses_nothing_when_it_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    """Refused connections for as long as it takes (far past the old 1.4 s of retries): the
    events wait in the buffer and arrive in order, once, when the sidecar listens again."""
    port = free_port()

    async def main() -> tuple[EventEmitter, Sink]:
        em = EventEmitter(f"http://127.0.0.1:{port}", batch_size=4, flush_interval_s=0.01,
                          retry_backoff_s=0.01, retry_backoff_max_s=0.05)
        await em.start()
        for i in range(10):
            record(em, f"r{i}", 1)
        await until(lambda: "keeping prediction events" in caplog.text, "a failed send")
        for i in range(10, 30):
            record(em, f"r{i}", 1)
            await asyncio.sleep(0)
        assert em.pending_rows == 30 and not any(em.dropped.values())
        sink = Sink(port=port)  # the sidecar is back, on the same port
        await until(lambda: len(sink.events) == 30, "every event after the outage")
        await em.stop()
        return em, sink

    with caplog.at_level(logging.INFO, logger="serving.events"):
        em, sink = run(main)
    sink.close()
    assert [e["request_id"] for e in sink.events] == [f"r{i}-0" for i in range(30)]
    assert em.sent == 30 and not any(em.dropped.values())
    assert "answers again after" in caplog.text and "0 prediction events dropped meanwhile" in caplog.text


def test_a_full_buffer_drops_the_oldest_events(caplog: pytest.LogCaptureFixture) -> None:
    """While the sidecar is away the buffer fills; each new event pushes out the oldest held,
    the batch waiting to be sent again first, so what arrives afterwards is the newest."""
    sink = Sink(answers=[(503, {"Retry-After": "1"}, "the ingest queue is full")])
    dropped: list[tuple[str, str, int]] = []

    async def main() -> EventEmitter:
        em = EventEmitter(sink.url, buffer_rows=10, batch_size=4, flush_interval_s=0.01, retry_backoff_s=0.01,
                          on_dropped=lambda m, reason, n: dropped.append((m, reason, n)))
        await em.start()
        for i in range(4):
            record(em, f"r{i}", 1)  # a full batch: sent at once, answered 503, waits 1 s to go again
        await until(lambda: "keeping prediction events" in caplog.text, "the 503")
        for i in range(4, 30):  # (no await in between: the sender is in its wait throughout)
            record(em, f"r{i}", 1)
        assert em.pending_rows == 10 and em.dropped["buffer_full"] == 20
        await until(lambda: len(sink.events) == 10, "the newest 10 events")
        await em.stop()
        return em

    with caplog.at_level(logging.WARNING, logger="serving.events"):
        em = run(main)
    sink.close()
    assert [e["request_id"] for e in sink.events] == [f"r{i}-0" for i in range(20, 30)]
    assert sum(n for _, reason, n in dropped if reason == "buffer_full") == 20
    assert {reason for _, reason, _ in dropped} == {"buffer_full"} and em.sent == 10


def test_a_request_larger_than_the_room_left_pushes_out_only_what_it_needs() -> None:
    """The oldest rows go first, and of one large request only its first rows (not started:
    nothing drains the buffer)."""
    em = EventEmitter("http://127.0.0.1:9", buffer_rows=5)
    record(em, "a", 4)
    record(em, "b", 2)  # needs 1 row: a-0 goes
    assert em.dropped["buffer_full"] == 1 and em.pending_rows == 5
    record(em, "c", 6)  # larger than the buffer: it cannot fit, and pushes nothing out
    assert em.dropped["buffer_full"] == 7 and em.pending_rows == 5
    record(em, "d", 5)  # everything held goes
    assert em.dropped["buffer_full"] == 12 and em.pending_rows == 5


def test_rows_pushed_out_of_a_model_batch_are_whole_requests_and_the_rest_stay_right(sink: Sink) -> None:
    """Making room drops whole requests of a model batch (two rows needed: a and b go), and the
    events of the requests left keep their own features, predictions and ids."""
    em = EventEmitter(sink.url, buffer_rows=8, flush_interval_s=0.01)
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    proba = np.linspace(0, 1, 12, dtype=np.float32).reshape(6, 2)
    em.record_requests(model="m", version=3, base_ids=("a", "b", "c"), counts=(1, 3, 2), x=x,
                       preds=interpret(META, {"probabilities": proba}), latencies=(0.5, 0.25, 0.125))
    record(em, "d", 4)  # 10 rows for 8: a goes, and b with it (whole requests)
    assert em.dropped["buffer_full"] == 4 and em.pending_rows == 6

    async def main() -> None:
        await em.start()
        await until(lambda: len(sink.events) == 6, "the 6 events left")
        await em.stop()

    run(main)
    assert [e["request_id"] for e in sink.events] == ["c-0", "c-1", "d-0", "d-1", "d-2", "d-3"]
    assert [e["features"] for e in sink.events[:2]] == x[4:].tolist()
    assert [e["probabilities"] for e in sink.events[:2]] == proba[4:].tolist()
    assert [e["latency_s"] for e in sink.events[:2]] == [0.125, 0.125]


def test_retry_after_is_the_least_wait() -> None:
    sink = Sink(answers=[(503, {"Retry-After": "1"}, "the ingest queue is full")])

    async def main() -> None:
        em = EventEmitter(sink.url, flush_interval_s=0.01, retry_backoff_s=0.01, retry_backoff_max_s=0.01)
        await em.start()
        record(em, "r", 1)
        await until(lambda: len(sink.events) == 1, "delivery after the 503")
        await em.stop()

    run(main)
    sink.close()
    assert sink.attempts == 2 and sink.times[1] - sink.times[0] >= 1.0


@pytest.mark.parametrize(("status", "error"), [
    (401, "Authorization: a valid key is required"),  # no key, or the wrong one
    (413, "body: over the 1024 byte limit"),  # too large for the sidecar
    (422, "columns[0].version: model 'm' has no version 3"),  # events it will never take
    (404, "no such route"),  # a URL that is not a sidecar's
])
def test_a_refusal_is_not_sent_again_but_counted_and_logged_once(
        status: int, error: str, caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink(answers=[(status, {}, error)] * 2)
    dropped: list[tuple[str, int]] = []

    async def main() -> EventEmitter:
        em = EventEmitter(sink.url, batch_size=3, flush_interval_s=0.02, retry_backoff_s=0.01,
                          on_dropped=lambda m, reason, n: dropped.append((reason, n)))
        await em.start()
        record(em, "a", 3)
        await until(lambda: len(dropped) == 1, "the first refusal")
        record(em, "b", 3)
        await until(lambda: len(dropped) == 2, "the second refusal")
        record(em, "c", 3)  # the sidecar takes these
        await until(lambda: len(sink.events) == 3, "the third batch")
        await em.stop()
        return em

    with caplog.at_level(logging.WARNING, logger="serving.events"):
        em = run(main)
    sink.close()
    assert dropped == [("rejected", 3), ("rejected", 3)] and sink.attempts == 3
    assert em.dropped == {**dict.fromkeys(DROP_REASONS, 0), "rejected": 6}
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals == [f"sidecar {sink.url}/events refused 3 prediction events with HTTP {status}: "
                        f"{error} (they are dropped; further refusals with {status} are counted, not logged)"]


def test_events_older_than_the_age_limit_are_dropped() -> None:
    dropped: list[tuple[str, int]] = []

    async def main() -> EventEmitter:
        em = EventEmitter(f"http://127.0.0.1:{free_port()}", flush_interval_s=0.01, retry_backoff_s=0.01,
                          retry_backoff_max_s=0.02, max_age_s=0.1,
                          on_dropped=lambda m, reason, n: dropped.append((reason, n)))
        await em.start()
        record(em, "r", 5)
        await until(lambda: em.dropped["expired"] == 5, "the events to expire")
        await em.stop()
        return em

    em = run(main)
    assert dropped == [("expired", 5)] and em.pending_rows == 0 and em.sent == 0


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
                          flush_interval_s=0.01, timeout_s=30)
        await em.start()
        record(em, "first", 1)
        await until(received.is_set, "the sender to be stuck in a request")
        for i in range(200):  # would hang here if record() waited for the network
            record(em, f"r{i}", 1)
        # the row being posted cannot be dropped; the oldest of the others made room
        assert em.dropped["buffer_full"] == 151 and em.pending_rows == 50
        await em.stop(timeout_s=0.2)  # the deadline wins over the stuck send
        return em

    em = run(main)
    release.set()
    server.shutdown()
    server.server_close()
    assert em.dropped["shutdown"] == 50 and em.pending_rows == 0


def test_what_is_unsent_at_the_stop_deadline_is_counted() -> None:
    dropped: list[tuple[str, int]] = []

    async def main() -> EventEmitter:
        em = EventEmitter(f"http://127.0.0.1:{free_port()}", flush_interval_s=0.01, retry_backoff_s=0.01,
                          on_dropped=lambda m, reason, n: dropped.append((reason, n)))
        await em.start()
        record(em, "r", 5)
        await em.stop(timeout_s=0.2)
        return em

    em = run(main)
    assert dropped == [("shutdown", 5)] and em.dropped["shutdown"] == 5 and em.sent == 0


def test_extra_headers_go_with_every_send() -> None:
    sink = Sink(answers=[503])

    async def main() -> None:
        em = EventEmitter(sink.url, batch_size=2, flush_interval_s=0.01, retry_backoff_s=0.01,
                          headers={"Authorization": "Bearer ingest-key-0123456789"})
        await em.start()
        record(em, "a", 2)
        record(em, "b", 2)
        await until(lambda: len(sink.events) == 4, "4 events")
        await em.stop()

    run(main)
    sink.close()
    assert sink.attempts == 3
    assert [h["Authorization"] for h in sink.headers] == ["Bearer ingest-key-0123456789"] * 3


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


def test_no_url_means_no_events() -> None:
    async def main() -> EventEmitter:
        em = EventEmitter(None)
        await em.start()
        record(em, "a", 3)
        await em.stop()
        return em

    em = run(main)
    assert not em.enabled and em.pending_rows == 0


def test_the_sidecar_key_setting_is_sent_with_every_post(sink: Sink, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """MODELLOOP_SERVING_SIDECAR_KEY (a secret: not in the settings' repr) reaches the emitter
    the serving state builds, and every POST carries it as a bearer token."""
    from prometheus_client import CollectorRegistry

    from serving.settings import ServingSettings
    from serving.state import ServingState

    monkeypatch.setenv("MODELLOOP_SERVING_SIDECAR_KEY", "ingest-key-0123456789")
    settings = ServingSettings(home=tmp_path, sidecar_url=sink.url, event_flush_interval_s=0.01)
    assert "ingest-key" not in repr(settings)
    state = ServingState(settings, CollectorRegistry())

    async def main() -> None:
        await state.emitter.start()
        record(state.emitter, "a", 1)
        await until(lambda: len(sink.events) == 1, "the event")
        await state.emitter.stop()

    run(main)
    state.jobs.close()
    assert [h["Authorization"] for h in sink.headers] == ["Bearer ingest-key-0123456789"]


def test_the_body_budget_setting_sends_a_large_flight_in_parts(sink: Sink, tmp_path: Path) -> None:
    """MODELLOOP_SERVING_EVENT_MAX_BODY_BYTES reaches the emitter the serving state builds: one
    request's 200 events go in several bodies, each within the budget, every event once."""
    from prometheus_client import CollectorRegistry

    from serving.settings import ServingSettings
    from serving.state import ServingState

    settings = ServingSettings(home=tmp_path, sidecar_url=sink.url, event_flush_interval_s=0.01,
                               event_max_body_bytes=1500)
    state = ServingState(settings, CollectorRegistry())

    async def main() -> None:
        await state.emitter.start()
        record(state.emitter, "big", 200)
        await until(lambda: len(sink.events) >= 200, "the events", timeout=20)
        await state.emitter.stop()

    run(main)
    state.jobs.close()
    sizes = [int(next(v for k, v in h.items() if k.lower() == "content-length")) for h in sink.headers]
    assert len(sizes) > 1 and max(sizes) <= 1500, sizes
    assert sink.attempts == len(sink.bodies)  # nothing refused, nothing sent twice
    assert sorted(e["request_id"] for e in sink.events) == sorted(f"big-{i}" for i in range(200))


# -- the client that sends them: what the emitter relies on ------------------------------------
class RawSidecar:
    """A socket server that reads each request whole and answers with ``reply(writer, n)``
    (returns whether to keep the connection open)."""

    def __init__(self, reply: Callable[[asyncio.StreamWriter, int], Coroutine[Any, Any, bool]]) -> None:
        self.reply = reply
        self.heads: list[str] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                size = int(next(line.split(":")[1] for line in head.split("\r\n")
                                if line.lower().startswith("content-length")))
                await reader.readexactly(size)
                self.heads.append(head)
                keep = await self.reply(writer, len(self.heads))
                await writer.drain()
                if not keep:
                    break
        writer.close()

    def exchange(self, bodies: list[bytes], timeout_s: float = 5,
                 headers: dict[str, str] | None = None) -> list[Answer | BaseException]:
        async def main() -> list[Answer | BaseException]:
            server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
            client = SidecarClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/events",
                                   timeout_s, headers)
            out: list[Answer | BaseException] = []
            for body in bodies:
                try:
                    out.append(await client.post(body))
                except Exception as exc:
                    out.append(exc)
            await client.aclose()
            server.close()
            return out

        return asyncio.run(main())


async def accepted(writer: asyncio.StreamWriter, i: int) -> bool:
    body = b'{"accepted": %d}' % i
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    return True


def test_the_client_keeps_one_connection_and_sends_the_key_each_time() -> None:
    sidecar = RawSidecar(accepted)
    key = {"Authorization": "Bearer ingest-key-0123456789"}
    answers = sidecar.exchange([b"{}", b"x" * 300_000, b"{}"], headers=key)
    assert answers == [Answer(200, f'{{"accepted": {i}}}') for i in (1, 2, 3)]
    assert sidecar.connections == 1
    assert all(h.startswith("POST /events HTTP/1.1\r\n") for h in sidecar.heads)
    assert all("Authorization: Bearer ingest-key-0123456789\r\n" in h for h in sidecar.heads)


def test_the_client_reads_retry_after() -> None:
    async def busy(writer: asyncio.StreamWriter, i: int) -> bool:
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\ncontent-length: 4\r\n\r\nbusy")
        return True

    assert RawSidecar(busy).exchange([b"{}"]) == [Answer(503, "busy", 2.0)]


def test_a_connection_the_sidecar_closed_is_reopened_and_each_body_sent_once() -> None:
    async def close_after(writer: asyncio.StreamWriter, i: int) -> bool:
        await accepted(writer, i)
        return False  # answers, then closes without saying so (as an idle timeout would)

    sidecar = RawSidecar(close_after)
    assert [a.status for a in sidecar.exchange([b"{}"] * 3)] == [200] * 3  # type: ignore[union-attr]
    assert sidecar.connections == 3 and len(sidecar.heads) == 3


def test_a_silent_sidecar_times_out_and_the_next_send_reconnects() -> None:
    async def hang_first(writer: asyncio.StreamWriter, i: int) -> bool:
        if i == 1:
            await asyncio.sleep(30)
        return await accepted(writer, i)

    sidecar = RawSidecar(hang_first)
    first, second = sidecar.exchange([b"{}", b"{}"], timeout_s=0.3)
    assert isinstance(first, TimeoutError)
    assert second == Answer(200, '{"accepted": 2}') and sidecar.connections == 2


@pytest.mark.parametrize(("value", "seconds"), [
    ("2", 2.0),  # delay-seconds
    ("0.5", 0.5),  # not in the RFC, but plain enough to honour
    ("Fri, 01 Jan 2010 00:00:00 GMT", 0.0),  # a date in the past
    ("-3", 0.0),  # never a negative wait
    ("inf", None),  # no endless wait
    ("soon", None),  # unreadable: as if absent
    (None, None),  # absent
])
def test_retry_after_values(value: str | None, seconds: float | None) -> None:
    assert retry_after(value) == seconds


def test_a_retry_after_date_is_a_wait_from_now() -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    wait = retry_after(format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True))
    assert wait is not None and 100 < wait <= 120
