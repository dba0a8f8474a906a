"""Who may steer a real `modelloop monitor` process, and what it refuses before any work: role
keys, the exposure check at start-up, bounded retraining requests, strict input, a bounded
ingest queue, and the context every job it starts is given."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelloop.synthetic import SyntheticTask
from tests.monitoring.helpers import SidecarProcess, TrainedModel, free_port

pytestmark = [pytest.mark.integration]

ADMIN, INGEST, FEEDBACK, ALERTS = ("admin-" + "a" * 20, "ingest-" + "i" * 20,
                                   "feedback-" + "f" * 20, "alerts-" + "m" * 20)
MODELS = ("churn", "churn2", "churn3")


def bearer(key: str, scheme: str = "Bearer") -> dict[str, str]:
    return {"Authorization": f"{scheme} {key}"}


def job_command(home: Path) -> str:
    """A retraining command that writes what it was told (model, trigger, the sidecar's URL and
    key from its environment) and stays running a while, so jobs stay active."""
    code = ("import json, os, sys, time; open(sys.argv[1] + '/job-' + sys.argv[2] + '.json', 'w')"
            ".write(json.dumps(dict(trigger=sys.argv[3], "
            "url=os.environ.get('MODELLOOP_TRAINING_SIDECAR_URL'), "
            "key=os.environ.get('MODELLOOP_TRAINING_SIDECAR_KEY')))); time.sleep(20)")
    return f"{sys.executable} -c \"{code}\" {home} {{model}} {{trigger}}"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, trained: TrainedModel) -> Iterator[SidecarProcess]:
    """One sidecar with all four role keys, three registered models, at most 2 jobs at once."""
    home = tmp_path_factory.mktemp("home")
    for name in MODELS:
        trained.register(home / "registry", name=name)
    proc = SidecarProcess(home, home / "sidecar.log", env={
        "MODELLOOP_MONITOR_API_KEY": ADMIN, "MODELLOOP_MONITOR_INGEST_KEY": INGEST,
        "MODELLOOP_MONITOR_FEEDBACK_KEY": FEEDBACK, "MODELLOOP_MONITOR_ALERTMANAGER_KEY": ALERTS,
        "MODELLOOP_MONITOR_MAX_ACTIVE_JOBS": "2", "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "3600",
        "MODELLOOP_MONITOR_RETRAIN_COMMAND": job_command(home)})
    try:
        yield proc.start()
    except BaseException:
        print(f"--- sidecar log ---\n{proc.log()}")
        raise
    finally:
        proc.close()


def events(trained: TrainedModel, task: SyntheticTask, tag: str, n: int = 50) -> dict[str, Any]:
    x = task.sample(n, seed=7)[task.feature_names].to_numpy()
    proba = trained.predict_proba(x)
    return {"events": [
        {"request_id": f"{tag}-{i}", "timestamp": time.time(), "model": "churn", "version": 1,
         "features": row.tolist(), "prediction": int(p.argmax()), "probabilities": p.tolist(),
         "latency_s": 0.002} for i, (row, p) in enumerate(zip(x, proba, strict=True))]}


def metric(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not on /metrics")


def test_the_poisoning_fails_at_its_first_step_without_a_key(
        keyed: SidecarProcess, trained: TrainedModel, task: SyntheticTask) -> None:
    url = keyed.url
    # the four requests of the attack, as an outsider sends them: each one is refused
    attack = [
        httpx.post(f"{url}/events", json=events(trained, task, "poison")),
        httpx.post(f"{url}/feedback", json={"feedback": [{"request_id": "poison-0", "label": "no"}]}),
        httpx.post(f"{url}/retrain", json={"model": "churn"}),
        httpx.get(f"{url}/export/labelled", params={"model": "churn"}),
    ]
    assert [r.status_code for r in attack] == [401, 401, 401, 401]
    assert attack[0].headers["www-authenticate"].startswith("Bearer")
    assert attack[0].json()["error"] == ("Authorization: a valid key is required "
                                         "(Authorization: Bearer <key>)")
    # a guessed key is no better, and nothing was stored
    assert httpx.post(f"{url}/events", json=events(trained, task, "poison"),
                      headers=bearer("x" * 30)).status_code == 401
    assert httpx.get(f"{url}/jobs", headers=bearer(ADMIN)).json()["jobs"] == []
    assert metric(url, "modelloop_monitor_denied_total", reason="missing_key") >= 4
    assert metric(url, "modelloop_monitor_denied_total", reason="wrong_key") >= 1
    # health and metrics stay open
    assert [httpx.get(f"{url}{p}").status_code for p in ("/live", "/ready", "/metrics")] == [200] * 3


def test_each_role_key_opens_its_own_routes_only(
        keyed: SidecarProcess, trained: TrainedModel, task: SyntheticTask) -> None:
    url = keyed.url
    # serving's ingest key stores events, in any case of the scheme (RFC 7235)
    assert httpx.post(f"{url}/events", json=events(trained, task, "ok"),
                      headers=bearer(INGEST, "bearer")).status_code == 200
    assert httpx.post(f"{url}/events", json=events(trained, task, "ok2"),
                      headers=bearer(INGEST, "BEARER")).status_code == 200
    label = {"request_id": "ok-0", "label": "no"}
    cases = [  # (key, method, path, body): each a key of another role
        (INGEST, "POST", "/feedback", label),
        (INGEST, "POST", "/retrain", {"model": "churn"}),
        (INGEST, "GET", "/export/labelled?model=churn", None),
        (FEEDBACK, "POST", "/events", events(trained, task, "fb")),
        (FEEDBACK, "POST", "/retrain", {"model": "churn"}),
        (FEEDBACK, "GET", "/export/labelled?model=churn", None),
        (FEEDBACK, "GET", "/status", None),
        (ALERTS, "POST", "/events", events(trained, task, "am")),
        (ALERTS, "GET", "/export/labelled?model=churn", None),
    ]
    for key, method, path, body in cases:
        resp = httpx.request(method, f"{url}{path}", json=body, headers=bearer(key))
        assert resp.status_code == 403, (key[:6], path, resp.text)
        assert resp.json()["error"].startswith(f"Authorization: this key may not use {path.split('?')[0]}")
    # the feedback key joins labels; the admin key may do everything
    fb = httpx.post(f"{url}/feedback", json=label, headers=bearer(FEEDBACK))
    assert (fb.status_code, fb.json()["joined"]) == (200, 1)
    assert httpx.post(f"{url}/feedback", json={"request_id": "ok-1", "label": "yes"},
                      headers=bearer(ADMIN)).json()["joined"] == 1
    export = httpx.get(f"{url}/export/labelled", params={"model": "churn"}, headers=bearer(ADMIN))
    assert export.status_code == 200 and export.content[:4] == b"PAR1"
    assert httpx.get(f"{url}/status", headers=bearer(ADMIN)).json()["ready"] is True
    assert metric(url, "modelloop_monitor_denied_total", reason="wrong_role") >= len(cases)


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        # a feature as text or a boolean: lax parsing would have made numbers of them
        ("/events", {"features": ["1.5"] + [0.5] * 19}, 422,
         "events[0].features[0]: Input should be a valid number"),
        ("/events", {"features": [True] + [0.5] * 19}, 422,
         "events[0].features[0]: Input should be a valid number"),
        # a finite feature beyond float32 (one gave a drift score of 1.6e297)
        ("/events", {"features": [1e300] + [0.5] * 19}, 422,
         "events[0].features: values must be numbers within float32 range (|x| <= 3.4e38) or null"),
        # probabilities outside [0, 1]
        ("/events", {"probabilities": [5, -4]}, 422,
         "events[0].probabilities: values must be in [0, 1] and sum to 1 (within 0.001)"),
        # probabilities that do not sum to 1
        ("/events", {"probabilities": [0.5, 0.6]}, 422,
         "events[0].probabilities: values must be in [0, 1] and sum to 1 (within 0.001)"),
        # timestamps far in the future or the past
        ("/events", {"timestamp": 1e300}, 422, "events[0].timestamp: 1e+300 is in the future"),
        ("/events", {"timestamp": -1e12}, 422,
         "events[0].timestamp: -1e+12 is older than the retention age"),
        # a version as text or a boolean
        ("/events", {"version": "1"}, 422, "events[0].version: Input should be a valid integer"),
        ("/events", {"version": True}, 422, "events[0].version: Input should be a valid integer"),
        # labels that only a guess would turn into a class
        ("/feedback", {"label": " 1 "}, 422, "label: ' 1 ' is not a class of churn v1"),
        ("/feedback", {"label": "-0"}, 422, "label: '-0' is not a class of churn v1"),
        ("/feedback", {"label": "\u0661"}, 422, "label: '\u0661' is not a class of churn v1"),
        ("/feedback", {"label": True}, 422,
         "label: Value error, expected a class name, a class index or a number, got bool"),
        ("/feedback", {"label": "no", "timestamp": 1e300}, 422, "timestamp: 1e+300 is in the future"),
    ],
)
def test_the_sidecar_validates_as_strictly_as_serving(
        keyed: SidecarProcess, trained: TrainedModel, task: SyntheticTask, path: str,
        body: dict[str, Any], status: int, error: str) -> None:
    if path == "/events":
        payload = events(trained, task, "strict", n=1)
        payload["events"][0].update(body)
    else:
        tag = f"lbl{time.monotonic_ns()}"  # an id of its own: one predicted twice is ambiguous
        httpx.post(f"{keyed.url}/events", json=events(trained, task, tag, n=1),
                   headers=bearer(INGEST)).raise_for_status()
        payload = {"request_id": f"{tag}-0", **body}
    resp = httpx.post(f"{keyed.url}{path}", json=payload, headers=bearer(ADMIN))
    assert resp.status_code == status, resp.text
    assert resp.json()["error"].startswith(error)


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("limit=-1", "limit: must be between 1 and 1e+06, got -1"),
        ("limit=0", "limit: must be between 1 and 1e+06, got 0"),
        ("limit=99999999999999999999", "limit: must be between 1 and 1e+06, got 99999999999999999999"),
        ("limit=1.5", "limit: expected a whole number, got '1.5'"),
        ("since=nan", "since: must be between 0 and 1e+11, got nan"),
        ("since=x", "since: expected a number, got 'x'"),
    ],
)
def test_query_parameters_are_range_checked(keyed: SidecarProcess, query: str, error: str) -> None:
    resp = httpx.get(f"{keyed.url}/export/labelled?model=churn&{query}", headers=bearer(ADMIN))
    assert (resp.status_code, resp.json()["error"]) == (422, error)


def read_answer(sock: socket.socket) -> bytes:
    """One whole HTTP answer off a raw socket: its head, then Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def alert(model: str, i: int) -> dict[str, Any]:
    return {"status": "firing", "labels": {"alertname": "ModelDrift", "model": model},
            "annotations": {}, "startsAt": "2026-12-03T00:00:00Z", "fingerprint": f"fp{i}"}


