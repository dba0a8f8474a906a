"""Settings of the monitoring sidecar (env prefix ``MODELLOOP_MONITOR_``).

Built once in the entry point (``modelloop monitor``) and passed down; nothing else reads the
environment. Example::

    MODELLOOP_MONITOR_PORT=8001 MODELLOOP_MONITOR_MODELS=churn modelloop monitor
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode, SettingsConfigDict

from modelloop.settings import HomeSettings
from monitoring.records import Requester
from monitoring.triggers import JobRequest, TriggerError, render_command

DriftMethod = Literal["calibrated", "auto", "ks", "psi", "wasserstein", "jensenshannon",
                      "chisquare"]
TriggerKind = Literal["local", "kubernetes", "docker", "webhook", "none"]

_PREFIX = re.compile(r"^[a-z][a-z0-9_]{0,30}$")


def _check_template(template: str) -> None:
    """A retraining command template renders as a job's would (:func:`render_command`): it
    splits like a shell line and names only known fields."""
    sample = JobRequest(job_id="x", model="x", version=None, trigger=Requester.manual,
                        reason="x")
    try:
        args = render_command(template, sample)
    except TriggerError as exc:
        cause = exc.__cause__
        raise ValueError(f"bad command template {template!r}: {type(cause).__name__}: {cause} "
                         f"(fields: {', '.join('{' + k + '}' for k in sample.fields())})") from exc
    if not args:
        raise ValueError("the command is empty")


def default_policy_file() -> Path:
    """The policy shipped with the package (``monitoring/assets/policy.yaml``)."""
    return Path(str(resources.files("monitoring") / "assets" / "policy.yaml"))


class MonitorSettings(HomeSettings):
    """Everything the sidecar process can be told, one field per ``MODELLOOP_MONITOR_*`` var."""

    model_config = SettingsConfigDict(
        env_prefix="MODELLOOP_MONITOR_", extra="ignore", populate_by_name=True
    )

    # -- process ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Interface to listen on (``0.0.0.0`` in a container)."""
    port: int = Field(default=8001, ge=0, le=65535)
    """TCP port of the sidecar's HTTP API (0 lets the OS choose)."""
    max_body_bytes: PositiveInt = 32 * 1024 * 1024
    """Largest request body accepted by ``/events`` and ``/retrain`` (413 beyond)."""
    max_feedback_body_bytes: PositiveInt = 4 * 1024 * 1024
    """Largest ``/feedback`` body (413 beyond): 10,000 labels of the longest request ids fit."""
    max_alertmanager_body_bytes: PositiveInt = 1024 * 1024
    """Largest ``/alertmanager`` body (413 beyond)."""
    max_alerts_per_body: PositiveInt = 1000
    """Most alerts in one Alertmanager notification (422 beyond); Alertmanager's
    ``webhook_config`` ``max_alerts`` keeps its notifications under it."""
    max_header_bytes: PositiveInt = 16 * 1024
    """Largest request line and headers of a request (a 400 and the connection closed beyond)."""
    shutdown_timeout_s: PositiveFloat = 20.0
    """How long a graceful shutdown waits for in-flight writes and checks."""
    ingest_queue_bytes: PositiveInt = 64 * 1024 * 1024
    """Bytes of ``/events`` bodies held at once (read, queued or being written); a body that
    would pass it is answered 503 with ``Retry-After``, and serving retries it. Bounds the
    sidecar's memory under bursts."""
    feedback_queue_bytes: PositiveInt = 16 * 1024 * 1024
    """Bytes of ``/feedback`` bodies held at once, a budget of their own (503 with
    ``Retry-After`` beyond): label providers cannot hold the budget of serving's events."""
    body_read_timeout_s: PositiveFloat = 30.0
    """An ``/events`` or ``/feedback`` body not received whole within this time is answered 408
    and its bytes given back to its budget (a slow sender cannot hold it)."""
    max_clock_skew_s: PositiveFloat = 300.0
    """Event and label timestamps may be at most this far in the future (the sender's clock
    ahead of ours); older than the retention age is refused too (it would be deleted at once)."""

    # -- who may steer (see monitoring/auth.py) -----------------------------------------------
    api_key: SecretStr | None = None
    """The admin key (``Authorization: Bearer <key>``): every route, among them retraining,
    checks, status, reports, jobs and the labelled export. Without it the sidecar is open and
    refuses to listen beyond loopback; a sidecar with a role key below needs it too, and each
    role its own key (checked when the sidecar starts: a client sends the one key it has)."""
    ingest_key: SecretStr | None = None
    """Key for ``POST /events`` only; serving sends it as ``MODELLOOP_SERVING_SIDECAR_KEY``."""
    feedback_key: SecretStr | None = None
    """Key for ``POST /feedback`` only: a label provider can neither retrain nor read features."""
    alertmanager_key: SecretStr | None = None
    """Key for ``POST /alertmanager`` only (Alertmanager's ``http_config.authorization``)."""
    allow_unauthenticated: bool = False
    """Listen beyond loopback without an admin key (only behind a gateway that authenticates)."""
    retrain_retry_labels: PositiveInt = 1000
    """A policy retraining job that ends without a new production version (the challenger lost,
    or the job failed) lets the rule that fired it fire again once this many new labels of the
    model arrived, instead of waiting out its cooldown."""
    live_gate_min_rows: PositiveInt = 200
    """Labelled requests both the champion and a shadowing challenger answered before the live
    gate first judges them (monitoring/live_gate.py); it looks again at 2x, 4x, ..."""
    live_gate_alpha: float = Field(default=0.05, gt=0, lt=1)
    """The live gate's false-decision rate over all its looks: the chance that it promotes a
    challenger no better than the champion (or retires one no worse)."""
    live_gate_max_age_s: PositiveFloat = 7 * 24 * 3600.0
    """A challenger still undecided this long after it was named is retired."""
    max_active_jobs: PositiveInt = 2
    """Retraining jobs running at once over all models (at most one per model besides);
    requests beyond it are refused (429 to ``POST /retrain``) and counted."""

    # -- store -----------------------------------------------------------------------------
    store_url: str | None = None
    """``sqlite:///path/events.db`` or ``postgresql://user@host:5432/db``; default a SQLite
    file at ``$MODELLOOP_HOME/monitor/events.db``."""
    store_table_prefix: str = "modelloop_"
    """Prefix of the store's tables, so several sidecars or test runs can share a database."""
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "FULL"
    """SQLite ``synchronous`` pragma. Both survive a killed process; FULL also survives power
    loss (an fsync per committed batch)."""
    retention_max_age_s: PositiveFloat = 7 * 24 * 3600.0
    """Events older than this (by prediction time) are deleted."""
    retention_max_events: PositiveInt = 2_000_000
    """At most this many events are kept (the oldest are deleted first)."""
    retention_max_bytes: PositiveInt = 2 * 1024**3
    """The events kept take at most this many bytes (the oldest are deleted first): SQLite's
    pages in use, which its file shrinks to; PostgreSQL's estimated table and index size."""
    retention_interval_s: PositiveFloat = 600.0
    """How often retention runs."""
    retention_max_alerts: PositiveInt = 10_000
    """Alertmanager alerts remembered (to act on each firing once) at most; the ones not seen
    for ``retention_max_age_s`` are forgotten too."""
    retention_every_events: PositiveInt = 500_000
    """Retention also runs as soon as this many new events were stored since its last run, so a
    full ingest cannot pile up between runs (the bounds are passed by at most about this many)."""

    # -- what to watch ---------------------------------------------------------------------
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Model names to watch, comma separated; empty means every model in the registry.
    Events for other models are rejected."""
    window_events: PositiveInt = 5000
    """The count window: the last N events of a model version (drift and accuracy)."""
    window_seconds: PositiveFloat = 3600.0
    """The time window: events of the last N seconds (accuracy by time, latency, errors)."""
    time_window_rows: PositiveInt = 100_000
    """Of the time window, a check reads at most the newest N events for the latency quantiles
    and the newest N labelled events of each version for accuracy by time, so what a check
    costs does not grow with the traffic (an hour at 10k requests/s is 36M events)."""
    check_interval_s: PositiveFloat = 60.0
    """How often drift, accuracy, latency, resources and the policy are evaluated."""

    # -- drift -----------------------------------------------------------------------------
    drift_method: DriftMethod = "calibrated"
    """Per-feature test. ``calibrated``: Evidently's two-sample Kolmogorov-Smirnov test on every
    feature and the prediction, thresholds derived from ``drift_false_alarm_rate`` (Bonferroni
    over the features), so a stationary window raises the dataset flag with at most that
    probability whatever its size. Or Evidently's fixed thresholds: ``auto`` (its default test by
    column type and size), ``ks``, ``psi``, ``wasserstein``, ``jensenshannon``, ``chisquare``."""
    drift_false_alarm_rate: float = Field(default=0.01, gt=0, lt=1)
    """With ``calibrated``: the probability that a window of unchanged data is judged drifted
    (the dataset flag), per window and model; each feature's is this over the number of
    features. The joint-distribution check (pairs of features) runs at this rate too, whatever
    the method, and is reported and flagged apart (``multivariate_drift``)."""
    drift_threshold: float | None = None
    """Threshold of the per-feature test with the fixed methods; empty means that test's
    Evidently default. Not used by ``calibrated`` (its thresholds come from the rate)."""
    drift_share: float = Field(default=0.5, gt=0, le=1)
    """With the fixed methods: share of drifted features at which the dataset counts as drifted
    (Evidently's ``drift_share``). ``calibrated`` counts any drifted feature."""
    min_window_rows: PositiveInt = 500
    """Fewer rows than this in the window: drift is not judged."""
    report_max_rows: PositiveInt = 20_000
    """Rows of the window (and of the reference) sampled into the HTML report."""
    report_interval_s: NonNegativeFloat = 600.0
    """A new HTML report at most this often per model, and at once when the set of drifted
    features changes (rendering Evidently's report takes seconds)."""
    reports_keep: PositiveInt = 10
    """HTML drift reports kept per model (the newest)."""
    report_nice: int = Field(default=10, ge=0, le=19)
    """Niceness of the report's thread and of the importance process: both render behind
    ingest and the checks (0: an equal share of the CPU; the test suite, whose second process
    keeps both cores busy, would otherwise starve them)."""
    report_importance: bool = True
    """The report sets each feature's drift beside its global importance (mean |SHAP| on the
    reference sample, monitoring/importance.py), computed once per version in a child process at
    nice 10 (about 15 s of CPU and 500 MB while it runs). Off: the report has no importance
    section and no child process is started (many models, little CPU; the test suite)."""
    max_out_of_support_share: float = Field(default=0.05, ge=0, le=1)
    """Above this share of window rows with some feature outside the reference's range, the
    confidence-based accuracy estimate is marked unreliable (and ``estimated_accuracy`` rules do
    not fire on it). Unchanged rows fall outside by chance at about 2 x features / (reference
    rows + 1): measured 1.3% of 1,000-row windows for 20 features and the 2,000-row reference
    training keeps, 3.9% with a 1,000-row reference (raise this for smaller references)."""

    # -- policy and triggers -----------------------------------------------------------------
    policy_file: Path = Field(default_factory=default_policy_file)
    """The threshold policy (YAML), validated at start-up."""
    trigger: TriggerKind = "local"
    """How a retraining job runs: a local process, a Kubernetes Job, a Docker container, a
    webhook call, or ``none`` (alerts only)."""
    retrain_command: str = "modelloop retrain --name {model} --trigger {trigger}"
    """Command of a retraining job; ``{model}``, ``{version}``, ``{job}``, ``{trigger}`` and
    ``{reason}`` are filled in. Runs as a local process, or as the container command."""
    retrain_commands: dict[str, str] = Field(default_factory=dict)
    """Per-model retraining commands, JSON ``{"model": "template"}``, used for those models instead
    of :attr:`retrain_command` by every trigger (policy, Alertmanager, ``POST /retrain``): a
    model modelloop did not train runs its owner's pipeline, which ends in ``modelloop models
    register`` and ``modelloop models gate``. Same placeholders."""
    job_window_s: PositiveFloat = 3600.0
    """Jobs are named per model and time window of this length, so two sidecar replicas
    judging the same window start one job, not two."""
    job_timeout_s: PositiveFloat = 6 * 3600.0
    """A job running longer than this is stopped and counted as failed."""
    job_poll_s: PositiveFloat = 2.0
    """How often the status of running jobs is polled."""
    k8s_namespace: str = "default"
    """Namespace of retraining Jobs."""
    job_image: str = "modelloop:latest"
    """Image of retraining Jobs and containers."""
    k8s_service_account: str | None = None
    """Service account of retraining Jobs (it needs access to the registry volume)."""
    k8s_api_url: str | None = None
    """Kubernetes API server; empty means in-cluster config, else ``~/.kube/config``."""
    k8s_registry_claim: str | None = None
    """PersistentVolumeClaim holding ``$MODELLOOP_HOME``, mounted into retraining Jobs."""
    k8s_key_secret: str | None = None
    """Secret (key ``api-key``) holding the admin key, read by retraining Jobs instead of the key
    being written into each Job's spec (the Helm chart sets it)."""
    public_url: str | None = None
    """This sidecar's URL as its retraining jobs reach it (they fetch labelled data from it);
    empty means ``http://127.0.0.1:<port>``, right for a local job; in a cluster, the Service."""
    k8s_ttl_s: NonNegativeFloat = 24 * 3600.0
    """``ttlSecondsAfterFinished`` of retraining Jobs."""
    docker_url: str | None = None
    """Docker engine URL; empty means the environment (``DOCKER_HOST`` or the local socket)."""
    docker_volume: str | None = None
    """Host path or volume mounted at ``$MODELLOOP_HOME`` in retraining containers."""
    webhook_url: str | None = None
    """URL that a ``webhook`` trigger POSTs the job request to (JSON)."""
    webhook_timeout_s: PositiveFloat = 10.0
    """Timeout of a webhook call."""

    # -- resources, latency and errors --------------------------------------------------------
    target_pid: int | None = None
    """PID of the serving process to watch (its children are included)."""
    target_cgroup: Path | None = None
    """Or a cgroup directory to watch (v2: ``cpu.stat``/``memory.current``; v1: the root holding
    ``cpuacct/`` and ``memory/``)."""
    target_name: str = "serving"
    """Value of the ``target`` label of the process metrics."""
    include_children: bool = True
    """Count the watched process's child processes (BentoML workers) too."""
    serving_metrics_url: str | None = None
    """Serving's ``/metrics``; the error rate is computed from its request counters."""
    gpu: bool = True
    """Read GPU utilisation and memory through NVML (quietly off where there is no GPU)."""

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("store_table_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX.match(value):
            raise ValueError("must be lower-case letters, digits or '_', starting with a letter")
        return value

    @field_validator("store_url")
    @classmethod
    def _check_store_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value or None

    @field_validator("api_key", "ingest_key", "feedback_key", "alertmanager_key")
    @classmethod
    def _check_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        key = value.get_secret_value()
        if len(key) < 16 or any(c.isspace() or not c.isprintable() for c in key):
            raise ValueError("must be at least 16 printable characters without spaces "
                             "(e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("retrain_command")
    @classmethod
    def _check_command(cls, value: str) -> str:
        _check_template(value)
        return value

    @field_validator("retrain_commands")
    @classmethod
    def _check_commands(cls, value: dict[str, str]) -> dict[str, str]:
        for model, template in value.items():
            try:
                _check_template(template)
            except ValueError as exc:
                raise ValueError(f"model {model!r}: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _check_drift(self) -> MonitorSettings:
        if self.drift_method == "calibrated" and self.drift_threshold is not None:
            raise ValueError("drift_threshold is not used with drift_method calibrated (its "
                             "thresholds come from drift_false_alarm_rate); set a fixed method "
                             "such as wasserstein, or drop the threshold")
        return self

    @property
    def store_dsn(self) -> str:
        """The store URL, with the SQLite default under ``$MODELLOOP_HOME`` filled in."""
        return self.store_url or f"sqlite:///{self.home / 'monitor' / 'events.db'}"

    @property
    def self_url(self) -> str:
        """:attr:`public_url`, or the loopback URL of this sidecar's port."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    @property
    def reports_dir(self) -> Path:
        """Where HTML drift reports are kept, ``$MODELLOOP_HOME/reports/drift``."""
        return self.home / "reports" / "drift"

    @property
    def jobs_dir(self) -> Path:
        """Logs of local retraining jobs, ``$MODELLOOP_HOME/jobs``."""
        return self.home / "jobs"
