"""What a key holder can make a real `modelloop monitor` hold, and what it refuses: label
providers read within a budget of their own (slow /feedback bodies cannot starve serving's
/events), Alertmanager notifications are bounded in bytes and alerts and remembered in one
transaction, and events, JSON and request heads are held to sane bounds."""

from __future__ import annotations

import http.client
import json
import socket
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from modelloop.synthetic import SyntheticTask
from tests.monitoring.helpers import SidecarProcess, TrainedModel, sidecar_process
from tests.monitoring.test_trust import (
    ADMIN,
    ALERTS,
    FEEDBACK,
    INGEST,
    alert,
    bearer,
    events,
    metric,
)
from tests.serving.conftest import wait_until

pytestmark = [pytest.mark.integration]

FEEDBACK_BODY = 64 * 1024
KEYS = {"MODELLOOP_MONITOR_API_KEY": ADMIN, "MODELLOOP_MONITOR_INGEST_KEY": INGEST,
        "MODELLOOP_MONITOR_FEEDBACK_KEY": FEEDBACK, "MODELLOOP_MONITOR_ALERTMANAGER_KEY": ALERTS}


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory,
            trained: TrainedModel) -> Iterator[SidecarProcess]:
    """A keyed sidecar with small feedback and Alertmanager bounds; retention runs often and
    keeps 3 alerts."""
    home = tmp_path_factory.mktemp("home")
    trained.register(home / "registry")
    # no retraining rule: the events these tests send drift from the reference, and a policy
    # job of the model would make the Alertmanager's request model_busy (checks run every 0.5 s
    # here because retention runs in the same loop)
    policy = home / "policy.yaml"
    policy.write_text("rules:\n  - {name: latency, metric: latency_p95, threshold: 10, action: alert}\n")
    with sidecar_process(home, home / "sidecar.log", **{
        **KEYS, "MODELLOOP_MONITOR_POLICY_FILE": str(policy),
        "MODELLOOP_MONITOR_MAX_FEEDBACK_BODY_BYTES": str(FEEDBACK_BODY),
        "MODELLOOP_MONITOR_FEEDBACK_QUEUE_BYTES": str(2 * FEEDBACK_BODY),
        "MODELLOOP_MONITOR_BODY_READ_TIMEOUT_S": "5",
        "MODELLOOP_MONITOR_MAX_ALERTMANAGER_BODY_BYTES": "20000",
        "MODELLOOP_MONITOR_MAX_ALERTS_PER_BODY": "20",
        "MODELLOOP_MONITOR_RETENTION_MAX_ALERTS": "3",
        "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "0.5", "MODELLOOP_MONITOR_RETENTION_INTERVAL_S": "0.5",
        "MODELLOOP_MONITOR_RETRAIN_COMMAND": f"{sys.executable} -c pass"}) as proc:
        yield proc


def answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of the HTTP answer on ``sock``."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, resp.read()


def slow_feedback(proc: SidecarProcess) -> socket.socket:
    """A label provider sending a body of the largest size, a few bytes of it only."""
    sock = socket.create_connection(("127.0.0.1", proc.port))
    sock.sendall(b"POST /feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n{\"feedback\": ["
                 % (FEEDBACK.encode(), FEEDBACK_BODY))
    sock.settimeout(60)
    return sock


def test_slow_label_providers_cannot_starve_serving_s_events(
        bounded: SidecarProcess, trained: TrainedModel, task: SyntheticTask) -> None:
    url = bounded.url
    senders = [slow_feedback(bounded) for _ in range(2)]
    label = {"request_id": "x", "label": "no"}

    def refused() -> bool:  # the two slow bodies hold the whole feedback budget
        return httpx.post(f"{url}/feedback", json=label, headers=bearer(FEEDBACK)).status_code == 503

    wait_until(refused, 10, "the slow feedback bodies to hold the feedback budget")
    busy = httpx.post(f"{url}/feedback", json=label, headers=bearer(FEEDBACK))
    assert busy.json()["error"].startswith("body: the feedback queue is full (131072 of 131072")
    # meanwhile serving's events, larger than the whole feedback budget, go through
    for i in range(3):
        body = events(trained, task, f"starve{i}", n=400)
        assert len(json.dumps(body)) > 2 * FEEDBACK_BODY
        resp = httpx.post(f"{url}/events", json=body, headers=bearer(INGEST))
        assert (resp.status_code, resp.json()["new"]) == (200, 400)
    # the slow senders are answered 408 in the end, and counted
    answers = [answer(s) for s in senders]
    for sock in senders:
        sock.close()
    assert [status for status, _ in answers] == [408, 408], answers
    assert b"body: not received within 5 s" in answers[0][1]
    assert metric(url, "modelloop_events_rejected_total", reason="too_slow") == 2
    ok = httpx.post(f"{url}/feedback", json={"request_id": "starve0-0", "label": "no"},
                    headers=bearer(FEEDBACK))
    assert (ok.status_code, ok.json()["joined"]) == (200, 1)


