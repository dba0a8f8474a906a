"""Request ids a client chose, against a real `modelloop serve` sending to a real `modelloop
monitor`: an id that comes with two different predictions (claimed in advance, or sent twice)
is ambiguous, so no label joins it, while the events of everyone else are stored; a batch serving
sends again because its acknowledgement was lost stays one event per id."""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from modelloop.synthetic import SyntheticTask
from tests.monitoring.helpers import ServingProcess, SidecarProcess, TrainedModel, sidecar_process
from tests.monitoring.test_trust import ADMIN, FEEDBACK, INGEST, bearer, events, metric
from tests.serving.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class LossyProxy:
    """A real HTTP/1.1 hop between serving and the sidecar that forwards every POST and throws
    away the sidecar's answer to the first one (the connection is closed instead), as a network
    that lost an acknowledgement would: serving sends that batch again. It keeps every body it
    forwarded."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.bodies: list[bytes] = []
        self.dropped = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._client = httpx.Client(base_url=target, timeout=30)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = dict(line.split(": ", 1) for line in lines[1:])
                length = int(next(v for k, v in headers.items() if k.lower() == "content-length"))
                while len(data) < length:
                    data += conn.recv(65536)
                body, data = data[:length], data[length:]
                resp = self._client.post(path, content=body, headers={
                    k: v for k, v in headers.items() if k.lower() in ("authorization", "content-type")})
                self.bodies.append(body)
                if self.dropped == 0:
                    self.dropped += 1
                    return  # the sidecar has committed the batch; its answer is lost
                conn.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % (resp.status_code, len(resp.content))
                             + resp.content)

    def close(self) -> None:
        self._server.close()
        self._client.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory,
          trained: TrainedModel) -> Iterator[tuple[ServingProcess, SidecarProcess, LossyProxy]]:
    """A keyed sidecar, and serving sending its events to it through a :class:`LossyProxy`."""
    home = tmp_path_factory.mktemp("home")
    trained.register(home / "registry")
    with sidecar_process(home, home / "sidecar.log", **{
            "MODELLOOP_MONITOR_API_KEY": ADMIN, "MODELLOOP_MONITOR_INGEST_KEY": INGEST,
            "MODELLOOP_MONITOR_FEEDBACK_KEY": FEEDBACK,
            "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "3600"}) as sidecar:
        proxy = LossyProxy(sidecar.url)
        serving = ServingProcess(home, home / "serving.log", proxy.url)
        serving.env["MODELLOOP_SERVING_SIDECAR_KEY"] = INGEST
        try:
            yield serving.start(), sidecar, proxy
        except BaseException:
            print(f"--- serving log ---\n{serving.log()[-20000:]}")
            raise
        finally:
            serving.close()
            proxy.close()


def predict(serving: ServingProcess, rows: pd.DataFrame, request_id: str | None = None) -> list[str]:
    """The request ids of ``rows`` predicted by serving (with ``X-Request-ID: request_id``)."""
    headers = {"X-Request-ID": request_id} if request_id else {}
    resp = serving.client.post("/predict", json={"instances": rows.to_dict("records")},
                               headers=headers)
    assert resp.status_code == 200, resp.text
    return [p["request_id"] for p in resp.json()["predictions"]]


def stored(sidecar: SidecarProcess) -> float:
    return metric(sidecar.url, "modelloop_events_ingested_total", model="churn")


def post_feedback(sidecar: SidecarProcess, labels: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.post(f"{sidecar.url}/feedback", headers=bearer(FEEDBACK), json={
        "feedback": [{"request_id": rid, "label": label} for rid, label in labels.items()]})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_a_claimed_request_id_is_ambiguous_and_joins_no_label(
        stack: tuple[ServingProcess, SidecarProcess, LossyProxy], task: SyntheticTask) -> None:
    serving, sidecar, proxy = stack
    df = task.sample(40, seed=5)[task.feature_names]
    # the first batch serving sends is stored, but its acknowledgement is lost: serving sends
    # the very same events again, which stays one event per id, and not an ambiguous one
    first = predict(serving, df.iloc[:10])
    wait_until(lambda: len(proxy.bodies) >= 2, 60, "serving to send the batch again")
    assert proxy.bodies[0] == proxy.bodies[1]
    wait_until(lambda: stored(sidecar) >= 10, 60, "the first events")
    assert metric(sidecar.url, "modelloop_events_rejected_total", reason="ambiguous_id") == 0
    # an attacker claims order-77 in advance; later the real order-77 comes, and one client
    # sends the same X-Request-ID twice among the requests of other users
    claimed = predict(serving, df.iloc[10:11], "order-77")
    wait_until(lambda: stored(sidecar) >= 11, 60, "the claimed id")
    others = predict(serving, df.iloc[11:20])
    real = predict(serving, df.iloc[20:21], "order-77")
    twice = predict(serving, df.iloc[21:22], "dup") + predict(serving, df.iloc[22:23], "dup")
    others += predict(serving, df.iloc[23:40])
    assert claimed == real == ["order-77-0"] and twice == ["dup-0", "dup-0"]
    # every other user's event is stored; the second prediction of each id is not
    wait_until(lambda: stored(sidecar) >= 10 + 1 + len(others) + 1, 60, "every other event")
    wait_until(lambda: metric(sidecar.url, "modelloop_events_rejected_total",
                              reason="ambiguous_id") == 2, 60, "the two ambiguous ids counted")
    # the real label of order-77 does not join the attacker's features, nor does one of dup-0
    labels = {rid: "yes" for rid in first + others} | {"order-77-0": "no", "dup-0": "no"}
    answer = post_feedback(sidecar, labels)
    assert answer == {"joined": len(first + others), "unknown": [], "duplicate": [],
                      "ambiguous": ["order-77-0", "dup-0"], "not_sampled": []}
    assert metric(sidecar.url, "modelloop_feedback_total", model="churn", result="ambiguous") == 2
    # neither the labelled export nor the accuracy sees them
    export = httpx.get(f"{sidecar.url}/export/labelled", params={"model": "churn"},
                       headers=bearer(ADMIN))
    assert export.status_code == 200, export.text
    labelled = pd.read_parquet(io.BytesIO(export.content))
    assert len(labelled) == len(first + others) and set(labelled["_ml_label"]) == {1.0}
    assert httpx.post(f"{sidecar.url}/check", headers=bearer(ADMIN), timeout=120).status_code == 200
    assert metric(sidecar.url, "modelloop_labelled_samples", model="churn",
                  version="1") == len(first + others)


def test_a_batch_with_a_repeated_id_is_stored_but_that_id(
        stack: tuple[ServingProcess, SidecarProcess, LossyProxy], trained: TrainedModel,
        task: SyntheticTask) -> None:
    _, sidecar, _ = stack
    batch = events(trained, task, "batch", n=12)
    twin = dict(batch["events"][3], timestamp=batch["events"][3]["timestamp"] + 1)
    batch["events"].append(twin)
    resp = httpx.post(f"{sidecar.url}/events", json=batch, headers=bearer(INGEST))
    assert (resp.status_code, resp.json()) == (200, {"accepted": 13, "new": 12, "ambiguous": 1})
    # serving sends the same body again (a lost acknowledgement): nothing new, same answer
    again = httpx.post(f"{sidecar.url}/events", json=batch, headers=bearer(INGEST))
    assert again.json() == {"accepted": 13, "new": 0, "ambiguous": 1}
    answer = post_feedback(sidecar, {"batch-2": "no", "batch-3": "no"})
    assert (answer["joined"], answer["ambiguous"]) == (1, ["batch-3"])


def test_an_old_store_gets_ambiguous_ids_when_the_sidecar_starts(
        tmp_path: Path, registered: TrainedModel, task: SyntheticTask, home: Path) -> None:
    import sqlite3

    path = home / "monitor" / "events.db"
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as db:  # the events table as an earlier release made it
        db.execute("""CREATE TABLE modelloop_events (
            seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, model TEXT NOT NULL,
            version INTEGER NOT NULL, ts REAL NOT NULL, mode TEXT NOT NULL, features BLOB NOT NULL,
            prediction REAL NOT NULL, probabilities BLOB, latency_s REAL NOT NULL,
            received_at REAL NOT NULL, label REAL, label_ts REAL)""")
    db.close()
    with sidecar_process(home, tmp_path / "sidecar.log",
                         MODELLOOP_MONITOR_CHECK_INTERVAL_S="3600") as proc:
        batch = events(registered, task, "old", n=3)
        assert httpx.post(f"{proc.url}/events", json=batch).json()["new"] == 3
        batch["events"][0]["latency_s"] = 0.5  # another prediction under old-0
        assert httpx.post(f"{proc.url}/events", json=batch).json() == {
            "accepted": 3, "new": 0, "ambiguous": 1}
        answer = httpx.post(f"{proc.url}/feedback", json={"request_id": "old-0", "label": 1}).json()
        assert answer["ambiguous"] == ["old-0"]
