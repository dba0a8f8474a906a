"""The sidecar's lifecycle and its two kinds of work: taking input (events, feedback, retraining
requests) and the periodic check (drift, quality, latency, errors, resources, then the policy).

``start()`` validates the policy and opens the store before anything is served (a bad policy
stops start-up); ``stop()`` stops the loops, commits every queued event batch and closes the
store. The check itself is :mod:`monitoring.evaluate`.

Example::

    sidecar = Sidecar(MonitorSettings())
    sidecar.start()
    ...
    sidecar.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple, TypedDict

from prometheus_client import CollectorRegistry

from modelloop.http import ApiError
from modelloop.registry import Registry, RegistryError
from modelloop.schemas import ALIAS_CHALLENGER, ALIAS_PRODUCTION, Feedback
from monitoring import alertmanager
from monitoring.evaluate import Evaluator, ModelStatus, ResourceStatus
from monitoring.ingest import (
    GroupCommitWriter,
    InputError,
    ModelCatalog,
    ParsedEvents,
    TimeBounds,
    parse_events,
    parse_feedback,
    resolve_label,
)
from monitoring.jobs import (
    JobAnswer,
    JobManager,
    JobOutcome,
    Refusal,
    build_trigger,
    job_env,
)
from monitoring.metrics import MonitorMetrics
from monitoring.policy import Firing, Policy, PolicyEngine, load_policy
from monitoring.records import JobRecord, JobStatus, Requester, Stored
from monitoring.sampling import SampleBook
from monitoring.settings import MonitorSettings
from monitoring.store import EventStore, open_store, redact_url
from monitoring.triggers import RunState

log = logging.getLogger(__name__)


class FeedbackResult(TypedDict):
    """What ``POST /feedback`` answers (described by :class:`monitoring.openapi.FeedbackResult`):
    how many labels were joined, and the ids that were not, by why."""

    joined: int
    unknown: list[str]
    """No event (yet)."""
    duplicate: list[str]
    """Labelled already (or twice in this request)."""
    ambiguous: list[str]
    """Two different predictions came with the id: no label is joined to it."""
    not_sampled: list[str]
    """No event because serving's event sample left the request out."""


class AlertJob(JobAnswer):
    """What an alert's request for a job came to."""

    fingerprint: str


class IgnoredAlert(TypedDict):
    fingerprint: str
    why: str


class AlertsResult(TypedDict):
    """What ``POST /alertmanager`` answers (:class:`monitoring.openapi.AlertsResult`): what each
    alert of the notification led to."""

    started: list[AlertJob]
    duplicate: list[str]
    """Fingerprints acted on before, or whose model another alert of the body asked for."""
    skipped: list[AlertJob]
    ignored: list[IgnoredAlert]


class _FiringKeys(TypedDict):
    rule: str
    scope: str
    value: float
    samples: int
    at: float
    action: str
    message: str


class FiringEntry(_FiringKeys, total=False):
    """A rule that fired, in ``/status``'s ``recent_firings``."""

    job: JobAnswer
    """What its retraining request came to (a ``retrain`` rule's firing only)."""


class PolicyStatus(TypedDict):
    file: str
    """Where the policy was read from."""
    rules: list[dict[str, Any]]
    """Each rule and scope's state (:meth:`PolicyEngine.summary`)."""


class WindowSizes(TypedDict):
    events: int
    seconds: float
    min_drift_rows: int


class SidecarStatus(TypedDict):
    """What ``GET /status`` and ``POST /check`` answer (:class:`monitoring.openapi.Status`)."""

    ready: bool
    started_at: float | None
    store: str
    """The store's DSN, its password redacted."""
    policy: PolicyStatus
    trigger: str
    windows: WindowSizes
    drift_engine_ready: bool
    models: dict[str, ModelStatus]
    resources: ResourceStatus
    jobs: list[JobRecord]
    """The newest 20."""
    recent_firings: list[FiringEntry]
    """The newest 20."""


class NotRetrainable(NamedTuple):
    """Why a model cannot be retrained at all: found before a job is asked for."""

    reason: Refusal
    """``not_watched`` or ``unknown_model``."""
    detail: str