def test_retraining_requests_are_bounded_and_jobs_know_their_sidecar(keyed: SidecarProcess) -> None:
    url = keyed.url
    names = ["nope", "../x", *MODELS]
    body = {"version": "4", "status": "firing", "alerts": [alert(m, i) for i, m in enumerate(names)]}
    assert httpx.post(f"{url}/alertmanager", json=body).status_code == 401
    resp = httpx.post(f"{url}/alertmanager", json=body, headers=bearer(ALERTS))
    assert resp.status_code == 200, resp.text
    out = resp.json()
    # unregistered names start nothing; two jobs run at once at most, the third is refused
    assert [i["why"] for i in out["ignored"]] == [
        f"model 'nope' is not registered under {keyed.home / 'registry'}",
        f"model '../x' is not registered under {keyed.home / 'registry'}"]
    assert len(out["started"]) == 2
    assert [s["refused"] for s in out["skipped"]] == ["at_capacity"]
    assert out["skipped"][0]["detail"].endswith("at most 2 at once (MODELLOOP_MONITOR_MAX_ACTIVE_JOBS)")
    manual = httpx.post(f"{url}/retrain", json={"model": "churn3"}, headers=bearer(ADMIN))
    assert (manual.status_code, manual.json()["refused"]) == (429, "at_capacity")
    assert "retry-after" in manual.headers
    unknown = httpx.post(f"{url}/retrain", json={"model": "../x"}, headers=bearer(ADMIN))
    assert (unknown.status_code, unknown.json()["error"]) == (
        422, f"model: '../x' is not registered under {keyed.home / 'registry'}")
    assert metric(url, "modelloop_retrain_refused_total", trigger="alertmanager",
                  reason="unknown_model") == 2
    assert metric(url, "modelloop_retrain_refused_total", trigger="alertmanager",
                  reason="at_capacity") == 1
    assert metric(url, "modelloop_retrain_refused_total", trigger="manual", reason="at_capacity") == 1
    # each job was told this sidecar's own URL (not the default port), its key and its trigger
    started = sorted(s["job"] for s in out["started"])
    seen = []
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline:
        seen = [json.loads(p.read_text()) for p in keyed.home.glob("job-*.json") if p.stat().st_size]
        time.sleep(0.1)
    assert len(started) == 2
    assert seen == [{"trigger": "alertmanager", "url": keyed.url, "key": ADMIN}] * 2


