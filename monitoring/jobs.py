"""Retraining jobs: which may start, under what name, and how each one ends.

At most one job per model is active: the store refuses a second active row (a unique index, so
this holds across replicas sharing PostgreSQL). Jobs requested by the policy or Alertmanager are
named per model, trigger and time window (``retrain-<model>-<hash>-<p|a><window start>``), so two
replicas judging the same window ask for the same name and only one job is created: the second
request is a ``duplicate``, whether that job still runs or has ended. A job of another trigger
does not make a duplicate: while it runs the model is busy (refused, asked again later), and once
it ended it blocks nothing. Manual requests get a name of their own.

Example::

    manager = JobManager(store, LocalProcessTrigger(jobs_dir), metrics, command="...")
    outcome = manager.request("churn", trigger=Requester.policy, reason="drift share 0.3")
    manager.poll()     # records the end of finished jobs, exports status
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, TypedDict

from monitoring.metrics import MonitorMetrics
from monitoring.records import JobRecord, JobStatus, Refusal, Requester
from monitoring.settings import MonitorSettings
from monitoring.store import EventStore
from monitoring.triggers import (
    SIDECAR_KEY_ENV,
    SIDECAR_URL_ENV,
    JobRequest,
    LocalProcessTrigger,
    NoTrigger,
    RunState,
    Trigger,
    TriggerConflict,
    TriggerError,
    WebhookTrigger,
    render_command,
)

log = logging.getLogger(__name__)


_TRIGGER_MARKS = {Requester.policy: "p", Requester.alertmanager: "a", Requester.manual: "m"}


def job_name(model: str, at: float, window_s: float, trigger: Requester = Requester.policy,
             retry_of: float | None = None) -> str:
    """A DNS-1123 name (<= 63 chars) for ``trigger``'s job of the model: one per time window (the
    one containing ``at``) for the policy and Alertmanager, one per second for manual requests,
    and one per ended job for a policy retry after new labels (``retry_of``: when it ended)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")[:28] or "model"
    digest = hashlib.sha1(model.encode()).hexdigest()[:6]  # "Churn" and "churn" differ
    mark = _TRIGGER_MARKS[trigger]
    if retry_of is not None:
        mark, stamp = "r", time.strftime("%Y%m%d%H%M%S", time.gmtime(retry_of))
    elif trigger is Requester.manual:
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(at))
    else:
        stamp = time.strftime("%Y%m%d%H%M", time.gmtime(int(at // window_s) * window_s))
    return f"retrain-{slug}-{digest}-{mark}{stamp}"


Answered = Literal[JobStatus.running, JobStatus.failed, JobStatus.skipped]
"""What a request for a job came to (a :class:`JobOutcome`'s status)."""


class _JobAnswerKeys(TypedDict):
    job: str
    status: Answered
    detail: str


class JobAnswer(_JobAnswerKeys, total=False):
    """A :class:`JobOutcome` as the routes answer it (``POST /retrain``, and within an
    Alertmanager notification's and a firing's answer)."""

    refused: Refusal
    """Only where a ``skipped`` request was refused."""


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: Answered
    """``running`` (started), ``failed`` (could not start: the trigger failed) or ``skipped``
    (not allowed now: ``refused`` says why)."""
    detail: str = ""
    refused: Refusal | None = None
    """Why a ``skipped`` request was refused."""

    def as_dict(self) -> JobAnswer:
        out: JobAnswer = {"job": self.job_id, "status": self.status, "detail": self.detail}
        if self.refused is not None:
            out["refused"] = self.refused
        return out


class JobManager:
    """Starts jobs through a trigger, polls them, and keeps the store and the metrics current."""

    def __init__(self, store: EventStore, trigger: Trigger, metrics: MonitorMetrics, *,
                 command: str, commands: dict[str, str] | None = None,
                 window_s: float = 3600.0, timeout_s: float = 21600.0,
                 max_active: int = 2, env: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.max_active = max_active
        self.env = dict(env or {})
        self.trigger = trigger
        self.metrics = metrics
        self.command = command
        self.commands = dict(commands or {})  # per model, instead of ``command``
        self.window_s = window_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._lock = threading.Lock()

    def request(self, model: str, *, trigger: Requester, reason: str, version: int | None = None,
                retry_of: float | None = None) -> JobOutcome:
        now = self.clock()
        job_id = job_name(model, now, self.window_s, trigger, retry_of)
        windowed = trigger is not Requester.manual  # a manual request is never a duplicate: it asks anew
        with self._lock:
            record = JobRecord(id=job_id, model=model, trigger=trigger, kind=self.trigger.kind,
                               reason=reason, status=JobStatus.started, created_at=now, ended_at=None,
                               handle="", detail="")
            same = self._stored(model, job_id) if windowed else None
            if same is not None:
                return self._duplicate(model, trigger, same)
            active = self.store.jobs(active_only=True, limit=self.max_active)
            if len(active) >= self.max_active:
                return self._skipped(model, trigger, job_id, (
                    f"{len(active)} retraining jobs are running ({', '.join(j.model for j in active)})"
                    f"; at most {self.max_active} at once (MODELLOOP_MONITOR_MAX_ACTIVE_JOBS)"),
                    Refusal.at_capacity)
            why_not = self.store.try_start_job(record)
            if why_not:
                same = self._stored(model, job_id) if windowed else None
                if same is not None:  # another replica started it just now
                    return self._duplicate(model, trigger, same)
                return self._skipped(model, trigger, job_id, why_not, Refusal.model_busy)
            req = JobRequest(job_id=job_id, model=model, version=version, trigger=trigger,
                             reason=reason, env=self.env)
            try:
                template = self.commands.get(model, self.command)
                req = replace(req, command=render_command(template, req))
                handle = self.trigger.start(req)
            except TriggerConflict as exc:  # started by a replica that does not share our store
                self.store.update_job(job_id, JobStatus.skipped, detail=str(exc), ended_at=now)
                return self._skipped(model, trigger, job_id, str(exc), Refusal.duplicate)
            except (TriggerError, OSError) as exc:
                log.error("retraining job %s for %s failed to start: %s", job_id, model, exc)
                self.store.update_job(job_id, JobStatus.failed, detail=str(exc), ended_at=now)
                self.metrics.retrain_jobs.labels(model, trigger, JobStatus.failed).inc()
                self.metrics.retrain_last.labels(model, JobStatus.failed).set(now)
                return JobOutcome(job_id, JobStatus.failed, str(exc))
            self.store.update_job(job_id, JobStatus.running, handle=handle)
        self.metrics.retrain_jobs.labels(model, trigger, JobStatus.started).inc()
        self.metrics.retrain_active.labels(model).set(1)
        log.warning("retraining job %s started for %s (%s): %s", job_id, model, trigger, reason)
        return JobOutcome(job_id, JobStatus.running, f"{self.trigger.kind} job {handle}")

    def _stored(self, model: str, job_id: str) -> JobRecord | None:
        """The stored job of ``model`` named ``job_id``, if any (looked up by its key)."""
        return next(iter(self.store.jobs(model, job_id=job_id, limit=1)), None)

    def _duplicate(self, model: str, trigger: Requester, same: JobRecord) -> JobOutcome:
        why = (f"job {same.id} is already {same.status} for this window" if same.active
               else f"job {same.id} already ran for this window ({same.status})")
        return self._skipped(model, trigger, same.id, why, Refusal.duplicate)

    def _skipped(self, model: str, trigger: Requester, job_id: str, why: str,
                 refused: Refusal) -> JobOutcome:
        log.info("retraining of %s not started: %s", model, why)
        self.metrics.retrain_jobs.labels(model, trigger, JobStatus.skipped).inc()
        self.metrics.retrain_refused.labels(trigger, refused).inc()
        return JobOutcome(job_id, JobStatus.skipped, why, refused)

    def poll(self, models: list[str] | None = None) -> list[tuple[JobRecord, RunState]]:
        """Check every active job of this trigger kind; record the ones that ended and return
        them with their status."""
        now = self.clock()
        active_models = set()
        ended: list[tuple[JobRecord, RunState]] = []
        for job in self.store.jobs(active_only=True, limit=1000):
            if job.kind != self.trigger.kind or not job.handle:
                active_models.add(job.model)
                continue
            try:
                status = self.trigger.poll(job.handle)
            except Exception as exc:  # an API hiccup: try again next poll, keep the job active
                log.warning("cannot poll job %s: %s", job.id, exc)
                active_models.add(job.model)
                continue
            detail = None
            if status is JobStatus.running and now - job.created_at > self.timeout_s:
                self.trigger.cancel(job.handle)
                status, detail = JobStatus.failed, f"stopped after the {self.timeout_s:g} s timeout"
            if status is JobStatus.running:
                active_models.add(job.model)
                continue
            self.store.update_job(job.id, status, detail=detail, ended_at=now)
            ended.append((job, status))
            self.metrics.retrain_jobs.labels(job.model, job.trigger, status).inc()
            self.metrics.retrain_last.labels(job.model, status).set(now)
            log.warning("retraining job %s for %s %s", job.id, job.model, status)
        for model in set(models or []) | active_models:
            self.metrics.retrain_active.labels(model).set(1 if model in active_models else 0)
        return ended

    def last_started(self, model: str, trigger: Requester) -> float | None:
        """When the newest job of ``model`` requested by ``trigger`` was created. Every stored job
        was started, failed to start, or was found started elsewhere: each starts the cooldown
        of the rule that asked for it (refused requests store nothing)."""
        for job in self.store.jobs(model, limit=50):
            if job.trigger == trigger:
                return job.created_at
        return None


def job_env(settings: MonitorSettings) -> dict[str, str]:
    """What every job is told of the sidecar that starts it: its URL and admin key."""
    env = {SIDECAR_URL_ENV: settings.self_url}
    if settings.api_key is not None:
        env[SIDECAR_KEY_ENV] = settings.api_key.get_secret_value()
    return env


def build_trigger(settings: MonitorSettings) -> Trigger:
    """The trigger named by ``settings.trigger``."""
    if settings.trigger == "local":
        return LocalProcessTrigger(settings.jobs_dir)
    if settings.trigger == "webhook":
        if not settings.webhook_url:
            raise ValueError("MODELLOOP_MONITOR_WEBHOOK_URL is required when trigger is webhook")
        return WebhookTrigger(settings.webhook_url, settings.webhook_timeout_s)
    if settings.trigger == "kubernetes":
        from monitoring.triggers_cluster import KubernetesJobTrigger

        return KubernetesJobTrigger(
            namespace=settings.k8s_namespace, image=settings.job_image,
            service_account=settings.k8s_service_account, claim=settings.k8s_registry_claim,
            ttl_s=settings.k8s_ttl_s, deadline_s=settings.job_timeout_s,
            api_url=settings.k8s_api_url, key_secret=settings.k8s_key_secret)
    if settings.trigger == "docker":
        from monitoring.triggers_cluster import DockerTrigger

        return DockerTrigger(image=settings.job_image, base_url=settings.docker_url,
                             volume=settings.docker_volume)
    return NoTrigger()
