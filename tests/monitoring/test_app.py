"""The sidecar's routes on a real uvicorn server in the test process (real app, store, registry
and trigger)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import average_precision_score

from modelloop.synthetic import SyntheticTask
from monitoring.app import create_app
from monitoring.settings import MonitorSettings
from monitoring.sidecar import Sidecar
from tests.monitoring.helpers import TrainedModel, serve_in_thread

POLICY = """
rules:
  - {name: drift, metric: drift_share, threshold: 0.1, min_samples: 200, cooldown: 1h, action: retrain}
  - {name: acc, metric: accuracy, threshold: 0.99, min_samples: 10, action: alert}
"""


def record_command(out: Path) -> str:
    """A real retraining command: appends the model and job to ``out``."""
    code = "import sys,pathlib; pathlib.Path(sys.argv[1]).open('a').write(sys.argv[2]+' '+sys.argv[3]+chr(10))"
    return f"{sys.executable} -c \"{code}\" {out} {{model}} {{job}}"


def make_settings(home: Path, **over: Any) -> MonitorSettings:
    policy = home / "policy.yaml"
    policy.write_text(POLICY)
    base: dict[str, Any] = dict(home=home, policy_file=policy, check_interval_s=3600,
                                window_events=1000, min_window_rows=200, job_poll_s=0.1,
                                retrain_command=record_command(home / "retrained.txt"))
    base.update(over)
    return MonitorSettings(**base)


@pytest.fixture
def sidecar(home: Path, registered: TrainedModel) -> Iterator[Sidecar]:
    sc = Sidecar(make_settings(home))
    sc.start(background=False)
    yield sc
    sc.stop()


@pytest.fixture
def client(sidecar: Sidecar) -> Iterator[httpx.Client]:
    with serve_in_thread(create_app(sidecar)) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


def events_for(trained: TrainedModel, df: pd.DataFrame, prefix: str) -> tuple[list[dict[str, Any]], Any]:
    x = df[trained.task.feature_names].to_numpy()
    proba = trained.predict_proba(x)
    events = [{"request_id": f"{prefix}-{i}", "timestamp": time.time(), "model": "churn",
               "version": 1, "features": [float(v) for v in row], "prediction": int(p.argmax()),
               "probabilities": [float(v) for v in p], "latency_s": 0.002 + 0.0001 * (i % 10)}
              for i, (row, p) in enumerate(zip(x, proba, strict=True))]
    return events, proba


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_events_are_acknowledged_once_stored(client: httpx.Client, sidecar: Sidecar,
                                             registered: TrainedModel, task: SyntheticTask) -> None:
    events, _ = events_for(registered, task.sample(50, seed=3), "a")
    resp = client.post("/events", json={"events": events})
    assert resp.status_code == 200 and resp.json() == {"accepted": 50, "new": 50, "ambiguous": 0}
    assert sidecar.store.count_events("churn") == 50
    again = client.post("/events", json={"events": events[:10]})  # a re-sent batch
    assert again.json() == {"accepted": 10, "new": 0, "ambiguous": 0}
    assert metric(client, "modelloop_events_ingested_total", model="churn") == 50


def column_group(request_ids: list[str], rows: list[int], seen: int) -> dict[str, Any]:
    """A column group of churn v1 as serving sends it: its requests' rows, and the ``seen``
    predictions they stand for (serving's sample, at a quarter, left the others out)."""
    n = sum(rows)
    return {"model": "churn", "version": 1, "request_ids": request_ids, "first_row": [0] * len(rows),
            "rows": rows, "timestamp": [time.time()] * len(rows), "latency_s": [0.01] * len(rows),
            "features": [[0.5] * 20] * n, "prediction": [1] * n, "probabilities": [[0.3, 0.7]] * n,
            "seen": seen, "share": 0.25}


def less_the_first_request(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` without its first request (serving dropped it, the oldest, from a full buffer
    while the batch waited to be sent again; the group keeps its ``seen``)."""
    n = group["rows"][0]
    return {**group, **{k: group[k][1:] for k in ("request_ids", "first_row", "rows", "timestamp",
                                                   "latency_s")},
            **{k: group[k][n:] for k in ("features", "prediction", "probabilities")}}


# what serving sends again when a batch's acknowledgement was lost
RESENDS = [
    # the same batch
    lambda group: group,
    # the batch less its oldest request
    less_the_first_request,
]


@pytest.mark.parametrize("resend", RESENDS, ids=["same", "trimmed"])
def test_predictions_seen_are_counted_once_per_stored_batch(
        client: httpx.Client, resend: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    group = column_group(["s1", "s2"], [1, 2], seen=12)
    assert client.post("/events", json={"columns": [group]}).json() == {"accepted": 3, "new": 3,
                                                                        "ambiguous": 0}
    again = client.post("/events", json={"columns": [resend(group)]})  # its rows are stored
    assert again.status_code == 200 and again.json()["new"] == 0
    assert metric(client, "modelloop_events_seen_total", model="churn") == 12
    assert metric(client, "modelloop_events_sample_share_ratio", model="churn") == 0.25
    assert metric(client, "modelloop_events_ingested_total", model="churn") == 3


def test_predictions_seen_of_a_batch_not_stored_are_counted_when_it_is(
        client: httpx.Client, home: Path) -> None:
    body = {"columns": [column_group(["f1"], [2], seen=8)]}
    with contextlib.closing(sqlite3.connect(home / "monitor" / "events.db")) as db:
        # the store refuses every event (as a full disk would): the body parses, its commit fails
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON modelloop_events "
                   "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        assert client.post("/events", json=body).status_code == 503  # serving keeps it, retries
        assert metric(client, "modelloop_events_seen_total", model="churn") == 0
        db.execute("DROP TRIGGER refuse")
    assert client.post("/events", json=body).json()["new"] == 2
    assert metric(client, "modelloop_events_seen_total", model="churn") == 8


@pytest.mark.parametrize(
    ("payload", "status", "reason", "error"),
    [
        # malformed JSON
        (b'{"events": [', 400, "invalid_json", "body: invalid JSON (EOF while parsing a list at line 1 column 12)"),
        # the second event without a model
        ({"events": [{}, {"request_id": "x"}]}, 422, "invalid_event", "events[0].request_id: Field required"),
        # an unknown model version
        ({"events": [{"request_id": "x", "timestamp": 1, "model": "churn", "version": 4,
                      "features": [1.0] * 20, "prediction": 0, "latency_s": 0}]},
         422, "unknown_model", "events[0].model: model 'churn' has no version 4"),
    ],
)
def test_malformed_events_get_4xx_are_counted_and_not_stored(
        client: httpx.Client, sidecar: Sidecar, payload: Any, status: int, reason: str, error: str) -> None:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    resp = client.post("/events", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == status
    assert resp.json()["error"] == error
    assert metric(client, "modelloop_events_rejected_total", reason=reason) >= 1
    assert sidecar.store.count_events() == 0


def test_an_unexpected_error_is_logged_with_an_id_counted_and_answered_500(
        client: httpx.Client, sidecar: Sidecar, home: Path, caplog: pytest.LogCaptureFixture) -> None:
    # the registry folder replaced by a file: looking up a version not cached yet raises
    # NotADirectoryError, which parsing does not expect (it was a 503 logged nowhere, so serving
    # retried the batch and dropped it)
    shutil.rmtree(home / "registry")
    (home / "registry").write_text("not a folder")
    event = {"request_id": "x", "timestamp": time.time(), "model": "churn", "version": 2,
             "features": [1.0] * 20, "prediction": 0, "latency_s": 0}
    with caplog.at_level(logging.ERROR, logger="monitoring.app"):
        resp = client.post("/events", json={"events": [event]})
    assert resp.status_code == 500
    error_id = resp.json()["error_id"]
    assert resp.json()["error"] == f"internal error {error_id}: the sidecar's log has its traceback"
    [record] = [r for r in caplog.records if error_id in r.getMessage()]
    assert record.getMessage() == f"error {error_id}: POST /events failed"
    assert record.exc_info is not None and record.exc_info[0] is NotADirectoryError
    assert metric(client, "modelloop_monitor_errors_total", reason="unexpected") == 1
    assert metric(client, "modelloop_monitor_errors_total", reason="not_stored") == 0


def test_events_not_stored_get_503_and_are_counted(client: httpx.Client, sidecar: Sidecar) -> None:
    sidecar.writer.close()  # as at shutdown: nothing more is stored, and serving retries
    event = {"request_id": "x", "timestamp": time.time(), "model": "churn", "version": 1,
             "features": [1.0] * 20, "prediction": 0, "latency_s": 0}
    resp = client.post("/events", json={"events": [event]})
    assert resp.status_code == 503
    assert resp.json()["error"] == "events not stored: the sidecar is shutting down"
    assert metric(client, "modelloop_monitor_errors_total", reason="not_stored") == 1
    assert metric(client, "modelloop_monitor_errors_total", reason="unexpected") == 0


def test_a_body_over_the_limit_gets_413(home: Path, registered: TrainedModel) -> None:
    sc = Sidecar(make_settings(home, max_body_bytes=1000))
    sc.start(background=False)
    with serve_in_thread(create_app(sc)) as url, httpx.Client(base_url=url) as c:
        resp = c.post("/events", content=b"x" * 2000)
        assert resp.status_code == 413
        assert resp.json()["error"] == "body: 2000 bytes is over the 1000 byte limit"
        assert metric(c, "modelloop_events_rejected_total", reason="too_large") == 1


def test_feedback_joins_and_reports_unknown_and_duplicate_ids(
        client: httpx.Client, registered: TrainedModel, task: SyntheticTask) -> None:
    events, _ = events_for(registered, task.sample(5, seed=4), "f")
    client.post("/events", json={"events": events})
    resp = client.post("/feedback", json={"feedback": [
        {"request_id": "f-0", "label": "yes"}, {"request_id": "f-1", "label": 0},
        {"request_id": "f-1", "label": 1}, {"request_id": "ghost", "label": "no"}]})
    assert resp.status_code == 200
    assert resp.json() == {"joined": 2, "unknown": ["ghost"], "duplicate": ["f-1"],
                           "ambiguous": [], "not_sampled": []}
    single = client.post("/feedback", json={"request_id": "f-0", "label": "no"})
    assert single.json() == {"joined": 0, "unknown": [], "duplicate": ["f-0"],
                             "ambiguous": [], "not_sampled": []}
    assert metric(client, "modelloop_feedback_total", model="churn", result="joined") == 2
    assert metric(client, "modelloop_feedback_total", result="unknown") == 1


def test_a_row_the_sample_left_out_is_told_so_after_a_restart_and_by_a_replica(
        home: Path, registered: TrainedModel, task: SyntheticTask, store_url: tuple[str, str]) -> None:
    """The share serving's events came under is kept in the store: on a second sidecar sharing
    the store that took none of the events, and after a restart, feedback for a row the sample
    left out is ``not_sampled`` before any new event comes, and for a row it keeps ``unknown``."""
    from modelloop.sampling import kept_by

    url, prefix = store_url
    events, _ = events_for(registered, task.sample(40, seed=4), "s")
    ids = [f"req{i}" for i in range(40)]
    kept = [i for i, rid in enumerate(ids) if kept_by(f"{rid}-0", 0.25)]
    assert 0 < len(kept) < 40
    group = {"model": "churn", "version": 1, "request_ids": [ids[i] for i in kept],
             "first_row": [0] * len(kept), "rows": [1] * len(kept),
             "timestamp": [events[i]["timestamp"] for i in kept],
             "latency_s": [events[i]["latency_s"] for i in kept],
             "features": [events[i]["features"] for i in kept],
             "prediction": [events[i]["prediction"] for i in kept],
             "probabilities": [events[i]["probabilities"] for i in kept], "seen": 40, "share": 0.25}
    left = next(f"{rid}-0" for i, rid in enumerate(ids) if i not in kept)
    never_sent = next(f"other{i}-0" for i in range(100) if kept_by(f"other{i}-0", 0.25))
    settings = make_settings(home, store_url=url, store_table_prefix=prefix)

    def asked(sidecar: Sidecar) -> None:  # feedback for a row left out, one never sent, one stored
        with serve_in_thread(create_app(sidecar)) as base, httpx.Client(base_url=base) as client:
            answer = client.post("/feedback", json={"feedback": [
                {"request_id": left, "label": 0}, {"request_id": never_sent, "label": 0},
                {"request_id": f"{ids[kept[0]]}-0", "label": 1}]}).json()
            assert (answer["not_sampled"], answer["unknown"]) == ([left], [never_sent])
            assert metric(client, "modelloop_feedback_total", model="churn", result="not_sampled") == 1

    first, replica = Sidecar(settings), Sidecar(settings)
    first.start(background=False)
    replica.start(background=False)
    try:
        with serve_in_thread(create_app(first)) as base:
            assert httpx.post(f"{base}/events", json={"columns": [group]}).status_code == 200
        asked(replica)  # running beside the one that took the events
    finally:
        replica.stop()
        first.stop()
    restarted = Sidecar(settings)
    restarted.start(background=False)
    try:
        asked(restarted)
    finally:
        restarted.stop()


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        # a label that is not a class of the model, in the list form
        ({"feedback": [{"request_id": "g-0", "label": "no"}, {"request_id": "g-1", "label": "maybe"}]},
         "feedback[1].label: 'maybe' is not a class of churn v1 (classes: no, yes)"),
        # the single form names the field without an index
        ({"request_id": "g-0", "label": 7}, "label: class index 7 is out of range for churn v1 (0..1)"),
    ],
)
def test_invalid_labels_reject_the_request_whole(client: httpx.Client, sidecar: Sidecar,
                                                registered: TrainedModel, task: SyntheticTask,
                                                payload: Any, error: str) -> None:
    events, _ = events_for(registered, task.sample(2, seed=5), "g")
    client.post("/events", json={"events": events})
    resp = client.post("/feedback", json=payload)
    assert resp.status_code == 422 and resp.json()["error"] == error
    assert sidecar.store.label_targets(["g-0"])["g-0"].labelled is False  # nothing half-written


def test_check_status_report_and_export(client: httpx.Client, sidecar: Sidecar,
                                        registered: TrainedModel, task: SyntheticTask) -> None:
    df = task.sample(1000, seed=6, shift={"f02": 1.5, "f09": -1.5})
    events, proba = events_for(registered, df, "c")
    assert client.post("/events", json={"events": events}).status_code == 200
    labels = [{"request_id": f"c-{i}", "label": int(y)} for i, y in enumerate(df["target"][:100])]
    client.post("/feedback", json={"feedback": labels})
    status = client.post("/check").json()
    drift = status["models"]["churn"]["drift"]
    assert drift["judged"] and drift["drifted_features"] == ["f02", "f09"]
    quality = status["models"]["churn"]["quality"]["1"]
    assert quality["labelled"] == 100 and quality["coverage"] == pytest.approx(100 / 1000)
    # the version's stored gate metric over its labelled rows, from the events' probabilities
    expected = average_precision_score(df["target"][:100], proba[:100, 1])
    assert quality["gate_metric"] == "pr_auc" and quality["gate_score"] == pytest.approx(expected)
    assert metric(client, "modelloop_gate_metric_ratio", model="churn", version="1",
                  metric="pr_auc") == pytest.approx(expected, abs=1e-12)
    assert [f["rule"] for f in status["recent_firings"]] == ["drift", "acc"]
    assert status["recent_firings"][0]["job"]["status"] == "running"
    assert client.get("/status").json()["models"]["churn"]["version"] == 1
    sidecar.evaluator.wait_for_report()
    report = client.get("/reports/drift/latest")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert "Drifted Columns" in report.text and '"f02"' in report.text  # Evidently's widgets
    # after Evidently's widgets, the sidecar's own checks: joint drift, data quality
    section = report.text[report.text.index('<section id="modelloop-sidecar"'):]
    assert "Joint distribution (pairs of features)" in section
    assert "<th>Feature f02</th><td>missing 0.0%, outside the reference&#x27;s range" in section
    assert client.get("/reports/drift/churn/latest").status_code == 200
    assert client.get("/reports/drift/nope/latest").status_code == 404
    exported = pd.read_parquet(io.BytesIO(client.get("/export/labelled?model=churn").content))
    assert len(exported) == 100 and list(exported.columns[:2]) == ["f00", "f01"]
    assert exported["_ml_label"].tolist() == df["target"][:100].astype(float).tolist()


def test_manual_retrain_runs_one_job_at_a_time(client: httpx.Client, sidecar: Sidecar,
                                               home: Path) -> None:
    first = client.post("/retrain", json={"model": "churn", "reason": "new data"})
    assert first.status_code == 202 and first.json()["status"] == "running"
    second = client.post("/retrain", json={"model": "churn"})
    assert second.status_code == 409
    assert second.json()["detail"] == f"job {first.json()['job']} of model 'churn' is still active"
    deadline = time.monotonic() + 30
    while sidecar.store.jobs(active_only=True) and time.monotonic() < deadline:
        sidecar.jobs.poll(["churn"])
        time.sleep(0.05)
    jobs = client.get("/jobs").json()["jobs"]
    assert [(j["trigger"], j["status"]) for j in jobs] == [("manual", "succeeded")]
    # /status holds the stored jobs as typed records; its JSON is /jobs' objects, key for key
    assert client.get("/status").json()["jobs"] == jobs
    assert list(jobs[0]) == ["id", "model", "trigger", "kind", "reason", "status", "created_at",
                             "ended_at", "handle", "detail"]
    assert (home / "retrained.txt").read_text().split() == ["churn", first.json()["job"]]
    assert metric(client, "modelloop_retrain_jobs_total", model="churn", trigger="manual",
                  result="succeeded") == 1
    assert metric(client, "modelloop_retrain_job_active", model="churn") == 0
    assert client.post("/retrain", json={}).json()["error"] == \
        "model: required, the name of the model to retrain"
    unknown = client.post("/retrain", json={"model": "x"})
    assert unknown.status_code == 422
    assert unknown.json()["error"] == f"model: 'x' is not registered under {home / 'registry'}"


def alert_payload(fingerprint: str, **labels: str) -> dict[str, Any]:
    return {"version": "4", "status": "firing", "receiver": "modelloop", "groupKey": "{}:{}",
            "alerts": [{"status": "firing", "labels": {"alertname": "AccuracyLow", **labels},
                        "annotations": {"summary": "accuracy below the floor"},
                        "startsAt": "2024-05-01T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                        "fingerprint": fingerprint}]}


def test_alertmanager_receiver_dedups_by_fingerprint(client: httpx.Client, sidecar: Sidecar) -> None:
    first = client.post("/alertmanager", json=alert_payload("fp1", model="churn")).json()
    assert [a["status"] for a in first["started"]] == ["running"]
    assert first["started"][0]["fingerprint"] == "fp1"
    again = client.post("/alertmanager", json=alert_payload("fp1", model="churn")).json()
    assert again["duplicate"] == ["fp1"] and again["started"] == []
    other = client.post("/alertmanager", json=alert_payload("fp2")).json()
    assert other["ignored"] == [{"fingerprint": "fp2", "why": "no 'model' label"}]
    bad = client.post("/alertmanager", json={**alert_payload("fp3"), "version": "3"})
    assert bad.status_code == 422
    assert bad.json()["error"] == "version: expected Alertmanager webhook payload version '4', got '3'"
    job = sidecar.store.jobs("churn")[0]
    assert (job.trigger, job.reason) == ("alertmanager", "Alertmanager: AccuracyLow: accuracy below "
                                                         "the floor")


def test_health_routes(client: httpx.Client) -> None:
    assert client.get("/live").json() == {"status": "alive"}
    assert client.get("/ready").json() == {"status": "ready"}
    assert client.get("/reports/drift/latest").status_code == 400  # no model with events yet


def test_the_sidecar_works_the_same_on_both_store_engines(
        home: Path, registered: TrainedModel, task: SyntheticTask,
        store_url: tuple[str, str]) -> None:
    url, prefix = store_url
    sc = Sidecar(make_settings(home, store_url=url, store_table_prefix=prefix))
    sc.start(background=False)
    with serve_in_thread(create_app(sc)) as base, httpx.Client(base_url=base, timeout=60) as c:
        df = task.sample(1000, seed=9, shift={"f04": 1.5, "f11": -1.5})
        events, proba = events_for(registered, df, "e")
        assert c.post("/events", json={"events": events}).json() == {"accepted": 1000, "new": 1000,
                                                                          "ambiguous": 0}
        labels = [{"request_id": f"e-{i}", "label": int(y)} for i, y in enumerate(df["target"])]
        assert c.post("/feedback", json={"feedback": labels}).json()["joined"] == 1000
        model = c.post("/check").json()["models"]["churn"]
        assert model["drift"]["drifted_features"] == ["f04", "f11"]
        expected = float((proba.argmax(axis=1) == df["target"].to_numpy()).mean())
        assert model["quality"]["1"]["scores"]["count"]["accuracy"] == pytest.approx(expected)
        assert c.post("/retrain", json={"model": "churn"}).status_code == 409  # the policy's job



def rejected(client: httpx.Client) -> dict[str, float]:
    """``modelloop_events_rejected_total`` by reason, the reasons counted so far only."""
    return {s.labels["reason"]: s.value
            for family in text_string_to_metric_families(client.get("/metrics").text)
            for s in family.samples if s.name == "modelloop_events_rejected_total" and s.value}


Event = Callable[[str, int], dict[str, Any]]
"""An event of the registered model: its request id's prefix, the seed of its features."""
JSON_TYPE = {"content-type": "application/json"}


def slow_body(c: httpx.Client, event: Event) -> httpx.Response:
    """A body that says 1,000 bytes and sends 10 of them, answered when the sidecar gives up."""
    import http.client
    import socket

    with socket.create_connection((c.base_url.host, c.base_url.port), timeout=30) as sock:
        sock.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"events\":")
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return httpx.Response(resp.status, content=resp.read())


def invalid_label(c: httpx.Client, event: Event) -> httpx.Response:
    assert c.post("/events", json={"events": [event("l0", 3), event("l1", 4)]}).status_code == 200
    return c.post("/feedback", json={"feedback": [{"request_id": "l0-0", "label": "no"},
                                                  {"request_id": "l1-0", "label": "maybe"}]})


def ambiguous_id(c: httpx.Client, event: Event) -> httpx.Response:
    assert c.post("/events", json={"events": [event("a", 5)]}).status_code == 200
    return c.post("/events", json={"events": [event("a", 6)]})  # a-0 with other features


# each refusal: what is sent, the answer's status, its code (the metric's reason) and how many
# events or labels it refuses
REFUSALS: list[tuple[str, Callable[[httpx.Client, Event], httpx.Response], int, str, int]] = [
    # a declared length over MODELLOOP_MONITOR_MAX_BODY_BYTES (4,000 here)
    ("too large", lambda c, ev: c.post("/events", content=b" " * 5000, headers=JSON_TYPE),
     413, "too_large", 1),
    # a body not received within MODELLOOP_MONITOR_BODY_READ_TIMEOUT_S (0.5 s here)
    ("too slow", slow_body, 408, "too_slow", 1),
    # a body in a content coding: the sidecar reads bodies as sent
    ("compressed", lambda c, ev: c.post("/events", content=b"\x1f\x8b\x08\x00",
                                        headers={**JSON_TYPE, "content-encoding": "gzip"}),
     415, "unsupported_encoding", 1),
    # malformed events: not JSON; three events without their fields
    ("not JSON", lambda c, ev: c.post("/events", content=b'{"events": [', headers=JSON_TYPE),
     400, "invalid_json", 1),
    ("malformed events", lambda c, ev: c.post("/events", json={"events": [{}, {}, {}]}),
     422, "invalid_event", 3),
    # two events of a version that is not registered
    ("unknown version", lambda c, ev: c.post("/events", json={"events": [
        dict(ev("v0", 1), version=4), dict(ev("v1", 2), version=4)]}), 422, "unknown_model", 2),
    # labels: malformed; one label of two that is not a class of the model
    ("malformed feedback", lambda c, ev: c.post("/feedback", json={"feedback": []}),
     422, "invalid_feedback", 1),
    ("invalid label", invalid_label, 422, "invalid_label", 2),
    # an id that holds another prediction: the batch is stored (200), that event is not
    ("ambiguous id", ambiguous_id, 200, "ambiguous_id", 1),
]


@pytest.mark.parametrize(("send", "status", "reason", "count"), [case[1:] for case in REFUSALS],
                         ids=[case[0] for case in REFUSALS])
def test_each_refusal_is_counted_once(home: Path, registered: TrainedModel, task: SyntheticTask,
                                      send: Callable[[httpx.Client, Event], httpx.Response],
                                      status: int, reason: str, count: int) -> None:
    sc = Sidecar(make_settings(home, max_body_bytes=4000, body_read_timeout_s=0.5))
    sc.start(background=False)
    try:
        with serve_in_thread(create_app(sc)) as url, httpx.Client(base_url=url, timeout=60) as c:
            resp = send(c, lambda prefix, seed: events_for(registered, task.sample(1, seed=seed),
                                                           prefix)[0][0])
            assert resp.status_code == status, resp.text
            body = resp.json()
            if status == 200:
                assert body["ambiguous"] == count
            else:  # the one error shape; its code is the reason it is counted under
                assert (body["code"], body["errors"][0]) == (reason, body["error"])
                assert body["field"] == body["error"].split(": ")[0]
                assert body.get("rejected", 1) == count
            assert rejected(c) == {reason: count}
    finally:
        sc.stop()