class Sidecar:
    """One monitoring sidecar: store, policy, metrics, jobs and the background loops."""

    def __init__(self, settings: MonitorSettings, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.prometheus = registry if registry is not None else CollectorRegistry()
        self.metrics = MonitorMetrics(self.prometheus)
        self.clock = clock
        self.ready = False
        self.started_at: float | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.recent_firings: deque[FiringEntry] = deque(maxlen=100)
        # set by start()
        self.policy: Policy
        self.engine: PolicyEngine
        self.store: EventStore
        self.catalog: ModelCatalog
        self.writer: GroupCommitWriter
        self.jobs: JobManager
        self.evaluator: Evaluator
        self.samples: SampleBook

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, background: bool = True) -> None:
        """Validate, open and (with ``background``) start the check and job loops."""
        s = self.settings
        self.policy = load_policy(s.policy_file)
        self.engine = PolicyEngine(self.policy)
        self.store = open_store(s.store_dsn, s.store_table_prefix, s.sqlite_synchronous)
        self.samples = SampleBook(self.metrics, s.retention_max_age_s, self.store)
        self.catalog = ModelCatalog(Registry(s.registry_dir), s.models)
        self.writer = GroupCommitWriter(self.store, self.parse_events, on_stored=self.stored_events)
        self.jobs = JobManager(self.store, build_trigger(s), self.metrics,
                               command=s.retrain_command, commands=s.retrain_commands,
                               window_s=s.job_window_s,
                               timeout_s=s.job_timeout_s, max_active=s.max_active_jobs,
                               env=job_env(s), clock=self.clock)
        self.evaluator = Evaluator(s, self.store, self.catalog, self.engine, self.metrics,
                                   on_fire=self._fired, clock=self.clock)
        self.metrics.initialise(self.catalog.watched_models(), [r.name for r in self.policy.rules])
        for rule in self.policy.rules:
            if rule.action == "retrain":
                for model in self.catalog.watched_models():
                    last = self.jobs.last_started(model, Requester.policy)
                    if last is not None:  # keep the cooldown across a restart
                        self.engine.restore(rule.name, model, last)
        self.started_at = self.clock()
        if background:
            self._spawn("drift-warmup", self.evaluator.warm_up, loop=False)
            self._spawn("checks", self._check_loop)
            self._spawn("jobs", self._jobs_loop)
        self.ready = True
        log.info("sidecar ready: store %s, policy %s (%d rules), trigger %s, models %s",
                 redact_url(s.store_dsn), self.policy.source, len(self.policy.rules),
                 s.trigger, ", ".join(s.models) or "all registered")

    def _spawn(self, name: str, target: Callable[[], None], loop: bool = True) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        if loop:
            self._threads.append(thread)

    def stop(self) -> None:
        """Graceful shutdown: stop the loops, flush queued events, close the store."""
        if not self.ready:
            return
        self.ready = False
        self._stop.set()
        timeout = self.settings.shutdown_timeout_s
        for thread in self._threads:
            thread.join(timeout)
        self.writer.close(timeout)
        self.evaluator.close(timeout)
        self.store.close()
        log.info("sidecar stopped; every acknowledged event is committed")

    def _check_loop(self) -> None:
        next_retention = 0.0
        while not self._stop.is_set():
            try:
                self.evaluator.check(claim=True)  # one replica per window (monitoring/evaluate.py)
                if self.clock() >= next_retention:
                    self.evaluator.retention(stopping=self._stop.is_set)
                    next_retention = self.clock() + self.settings.retention_interval_s
            except Exception:
                log.exception("periodic check failed; retrying at the next interval")
            self._stop.wait(self.settings.check_interval_s)

    def _jobs_loop(self) -> None:
        while not self._stop.wait(self.settings.job_poll_s):
            try:
                for job, status in self.jobs.poll(self.settings.models or self.evaluator.models()):
                    self._job_ended(job, status)
            except Exception:
                log.exception("polling retraining jobs failed")

    # -- input ----------------------------------------------------------------------------------
    @property
    def time_bounds(self) -> TimeBounds:
        return TimeBounds(self.settings.retention_max_age_s, self.settings.max_clock_skew_s)

    def parse_events(self, body: bytes) -> ParsedEvents:
        """A ``POST /events`` body as rows to store (the writer thread calls it)."""
        return parse_events(body, self.catalog, self.clock(), self.time_bounds)

    def stored_events(self, parsed: ParsedEvents, stored: Stored) -> None:
        """Tell the sample book what a committed batch says of serving's sample (the writer
        thread, after the commit and before the sender is answered), so that
        ``modelloop_events_seen_total`` counts each prediction once:

        * A try whose commit failed tells nothing: nothing of it was stored (503), and serving
          sends it again.
        * A batch sent again (its acknowledgement was lost) stores no new rows: what its groups
          stand for was counted when it was first stored, so a model's ``seen`` is counted only
          when some of its rows in the batch are new. The store decides, so a re-send that
          reaches another replica sharing the store is not counted there either. Serving's
          batches are never partly new: it sends the same batch again, at most less its oldest
          rows (dropped meanwhile from a full buffer or for their age), and a batch is committed
          whole. A model whose every row was refused as ambiguous (its ids hold other
          predictions) is not counted; its events are not stored either.
        * Every group has rows (a request of one row at least: the schema takes no other), so no
          ``seen`` comes without rows that tell a first send from a re-send: serving keeps the
          count of rows its sample left out, when it sends none, for the model's next group.
        * Shadow groups say nothing (:func:`~monitoring.ingest.parse_columns`): a challenger's
          answers are to requests the champion's groups count, and ``stored.new`` leaves them
          out too.
        * The share is noted for re-sends too: the book keeps the largest per hour, so a share
          noted twice counts once, and a sidecar restarted between a commit and its
          acknowledgement learns it back.
        """
        now = self.clock()
        for group in parsed.sampled:
            seen = group.seen if stored.new.get(group.model) else 0
            self.samples.note(group.model, seen, group.share, now)

    def parse_feedback(self, body: bytes) -> tuple[list[Feedback], bool]:
        """A ``POST /feedback`` body, its timestamps within :attr:`time_bounds`."""
        return parse_feedback(body, self.clock(), self.time_bounds)

    def refused(self, exc: ApiError) -> None:
        """Count an ``/events`` or ``/feedback`` body refused with ``exc`` (the app tells every
        one, once): a 4xx refuses what the body carried, so its events or labels are counted
        under its code; a 5xx refuses the moment, not the body (the sender tries again, and
        ``ingest_busy`` or ``errors`` count it)."""
        if exc.status < 500:
            self._rejected(exc.code, exc.rejected if isinstance(exc, InputError) else 1)

    def _rejected(self, reason: str, count: int) -> None:
        """The one writer of ``modelloop_events_rejected_total``."""
        self.metrics.events_rejected.labels(reason).inc(count)

    def submit_events(self, body: bytes) -> Future[tuple[int, Stored]]:
        """Queue a ``POST /events`` body: validated and committed by the writer thread; the
        future resolves once the events are durable (see :meth:`GroupCommitWriter.submit`)."""
        return self.writer.submit(body)

    def ingested(self, stored: Stored) -> None:
        for model, n in stored.new.items():
            self.metrics.events_ingested.labels(model).inc(n)
        if stored.conflicts:  # stored, but these events are not: their ids hold another prediction
            self._rejected("ambiguous_id", stored.conflicts)

    def feedback(self, items: list[Feedback], single: bool = False) -> FeedbackResult:
        """Join labels to their events; unknown, already-labelled and ambiguous ids (two
        different predictions came with them) are reported back, not joined."""
        targets = self.store.label_targets([f.request_id for f in items])
        now = self.clock()
        errors: list[str] = []
        plan: list[tuple[str, float, float, str]] = []
        unknown: list[str] = []
        left_out, left_label = self.samples.left_out([f.request_id for f in items if f.request_id not in targets], now)
        not_sampled: list[str] = []
        duplicate: list[str] = []
        ambiguous: list[str] = []
        seen: set[str] = set()
        for i, fb in enumerate(items):
            rid = fb.request_id
            target = targets.get(rid)
            if target is None:
                (not_sampled if rid in left_out else unknown).append(rid)
                self.metrics.feedback.labels(*((left_label, "not_sampled") if rid in left_out
                                               else ("unknown", "unknown"))).inc()
                continue
            if target.ambiguous:
                ambiguous.append(rid)
                self.metrics.feedback.labels(target.model, "ambiguous").inc()
                continue
            if target.labelled or rid in seen:
                duplicate.append(rid)
                self.metrics.feedback.labels(target.model, "duplicate").inc()
                continue
            seen.add(rid)
            where = "label" if single else f"feedback[{i}].label"
            try:
                value = resolve_label(fb.label, self.catalog.metadata(target.model, target.version))
            except RegistryError as exc:
                value = str(exc)
            if isinstance(value, str):
                errors.append(f"{where}: {value}")
                continue
            plan.append((rid, value, fb.timestamp if fb.timestamp is not None else now,
                         target.model))
        if errors:
            raise InputError(422, "invalid_label", errors, len(items))
        joined = set(self.store.set_labels([(rid, v, ts) for rid, v, ts, _ in plan]))
        for rid, _, _, model in plan:
            if rid in joined:
                self.metrics.feedback.labels(model, "joined").inc()
            else:  # labelled by a concurrent request in between
                duplicate.append(rid)
                self.metrics.feedback.labels(model, "duplicate").inc()
        return {"joined": len(joined), "unknown": unknown, "duplicate": duplicate,
                "ambiguous": ambiguous, "not_sampled": not_sampled}

    def not_retrainable(self, model: str, trigger: Requester) -> NotRetrainable | None:
        """Why ``model`` cannot be retrained at all, counted; None for a watched, registered
        model. Checked before a job is asked for, so no name from a request reaches the
        registry's paths or a metric label."""
        registry = self.catalog.registry
        if not self.catalog.watched(model):
            found = NotRetrainable(Refusal.not_watched, f"{model!r} is not watched by this "
                                   f"sidecar (watching: {', '.join(self.catalog.models)})")
        elif model not in registry.models():
            found = NotRetrainable(Refusal.unknown_model,
                                   f"{model!r} is not registered under {registry.root}")
        else:
            return None
        self.metrics.retrain_refused.labels(trigger, found.reason).inc()
        return found

    def retrain(self, model: str, reason: str) -> JobOutcome:
        """A manual retraining request (``POST /retrain``)."""
        refused = self.not_retrainable(model, Requester.manual)
        if refused is not None:
            raise InputError(422, refused.reason, [f"model: {refused.detail}"])
        registry = self.catalog.registry
        try:
            version = registry.resolve(model)
        except RegistryError:
            version = None  # registered, nothing promoted yet: the job picks its base
        return self.jobs.request(model, trigger=Requester.manual, reason=reason or "manual request",
                                 version=version)

    def alertmanager(self, body: bytes) -> AlertsResult:
        """An Alertmanager notification: at most ``max_alerts_per_body`` alerts, remembered in
        one transaction, at most one job requested per model, one log line."""
        payload = alertmanager.parse_payload(body, self.settings.max_alerts_per_body)
        out: AlertsResult = {"started": [], "duplicate": [], "skipped": [], "ignored": []}
        acting: list[tuple[alertmanager.Alert, str]] = []
        for action in alertmanager.plan(payload):
            alert = action.alert
            refused = None if action.model is None else self.not_retrainable(action.model,
                                                                              Requester.alertmanager)
            if action.model is None or refused is not None:
                why = action.note if refused is None else f"model {refused.detail}"
                out["ignored"].append({"fingerprint": alert.fingerprint, "why": why})
            else:
                acting.append((alert, action.model))
        first = self.store.first_seen_alerts([(a.fingerprint, a.starts_at) for a, _ in acting],
                                             self.clock())
        requested: set[str] = set()
        for (alert, model), new in zip(acting, first, strict=True):
            if not new or model in requested:  # acted on before, or by an alert of this body
                out["duplicate"].append(alert.fingerprint)
                continue
            requested.add(model)
            outcome = self.jobs.request(model, trigger=Requester.alertmanager,
                                        reason=alertmanager.alert_reason(alert))
            answer: AlertJob = {"fingerprint": alert.fingerprint, **outcome.as_dict()}
            out["started" if outcome.status is JobStatus.running else "skipped"].append(answer)
        log.info("Alertmanager notification of %d alerts: %d started, %d duplicate, %d skipped, "
                 "%d ignored", len(payload.alerts), len(out["started"]), len(out["duplicate"]),
                 len(out["skipped"]), len(out["ignored"]))
        return out

    def _fired(self, firing: Firing, version: int | None) -> None:
        self.metrics.threshold_breaches.labels(firing.rule.name).inc()
        entry: FiringEntry = {"rule": firing.rule.name, "scope": firing.scope,
                                 "value": firing.value, "samples": firing.samples,
                                 "at": firing.at, "action": firing.rule.action,
                                 "message": firing.message()}
        log.warning("%s", firing.message())
        if firing.rule.action == "retrain":
            outcome = self._policy_retrain(firing.scope, firing.message(), version,
                                           firing.retry_of)
            if outcome.status is JobStatus.skipped and not self._policy_job_runs(firing.scope, outcome):
                self.engine.refused(firing, outcome.detail)  # no cooldown: asked again next check
            entry["job"] = outcome.as_dict()
        self.recent_firings.append(entry)

    def _policy_job_runs(self, model: str, outcome: JobOutcome) -> bool:
        """Whether a policy retrain was refused for a policy job of ``model``: this window's
        (``duplicate``: another rule or replica asked first) or one still running from an earlier
        window (a long retraining, or another replica's: ``model_busy``, or ``at_capacity`` when
        the cap is reached too, since the cap is checked first). The firing's cooldown
        then holds, as if it had started that job: asked again at each check, the rule would
        start a second job as soon as the first ended, without the labels that could make a new
        challenger win, or while the first one's challenger is judged on live traffic."""
        if outcome.refused is Refusal.duplicate:
            return True
        return outcome.refused in (Refusal.model_busy, Refusal.at_capacity) and any(
            job.trigger == Requester.policy for job in self.store.jobs(model, active_only=True, limit=1))

    def _policy_retrain(self, model: str, reason: str, version: int | None,
                        retry_of: float | None = None) -> JobOutcome:
        refused = self.not_retrainable(model, Requester.policy)
        if refused is not None:
            return JobOutcome("", JobStatus.skipped, refused.detail, refused.reason)
        return self.jobs.request(model, trigger=Requester.policy, reason=reason, version=version,
                                 retry_of=retry_of)

    def _job_ended(self, job: JobRecord, status: RunState) -> None:
        """A policy job that ended without a new production version (its challenger lost, or it
        failed) lets its rules try again after ``RETRAIN_RETRY_LABELS`` new labels instead of
        waiting out their cooldown: new labels are what could make the next challenger win."""
        if job.trigger is not Requester.policy:
            return
        try:
            production = self.catalog.registry.get(job.model, ALIAS_PRODUCTION).metadata
        except RegistryError:
            production = None
        if (status is JobStatus.succeeded and production is not None
                and production.created_at.timestamp() >= job.created_at):
            return  # promoted: the cooldown holds
        if status is JobStatus.succeeded and self._named_challenger(job):
            return  # its winner is judged on live labels (monitoring/live_gate.py): the cooldown holds
        labels = self.settings.retrain_retry_labels
        self.engine.retry_on_labels(job.model, self.clock(), labels)
        log.info("retraining job %s of %s %s without a new production version: its rules may "
                 "fire again after %d new labels", job.id, job.model, status, labels)

    def _named_challenger(self, job: JobRecord) -> bool:
        """Whether ``job`` named a new ``challenger`` (``retrain --live-gate``)."""
        registry = self.catalog.registry
        version = registry.aliases(job.model).get(ALIAS_CHALLENGER)
        try:
            return version is not None and \
                registry.get(job.model, version).metadata.created_at.timestamp() >= job.created_at
        except RegistryError:
            return False

    # -- status -------------------------------------------------------------------------------
    def status(self) -> SidecarStatus:
        s = self.settings
        return {
            "ready": self.ready,
            "started_at": self.started_at,
            "store": redact_url(s.store_dsn),
            "policy": {"file": self.policy.source, "rules": self.engine.summary()},
            "trigger": s.trigger,
            "windows": {"events": s.window_events, "seconds": s.window_seconds,
                        "min_drift_rows": s.min_window_rows},
            "drift_engine_ready": self.evaluator.warm,
            "models": self.evaluator.status(),
            "resources": self.evaluator.resource_status(),
            "jobs": self.store.jobs(limit=20),  # dataclasses, written as objects of their fields
            "recent_firings": list(self.recent_firings)[-20:],
        }