def test_a_feedback_body_over_its_own_limit_is_413(bounded: SidecarProcess) -> None:
    items = [{"request_id": f"r{i:06d}", "label": "no"} for i in range(3000)]
    resp = httpx.post(f"{bounded.url}/feedback", json={"feedback": items}, headers=bearer(FEEDBACK))
    assert resp.status_code == 413
    assert resp.json()["error"].endswith(f"bytes is over the {FEEDBACK_BODY} byte limit")


def notification(alerts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"version": "4", "status": "firing", "alerts": alerts}


def test_alertmanager_notifications_are_bounded_and_remembered_in_one_go(
        bounded: SidecarProcess) -> None:
    url, key = bounded.url, bearer(ALERTS)
    # more alerts than a notification may carry, or more bytes
    many = httpx.post(f"{url}/alertmanager", json=notification([alert("churn", i) for i in range(21)]),
                      headers=key)
    assert (many.status_code, many.json()["error"]) == (
        422, "alerts: 21 alerts in one notification; at most 20 "
             "(MODELLOOP_MONITOR_MAX_ALERTS_PER_BODY; Alertmanager's webhook_config max_alerts "
             "keeps a notification under it)")
    big = notification([dict(alert("churn", 0), annotations={"summary": "x" * 30_000})])
    huge = httpx.post(f"{url}/alertmanager", json=big, headers=key)
    assert huge.status_code == 413 and "over the 20000 byte limit" in huge.json()["error"]
    # twenty alerts of one model ask for one job; the others are duplicates of it
    resp = httpx.post(f"{url}/alertmanager", json=notification([alert("churn", i) for i in range(20)]),
                      headers=key)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert [len(out[k]) for k in ("started", "duplicate", "skipped", "ignored")] == [1, 19, 0, 0], out
    assert out["started"][0]["fingerprint"] == "fp0"
    summaries = [line for line in bounded.log().splitlines() if "Alertmanager notification" in line]
    assert len(summaries) == 1 and summaries[0].endswith(
        "Alertmanager notification of 20 alerts: 1 started, 19 duplicate, 0 skipped, 0 ignored")
    # retention keeps the newest 3 alerts: the others are forgotten (logged)
    wait_until(lambda: "forgot 17 alerts" in bounded.log(), 30, "retention to forget alerts")


@pytest.mark.parametrize(
    ("change", "status", "error"),
    [
        # a latency of 1e300 s (it made every latency quantile meaningless)
        (lambda b: b.replace(b'"latency_s": 0.002', b'"latency_s": 1e300', 1), 422,
         "events[0].latency_s: Input should be less than or equal to 86400"),
        # a prediction that contradicts the event's probabilities
        (lambda b: b.replace(b'"prediction": 0', b'"prediction": 1', 1), 422,
         "events[0].prediction: class 1 is not the most probable class of the event's "
         "probabilities"),
        # NaN is not JSON (a missing feature is null)
        (lambda b: b.replace(b'"features": [', b'"features": [NaN, ', 1),
         400, "body: invalid JSON (NaN is not JSON (a missing value is null) at line 1 column"),
    ],
)
def test_events_out_of_bounds_are_refused_naming_the_field(
        bounded: SidecarProcess, trained: TrainedModel, task: SyntheticTask, change: Any,
        status: int, error: str) -> None:
    body = events(trained, task, "bound", n=1)
    body["events"][0].update(prediction=0, probabilities=[0.9, 0.1])
    raw = change(json.dumps(body).encode())
    resp = httpx.post(f"{bounded.url}/events", content=raw, headers={
        **bearer(INGEST), "content-type": "application/json"})
    assert (resp.status_code, resp.json()["error"][:len(error)]) == (status, error)


def test_a_request_head_over_the_limit_is_refused(bounded: SidecarProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", bounded.port))
    sock.settimeout(30)
    try:  # 20 KiB of headers and counting, past the 16 KiB default: refused before they end
        sock.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 20_000 + b"\r\n")
        status, body = answer(sock)
    finally:
        sock.close()
    assert status == 400, body[:200]
    assert httpx.get(f"{bounded.url}/live").status_code == 200  # everyone else is answered
