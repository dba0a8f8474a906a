"""Retraining as a real `modelloop monitor` process does it: a refused policy retrain is asked
again at the next check (no cooldown), an Alertmanager job of the same model and hour does not
block the policy's once it ended, and a local job runs the sidecar's own `modelloop` even when
its virtual environment is not on PATH."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelloop.synthetic import SyntheticTask
from monitoring.app import create_app
from monitoring.jobs import job_name
from monitoring.records import JobRecord, JobStatus, Requester
from monitoring.sidecar import Sidecar
from tests.monitoring.helpers import TrainedModel, serve_in_thread, sidecar_process
from tests.monitoring.test_app import events_for, make_settings
from tests.monitoring.test_trust import alert, metric

pytestmark = [pytest.mark.integration]

# fires for any model with one event: its median latency is always >= 0
POLICY = """
rules:
  - name: slow
    metric: latency_p50
    threshold: 0
    min_samples: 1
    cooldown: 6h
    action: retrain
"""
# a job that runs until the test releases it (a file named after its trigger appears)
JOB = """
import os, sys, time
release, deadline = os.path.join(sys.argv[1], "release-" + sys.argv[2]), time.monotonic() + 300
while not os.path.exists(release) and time.monotonic() < deadline:
    time.sleep(0.05)
"""


def wait_for_job(url: str, job_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        jobs = {j["id"]: j for j in httpx.get(f"{url}/jobs").json()["jobs"]}
        if jobs.get(job_id, {}).get("status") == status:
            return jobs[job_id]
        assert time.monotonic() < deadline, f"job {job_id} not {status}: {jobs}"
        time.sleep(0.05)


def rule_state(url: str) -> dict[str, Any]:
    (rule,) = httpx.get(f"{url}/status").json()["policy"]["rules"]
    return rule


def assert_refused(url: str, times: float) -> None:
    """The rule fired ``times`` times, each refused at the cap, and is not cooling down."""
    rule = rule_state(url)
    assert (rule["state"], rule["last_fired"]) == ("refused", None)
    assert rule["refused"].endswith("at most 1 at once (MODELLOOP_MONITOR_MAX_ACTIVE_JOBS)")
    assert metric(url, "modelloop_threshold_breaches_total", rule="slow") == times
    assert metric(url, "modelloop_retrain_refused_total", trigger="policy",
                  reason="at_capacity") == times


def test_a_refused_policy_retrain_is_asked_again_and_other_triggers_do_not_block_it(
        home: Path, registered: TrainedModel, task: SyntheticTask, tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "job.py").write_text(JOB)
    with sidecar_process(home, home / "sidecar.log", MODELLOOP_MONITOR_MAX_ACTIVE_JOBS="1",
                         MODELLOOP_MONITOR_CHECK_INTERVAL_S="3600",
                         MODELLOOP_MONITOR_JOB_POLL_S="0.1",
                         MODELLOOP_MONITOR_POLICY_FILE=str(tmp_path / "policy.yaml"),
                         MODELLOOP_MONITOR_RETRAIN_COMMAND=(
                             f"{sys.executable} {tmp_path / 'job.py'} {tmp_path} {{trigger}}")) as sc:
        try:
            url = sc.url
            events, _ = events_for(registered, task.sample(20, seed=4), "p")
            httpx.post(f"{url}/events", json={"events": events}).raise_for_status()
            # an alert's job of churn takes the one place (MAX_ACTIVE_JOBS=1)
            body = {"version": "4", "status": "firing", "alerts": [alert("churn", 1)]}
            (alert_job,) = httpx.post(f"{url}/alertmanager", json=body).json()["started"]
            # the rule fires and its job is refused at the cap: no cooldown, asked again next check
            httpx.post(f"{url}/check", timeout=120).raise_for_status()
            # (the check at start-up may have seen the events too: it ends before this one begins)
            fired = metric(url, "modelloop_threshold_breaches_total", rule="slow")
            assert fired >= 1
            assert_refused(url, fired)
            httpx.post(f"{url}/check", timeout=120).raise_for_status()
            assert_refused(url, fired + 1)
            # the alert's job ends; the policy's job of the same model and hour is no duplicate of it
            (tmp_path / "release-alertmanager").touch()
            wait_for_job(url, alert_job["job"], "succeeded")
            httpx.post(f"{url}/check", timeout=120).raise_for_status()
            (policy_job,) = [j for j in httpx.get(f"{url}/jobs").json()["jobs"]
                             if j["trigger"] == "policy"]
            assert policy_job["status"] == "running" and policy_job["id"] != alert_job["job"]
            # that job started, so the cooldown holds now
            httpx.post(f"{url}/check", timeout=120).raise_for_status()
            assert rule_state(url)["state"] == "cooldown"
            assert metric(url, "modelloop_threshold_breaches_total", rule="slow") == fired + 2
        finally:
            for trigger in ("alertmanager", "policy"):
                (tmp_path / f"release-{trigger}").touch()


@pytest.mark.parametrize(("holder", "max_jobs", "state", "fires_again"), [
    (Requester.policy, 3, "cooldown", False),
    (Requester.policy, 1, "cooldown", False),  # refused at the cap, which is checked first
    (Requester.alertmanager, 3, "refused", True),
])
def test_a_rule_refused_for_a_policy_job_of_its_model_cools_down(
        home: Path, registered: TrainedModel, task: SyntheticTask, tmp_path: Path,
        holder: Requester, max_jobs: int, state: str, fires_again: bool) -> None:
    """A policy job of the model runs, started in an earlier job window (a long retraining, or
    another replica's on a shared store): a rule that fires now is refused (``model_busy``) and
    cools down as if it had started that job. Before, it fired again at every check, and started
    a second job as soon as the first ended, without the labels that could make its challenger
    win. A job of another trigger holding the model (an alert's) leaves the rule asking."""
    (tmp_path / "policy.yaml").write_text(POLICY)
    sc = Sidecar(make_settings(home, policy_file=tmp_path / "policy.yaml", max_active_jobs=max_jobs))
    sc.start(background=False)
    earlier = time.time() - 2 * sc.settings.job_window_s
    running = JobRecord(id=job_name("churn", earlier, sc.settings.job_window_s, holder), model="churn",
                        trigger=holder, kind="local", reason="r", status=JobStatus.running,
                        created_at=earlier, ended_at=None, handle="", detail="")
    assert sc.store.start_job(running) is None
    try:
        with serve_in_thread(create_app(sc)) as url:
            events, _ = events_for(registered, task.sample(20, seed=4), "p")
            httpx.post(f"{url}/events", json={"events": events}).raise_for_status()
            for _ in range(2):
                httpx.post(f"{url}/check", timeout=120).raise_for_status()
            rule = rule_state(url)
            assert rule["state"] == state
            assert (rule["refused"] is None) is not fires_again, rule
            fired = metric(url, "modelloop_threshold_breaches_total", rule="slow")
            assert fired == (2 if fires_again else 1)
            assert [j["id"] for j in httpx.get(f"{url}/jobs").json()["jobs"]] == [running.id]
    finally:
        sc.stop()


@pytest.mark.parametrize(
    ("command", "status", "detail"),
    [
        # the default command's modelloop: the one beside the sidecar's Python, off PATH
        ("modelloop --version", "succeeded", "local job "),
        # a program that is nowhere: the job fails to start, and says which
        ("modelloop-nope retrain --name {model}", "failed",
         "cannot start 'modelloop-nope': no such executable on PATH (/usr/bin:/bin); check "
         "MODELLOOP_MONITOR_RETRAIN_COMMAND"),
    ],
)
def test_a_local_job_runs_without_the_venv_on_path(
        home: Path, registered: TrainedModel, command: str, status: str, detail: str) -> None:
    with sidecar_process(home, home / "sidecar.log", PATH="/usr/bin:/bin",
                         MODELLOOP_MONITOR_JOB_POLL_S="0.1",
                         MODELLOOP_MONITOR_RETRAIN_COMMAND=command) as sc:
        resp = httpx.post(f"{sc.url}/retrain", json={"model": "churn"})
        assert resp.status_code == (202 if status == "succeeded" else 502), resp.text
        assert resp.json()["detail"].startswith(detail)
        job = wait_for_job(sc.url, resp.json()["job"], status)
        if status == "succeeded":
            log = (home / "jobs" / f"{job['id']}.log").read_text()
            assert log.startswith("modelloop "), log
        else:
            assert job["detail"] == detail


def test_a_policy_job_that_promotes_nothing_lets_its_rule_retry_after_new_labels(
        home: Path, registered: TrainedModel, task: SyntheticTask, tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    with sidecar_process(home, home / "sidecar.log", MODELLOOP_MONITOR_CHECK_INTERVAL_S="3600",
                         MODELLOOP_MONITOR_JOB_POLL_S="0.1",
                         MODELLOOP_MONITOR_RETRAIN_RETRY_LABELS="30",
                         MODELLOOP_MONITOR_POLICY_FILE=str(tmp_path / "policy.yaml"),
                         # a job that ends at once and registers nothing: its challenger "lost"
                         MODELLOOP_MONITOR_RETRAIN_COMMAND=f"{sys.executable} -c pass") as sc:
        url = sc.url
        sample = task.sample(60, seed=5)
        events, _ = events_for(registered, sample, "retry")
        httpx.post(f"{url}/events", json={"events": events}).raise_for_status()
        httpx.post(f"{url}/check", timeout=120).raise_for_status()
        (first,) = [j for j in httpx.get(f"{url}/jobs").json()["jobs"] if j["trigger"] == "policy"]
        wait_for_job(url, first["id"], "succeeded")
        # production did not change: the 6 h cooldown now gives way to 30 new labels
        deadline = time.monotonic() + 30
        while rule_state(url)["retry_after_labels"] is None:
            assert time.monotonic() < deadline, rule_state(url)
            time.sleep(0.05)
        httpx.post(f"{url}/check", timeout=120).raise_for_status()
        assert rule_state(url)["state"] == "cooldown"  # no new labels yet
        labels = [{"request_id": f"retry-{i}", "label": int(y)}
                  for i, y in enumerate(sample["target"][:29])]
        httpx.post(f"{url}/feedback", json={"feedback": labels}).raise_for_status()
        httpx.post(f"{url}/check", timeout=120).raise_for_status()
        assert rule_state(url)["state"] == "cooldown"  # 29 of 30
        more = [{"request_id": "retry-29", "label": int(sample["target"].iloc[29])}]
        httpx.post(f"{url}/feedback", json={"feedback": more}).raise_for_status()
        httpx.post(f"{url}/check", timeout=120).raise_for_status()
        jobs = [j for j in httpx.get(f"{url}/jobs").json()["jobs"] if j["trigger"] == "policy"]
        # a retry, named after the first (which, ending at once too, may arm the next retry)
        assert len(jobs) == 2 and "-r" in jobs[0]["id"], jobs