def run_monitor(home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("modelloop")
    return subprocess.run([str(exe), "monitor", "--port", str(free_port())], capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "MODELLOOP_HOME": str(home), **env})


@pytest.mark.parametrize(
    ("env", "error"),
    [
        # beyond loopback without a key
        ({"MODELLOOP_MONITOR_HOST": "0.0.0.0"}, "error: refusing to listen on 0.0.0.0 without a key"),
        # a role key without the admin key
        ({"MODELLOOP_MONITOR_INGEST_KEY": INGEST},
         "error: settings: MODELLOOP_MONITOR_API_KEY (the admin key) is required when a role key"),
        # a key too short to resist guessing
        ({"MODELLOOP_MONITOR_API_KEY": "secret"},
         "error: setting api_key (MODELLOOP_MONITOR_API_KEY): Value error, must be at least 16"),
    ],
)
def test_an_exposed_or_misconfigured_sidecar_does_not_start(home: Path, env: dict[str, str],
                                                            error: str) -> None:
    result = run_monitor(home, **env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert " ".join(" ".join(lines).split()).startswith(error), result.stderr
    assert "Traceback" not in result.stderr


def test_a_full_ingest_queue_answers_503_and_frees_itself(
        home: Path, registered: TrainedModel, task: SyntheticTask) -> None:
    body = json.dumps(events(registered, task, "big", n=400)).encode()
    proc = SidecarProcess(home, home / "sidecar.log", env={
        "MODELLOOP_MONITOR_INGEST_QUEUE_BYTES": str(int(len(body) * 1.5)),
        "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "3600"})
    try:
        proc.start()
        # a slow sender holds the budget: its headers and half its body are in
        slow = socket.create_connection(("127.0.0.1", proc.port))
        slow.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:len(body) // 2])
        deadline = time.monotonic() + 10
        while True:  # the sidecar has taken the slow body's bytes once a second body is refused
            busy = httpx.post(f"{proc.url}/events", content=body,
                              headers={"content-type": "application/json"})
            if busy.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert busy.status_code == 503, busy.text
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"].startswith("body: the ingest queue is full")
        assert metric(proc.url, "modelloop_ingest_busy_total") >= 1
        slow.sendall(body[len(body) // 2:])
        answer = read_answer(slow)
        slow.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        # the budget is given back: the refused body goes through on a retry
        retry = httpx.post(f"{proc.url}/events", content=body.replace(b'"big-', b'"big2-'),
                           headers={"content-type": "application/json"})
        assert (retry.status_code, retry.json()["accepted"]) == (200, 400)
    except BaseException:
        print(f"--- sidecar log ---\n{proc.log()}")
        raise
    finally:
        proc.close()


def test_a_slow_sender_cannot_hold_the_ingest_queue(
        home: Path, registered: TrainedModel, task: SyntheticTask) -> None:
    body = json.dumps(events(registered, task, "slow", n=400)).encode()
    proc = SidecarProcess(home, home / "sidecar.log", env={
        "MODELLOOP_MONITOR_INGEST_QUEUE_BYTES": str(len(body)),
        "MODELLOOP_MONITOR_BODY_READ_TIMEOUT_S": "1", "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "3600"})
    try:
        proc.start()
        slow = socket.create_connection(("127.0.0.1", proc.port))
        slow.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:100])
        slow.settimeout(30)
        answer = read_answer(slow)  # the sidecar gives up on it and answers
        slow.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"body: not received within 1 s" in answer
        ok = httpx.post(f"{proc.url}/events", content=body, headers={"content-type": "application/json"})
        assert (ok.status_code, ok.json()["accepted"]) == (200, 400)
    except BaseException:
        print(f"--- sidecar log ---\n{proc.log()}")
        raise
    finally:
        proc.close()


def test_the_default_retrain_command_passes_the_trigger() -> None:
    from monitoring.records import Requester
    from monitoring.settings import MonitorSettings
    from monitoring.triggers import JobRequest, render_command

    req = JobRequest(job_id="j", model="churn", version=None, trigger=Requester.policy, reason="drift")
    assert render_command(MonitorSettings().retrain_command, req)[-2:] == ["--trigger", "policy"]
