"""Retraining triggers: a real local process, a real webhook server, the Kubernetes Job manifest
(validated against the Kubernetes schema) created through the real client, the Docker SDK (where
an engine runs), and the job manager's one-job-per-model-and-window rule."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from prometheus_client import CollectorRegistry

from monitoring.jobs import JobManager, Refusal, build_trigger, job_name
from monitoring.metrics import JOB_RESULTS, JOB_TRIGGERS, REFUSE_REASONS, MonitorMetrics
from monitoring.records import JobStatus, Requester
from monitoring.settings import MonitorSettings
from monitoring.store import open_store
from monitoring.triggers import (
    SIDECAR_KEY_ENV,
    SIDECAR_URL_ENV,
    JobRequest,
    LocalProcessTrigger,
    TriggerConflict,
    TriggerError,
    WebhookTrigger,
    render_command,
)
from monitoring.triggers_cluster import DockerTrigger, KubernetesJobTrigger, job_manifest

REQ = JobRequest(job_id="retrain-churn-abc123-202405011000", model="churn", version=3,
                 trigger=Requester.policy, reason="drift share 0.3 >= 0.1")


def wait_for(trigger: Any, handle: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while (status := trigger.poll(handle)) == "running":
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.05)
    return status


def test_command_templates_fill_each_argument() -> None:
    cmd = render_command("modelloop retrain --name {model} --reason '{reason}' --base {version}", REQ)
    assert cmd == ["modelloop", "retrain", "--name", "churn", "--reason",
                   "drift share 0.3 >= 0.1", "--base", "3"]
    with pytest.raises(TriggerError, match=r"bad retrain command template 'x \{nope\}': 'nope'"):
        render_command("x {nope}", REQ)


@pytest.mark.parametrize(("code", "status"), [(0, "succeeded"), (3, "failed")])
def test_local_process_runs_and_reports_its_exit(tmp_path: Path, code: int, status: str) -> None:
    trigger = LocalProcessTrigger(tmp_path)
    out = tmp_path / "out.txt"
    req = JobRequest(**{**REQ.__dict__, "command": [
        sys.executable, "-c", f"import sys; open({str(out)!r}, 'w').write(sys.argv[1]); "
                              f"print('training'); sys.exit({code})", REQ.model]})
    handle = trigger.start(req)
    assert wait_for(trigger, handle) == status
    assert out.read_text() == "churn"
    log_path, exit_path = trigger.paths(REQ.job_id)
    assert "training" in log_path.read_text() and exit_path.read_text().strip() == str(code)
    # a restarted sidecar (a fresh trigger) still learns how the job ended
    assert LocalProcessTrigger(tmp_path).poll(handle) == status


def test_a_local_job_is_told_the_sidecars_url_and_key(tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    env = {SIDECAR_URL_ENV: "http://127.0.0.1:18001", SIDECAR_KEY_ENV: "a" * 32}
    req = JobRequest(**{**REQ.__dict__, "env": env, "command": [
        sys.executable, "-c", f"import os; open({str(out)!r}, 'w').write(os.environ[{SIDECAR_URL_ENV!r}]"
                              f" + ' ' + os.environ[{SIDECAR_KEY_ENV!r}] + ' ' + os.environ['PATH'][:1])"]})
    trigger = LocalProcessTrigger(tmp_path)
    assert wait_for(trigger, trigger.start(req)) == "succeeded"
    assert out.read_text() == "http://127.0.0.1:18001 " + "a" * 32 + " /"  # and the rest kept


def test_local_process_can_be_cancelled_and_missing_programs_are_named(tmp_path: Path) -> None:
    trigger = LocalProcessTrigger(tmp_path)
    req = JobRequest(**{**REQ.__dict__, "command": [sys.executable, "-c", "import time; time.sleep(60)"]})
    handle = trigger.start(req)
    assert trigger.poll(handle) == "running"
    trigger.cancel(handle)
    assert wait_for(trigger, handle) == "failed"
    # a program that is not there fails to start, named (it was a shell's exit 127, no detail)
    missing = JobRequest(**{**REQ.__dict__, "command": ["/no/such/program"]})
    with pytest.raises(TriggerError, match=r"^cannot start '/no/such/program': no such executable; "
                                           r"check MODELLOOP_MONITOR_RETRAIN_COMMAND$"):
        trigger.start(missing)


def test_a_local_job_finds_the_sidecars_own_modelloop_off_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the venv's bin folder is not on PATH, as when the sidecar is started by its full path
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    trigger = LocalProcessTrigger(tmp_path)
    handle = trigger.start(JobRequest(**{**REQ.__dict__, "command": ["modelloop", "--version"]}))
    assert wait_for(trigger, handle) == "succeeded"
    assert trigger.paths(REQ.job_id)[0].read_text().startswith("modelloop ")
    # any other program is looked up on the job's PATH, and one not there is named
    other = JobRequest(**{**REQ.__dict__, "command": ["modelloop-nope", "retrain"]})
    with pytest.raises(TriggerError, match=r"^cannot start 'modelloop-nope': no such executable "
                                           r"on PATH \(/usr/bin:/bin\)"):
        trigger.start(other)


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[tuple[str, str, Any]], dict[str, Any]]]:
    """A real HTTP server recording requests; ``behaviour`` sets its answers."""
    seen: list[tuple[str, str, Any]] = []
    behaviour: dict[str, Any] = {"post": 201, "job_status": {"active": 1}}

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict[str, Any]) -> None:
            out = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(("POST", self.path, body))
            code = behaviour["post"]
            if code == 409:
                self._reply(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                  "reason": "AlreadyExists", "code": 409})
            else:
                self._reply(code, body)

        def do_GET(self) -> None:
            seen.append(("GET", self.path, None))
            self._reply(200, {"apiVersion": "batch/v1", "kind": "Job",
                              "metadata": {"name": self.path.split("/")[-2]},
                              "status": behaviour["job_status"]})

        def do_DELETE(self) -> None:
            seen.append(("DELETE", self.path, None))
            self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen, behaviour
    server.shutdown()
    server.server_close()


def test_webhook_posts_the_job_and_names_failures(http_server: Any) -> None:
    url, seen, behaviour = http_server
    trigger = WebhookTrigger(f"{url}/hooks/retrain")
    req = JobRequest(**{**REQ.__dict__, "command": ["modelloop", "retrain", "--name", "churn"],
                        "env": {SIDECAR_URL_ENV: "http://sidecar:8001", SIDECAR_KEY_ENV: "k" * 20}})
    assert trigger.start(req) == "webhook:201"
    assert seen[-1] == ("POST", "/hooks/retrain", {  # the sidecar's URL, never its key
        "job": REQ.job_id, "model": "churn", "version": 3, "trigger": "policy",
        "reason": REQ.reason, "command": ["modelloop", "retrain", "--name", "churn"],
        "sidecar_url": "http://sidecar:8001"})
    assert trigger.poll("webhook:201") == "succeeded"
    behaviour["post"] = 500
    with pytest.raises(TriggerError, match=r"answered 500"):
        trigger.start(req)
    behaviour["post"] = 409
    with pytest.raises(TriggerConflict):
        trigger.start(req)
    with pytest.raises(TriggerError, match=r"webhook http://127\.0\.0\.1:1/x failed"):
        WebhookTrigger("http://127.0.0.1:1/x", timeout_s=2).start(req)


@pytest.mark.parametrize("claim", [None, "modelloop-registry"])
def test_the_job_manifest_is_valid_kubernetes(claim: str | None) -> None:
    req = JobRequest(**{**REQ.__dict__, "command": ["modelloop", "retrain", "--name", "churn"]})
    manifest = job_manifest(req, namespace="ml", image="ghcr.io/acme/modelloop:1.0",
                            service_account="retrainer", claim=claim, ttl_s=3600, deadline_s=7200)
    kubernetes_validate.validate(manifest, "1.30", strict=True)  # raises on any schema error
    assert manifest["metadata"]["name"] == REQ.job_id
    spec = manifest["spec"]
    assert (spec["backoffLimit"], spec["ttlSecondsAfterFinished"], spec["activeDeadlineSeconds"]) == (
        0, 3600, 7200)
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"] == ["modelloop", "retrain", "--name", "churn"]
    assert ("volumes" in spec["template"]["spec"]) == (claim is not None)


def test_a_job_reads_the_key_from_a_secret_never_from_its_spec() -> None:
    env = {SIDECAR_URL_ENV: "http://modelloop-monitor:8001", SIDECAR_KEY_ENV: "s" * 32}
    req = JobRequest(**{**REQ.__dict__, "env": env, "command": ["modelloop", "retrain"]})
    manifest = job_manifest(req, namespace="ml", image="img", key_secret="modelloop-keys")
    kubernetes_validate.validate(manifest, "1.30", strict=True)
    container_env = manifest["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": SIDECAR_URL_ENV, "value": "http://modelloop-monitor:8001"} in container_env
    assert {"name": SIDECAR_KEY_ENV, "valueFrom": {"secretKeyRef": {
        "name": "modelloop-keys", "key": "api-key"}}} in container_env
    assert "s" * 32 not in str(manifest)


def test_a_broken_manifest_fails_validation() -> None:
    manifest = job_manifest(REQ, namespace="ml", image="img")
    manifest["spec"]["backoffLimit"] = "none"  # the kind of mistake the schema check catches
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest, "1.30", strict=True)


def test_kubernetes_trigger_creates_polls_and_deletes_through_the_api(http_server: Any) -> None:
    url, seen, behaviour = http_server
    trigger = KubernetesJobTrigger(namespace="ml", image="img", api_url=url)
    req = JobRequest(**{**REQ.__dict__, "command": ["modelloop", "retrain", "--name", "churn"]})
    handle = trigger.start(req)
    method, path, body = seen[-1]
    assert (method, path) == ("POST", "/apis/batch/v1/namespaces/ml/jobs")
    assert body == trigger.manifest(req)
    assert trigger.poll(handle) == "running"
    behaviour["job_status"] = {"succeeded": 1}
    assert trigger.poll(handle) == "succeeded"
    behaviour["job_status"] = {"failed": 1}
    assert trigger.poll(handle) == "failed"
    trigger.cancel(handle)
    assert seen[-1][:2] == ("DELETE", f"/apis/batch/v1/namespaces/ml/jobs/{REQ.job_id}"
                                      "?propagationPolicy=Background")
    # a second replica creating the same Job name gets a conflict, not a second job
    behaviour["post"] = 409
    with pytest.raises(TriggerConflict, match=f"Job {REQ.job_id} already exists in namespace ml"):
        trigger.start(req)


def _docker_engine() -> str | None:
    import docker

    try:
        docker.from_env().ping()
    except docker.errors.DockerException as exc:
        return str(exc)
    return None


def test_docker_trigger_without_an_engine_fails_clearly() -> None:
    trigger = DockerTrigger(image="modelloop:latest", base_url="unix:///nonexistent/docker.sock")
    with pytest.raises(TriggerError, match="no Docker engine"):
        trigger.start(REQ)
    spec = DockerTrigger(image="img", volume="/srv/ml").container_spec(
        JobRequest(**{**REQ.__dict__, "command": ["modelloop", "retrain"]}))
    assert spec["name"] == REQ.job_id and spec["command"] == ["modelloop", "retrain"]
    assert spec["volumes"] == {"/srv/ml": {"bind": "/var/lib/modelloop", "mode": "rw"}}


@pytest.mark.skipif(_docker_engine() is not None, reason="no Docker engine runs here")
def test_docker_trigger_runs_a_container() -> None:  # pragma: no cover - needs an engine
    trigger = DockerTrigger(image="python:3.11-slim")
    req = JobRequest(**{**REQ.__dict__, "job_id": f"modelloop-test-{int(time.time())}",
                        "command": ["python", "-c", "print('ok')"]})
    handle = trigger.start(req)
    assert wait_for(trigger, handle, timeout=120) == "succeeded"
    trigger.client().containers.get(handle).remove()


def test_job_names_are_deterministic_per_model_trigger_and_window() -> None:
    a = job_name("Churn_Model", at=3600 * 10 + 5, window_s=3600)
    assert a == job_name("Churn_Model", at=3600 * 10 + 3599, window_s=3600)
    assert a != job_name("Churn_Model", at=3600 * 11, window_s=3600)
    assert a != job_name("churn-model", at=3600 * 10, window_s=3600)  # different models differ
    assert a.startswith("retrain-churn-model-") and a.endswith("-p197001011000") and len(a) <= 63
    # each trigger has its own name, so one does not block another
    assert job_name("Churn_Model", at=3600 * 10 + 5, window_s=3600, trigger=Requester.alertmanager) == (
        a.replace("-p1970", "-a1970"))
    long = job_name("m" * 64, at=0, window_s=3600, trigger=Requester.manual)
    assert len(long) <= 63 and "-m19700101000000" in long


def manager(tmp_path: Path, store_url: str, clock: list[float]) -> JobManager:
    store = open_store(store_url)
    out = tmp_path / "runs.txt"
    cmd = (f"{sys.executable} -c \"import sys; open(sys.argv[1], 'a').write(sys.argv[2] + chr(10))\" "
           f"{out} {{job}}")
    return JobManager(store, LocalProcessTrigger(tmp_path / "jobs"),
                      MonitorMetrics(CollectorRegistry()), command=cmd, window_s=3600,
                      clock=lambda: clock[0])


def test_every_refusal_is_a_reason_of_the_refused_counter() -> None:
    # the counter's series are created at zero for each reason (REFUSE_REASONS is made from the
    # enum), and dashboards and alerts written before it hold these strings
    assert REFUSE_REASONS == ("unknown_model", "not_watched", "duplicate", "model_busy",
                              "at_capacity") == tuple(Refusal)


def test_who_asks_and_how_a_job_ends_are_the_metrics_labels() -> None:
    # the retraining metrics' series are created at zero from these tuples, and stored jobs and
    # /jobs hold the same strings: the enums' values are exactly what dashboards and databases
    # written before them hold
    assert JOB_TRIGGERS == ("policy", "manual", "alertmanager") == tuple(Requester)
    assert [s.value for s in JobStatus] == ["started", "running", "succeeded", "failed", "skipped"]
    assert JOB_RESULTS == ("started", "succeeded", "failed", "skipped")
    assert [s for s in JobStatus if s.active] == [JobStatus.started, JobStatus.running]


def test_two_replicas_judging_the_same_window_start_one_job(tmp_path: Path) -> None:
    clock = [36000.0]
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    one, two = manager(tmp_path, url, clock), manager(tmp_path, url, clock)
    first = one.request("churn", trigger=Requester.policy, reason="drift")
    second = two.request("churn", trigger=Requester.policy, reason="drift")
    assert first.status == "running"
    assert (second.status, second.refused, second.detail) == (
        "skipped", "duplicate", f"job {first.job_id} is already running for this window")
    deadline = time.monotonic() + 30
    while one.store.jobs(active_only=True):
        assert time.monotonic() < deadline
        one.poll(["churn"])
        time.sleep(0.05)
    # the same window again, after the job ended: still one job for that window
    again = two.request("churn", trigger=Requester.policy, reason="drift")
    assert (again.status, again.refused, again.detail) == (
        "skipped", "duplicate", f"job {first.job_id} already ran for this window (succeeded)")
    clock[0] += 3600  # the next window may retrain again
    assert one.request("churn", trigger=Requester.policy, reason="drift").status == "running"
    assert (tmp_path / "runs.txt").read_text().splitlines()[0] == first.job_id
    assert one.metrics.retrain_jobs.labels("churn", "policy", "succeeded")._value.get() == 1
    assert two.metrics.retrain_jobs.labels("churn", "policy", "skipped")._value.get() == 2
    assert two.metrics.retrain_refused.labels("policy", "duplicate")._value.get() == 2


def test_a_job_of_another_trigger_blocks_only_while_it_runs(tmp_path: Path) -> None:
    clock = [36000.0]
    m = manager(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", clock)
    alert = m.request("churn", trigger=Requester.alertmanager, reason="ModelDrift")
    assert alert.status == "running"
    # while the alert's job runs, the model is busy: refused, not a duplicate of it
    busy = m.request("churn", trigger=Requester.policy, reason="drift")
    assert (busy.status, busy.refused) == ("skipped", "model_busy")
    deadline = time.monotonic() + 30
    while m.store.jobs(active_only=True):
        assert time.monotonic() < deadline
        m.poll(["churn"])
        time.sleep(0.05)
    # once it ended, the policy's job of the same model and window starts
    clock[0] += 60
    policy = m.request("churn", trigger=Requester.policy, reason="drift")
    assert policy.status == "running" and policy.job_id != alert.job_id


def test_a_job_past_its_timeout_is_stopped_and_failed(tmp_path: Path) -> None:
    clock = [100.0]
    m = manager(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", clock)
    m.command = f"{sys.executable} -c \"import time; time.sleep(60)\""
    m.timeout_s = 10
    outcome = m.request("churn", trigger=Requester.manual, reason="test")
    m.poll(["churn"])
    assert m.store.jobs()[0].status == "running"
    clock[0] += 11
    m.poll(["churn"])
    job = m.store.jobs()[0]
    assert (job.id, job.status, job.detail) == (outcome.job_id, "failed", "stopped after the 10 s timeout")
    assert m.metrics.retrain_active.labels("churn")._value.get() == 0


def test_a_trigger_that_cannot_start_records_a_failed_job(tmp_path: Path) -> None:
    clock = [0.0]
    m = manager(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", clock)
    m.trigger = WebhookTrigger("http://127.0.0.1:1/none", timeout_s=1)
    outcome = m.request("churn", trigger=Requester.policy, reason="x")
    assert outcome.status == "failed" and "webhook http://127.0.0.1:1/none failed" in outcome.detail
    assert m.store.jobs()[0].status == "failed" and not m.store.jobs(active_only=True)
    # a local program that is not there: the failed job says which
    m.trigger, m.command = LocalProcessTrigger(tmp_path / "jobs"), "/no/such/modelloop retrain"
    clock[0] += 3600
    local = m.request("churn", trigger=Requester.policy, reason="x")
    assert (local.status, local.detail) == ("failed", m.store.jobs()[0].detail)
    assert local.detail.startswith("cannot start '/no/such/modelloop': no such executable")


@pytest.mark.parametrize(
    ("settings", "kind", "error"),
    [
        ({"trigger": "local"}, "local", None),
        ({"trigger": "webhook", "webhook_url": "http://x/y"}, "webhook", None),
        ({"trigger": "kubernetes"}, "kubernetes", None),
        ({"trigger": "docker"}, "docker", None),
        ({"trigger": "none"}, "none", None),
        # a webhook trigger needs its URL
        ({"trigger": "webhook"}, None, "MODELLOOP_MONITOR_WEBHOOK_URL is required when trigger is webhook"),
    ],
)
def test_build_trigger_from_settings(home: Path, settings: dict[str, Any], kind: str | None,
                                     error: str | None) -> None:
    if error:
        with pytest.raises(ValueError, match=error):
            build_trigger(MonitorSettings(**settings))
    else:
        assert build_trigger(MonitorSettings(**settings)).kind == kind
