"""The sidecar's OpenAPI 3.1 document (``GET /openapi.json``), built once when the app is made.

Request bodies are the JSON schemas of the pydantic models that validate them
(:class:`~modelloop.schemas.EventBatch`, :class:`~modelloop.schemas.ColumnBatch`,
:class:`~modelloop.schemas.Feedback`, :class:`~monitoring.alertmanager.WebhookPayload`,
:class:`~monitoring.ingest.RetrainRequest`); answers are described by the small models below.
The app hands in its own route table (path, method, role), so a route without a description
here stops the app from being made, and the security of each operation is the role its route
is guarded by.

Example (what :func:`monitoring.app.create_app` does with its table of routes)::

    doc = openapi_document((path, method, role) for path, method, role, _ in table)
    doc["paths"]["/events"]["post"]["security"]   # [{"ingestKey": []}, {"adminKey": []}]
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from modelloop.schemas import ColumnBatch, EventBatch, Feedback
from monitoring.alertmanager import WebhookPayload
from monitoring.ingest import RetrainRequest
from monitoring.jobs import Answered, Refusal
from monitoring.records import JobRecord

_REF = "#/components/schemas/{model}"


# -- answers (descriptions of what the app writes; requests are validated by the models above) ---
class Error(BaseModel):
    """A refused request: the first problem, and every problem naming its field (the one error
    shape of both HTTP apps, :mod:`modelloop.http`)."""

    model_config = ConfigDict(extra="allow")

    error: str
    code: str
    """What was refused, in a word (``invalid_event``, ``too_large``, ``wrong_key``, ...)."""
    field: str | None
    """The field the first problem names (None: the request as a whole)."""
    errors: list[str]
    """At most 20 (``error_count`` says how many there were)."""
    error_count: int | None = Field(None, ge=0)
    rejected: int | None = Field(None, ge=0)
    """Events or labels the request carried, all refused with it."""
    error_id: str | None = None
    """On a 500: the id under which the sidecar logged the error and its traceback."""


class FeedbackList(BaseModel):
    """Several labels at once (the other form of ``POST /feedback`` is one :class:`Feedback`)."""

    feedback: list[Feedback] = Field(min_length=1)


class EventsAccepted(BaseModel):
    """The batch is committed: ``accepted`` events, ``new`` of them not stored before (the rest
    were: a re-send), ``ambiguous`` of them not stored because their request id holds another
    prediction (the id is marked ambiguous: no label is joined to it)."""

    accepted: int = Field(ge=0)
    new: int = Field(ge=0)
    ambiguous: int = Field(ge=0)


class FeedbackResult(BaseModel):
    """Labels joined to their events; unknown ids have no event (yet), duplicates had a label,
    ambiguous ids came with two different predictions (no label is joined to them), not_sampled
    ids have no event because serving's event sample left them out (monitoring/sampling.py)."""

    joined: int = Field(ge=0)
    unknown: list[str]
    duplicate: list[str]
    ambiguous: list[str]
    not_sampled: list[str]


class JobAnswer(BaseModel):
    """What a retraining request came to (``refused``: why a ``skipped`` one started no job; an
    unknown or unwatched model is refused with a 422 before a job is asked for)."""

    job: str
    status: Answered
    detail: str
    refused: Literal[Refusal.duplicate, Refusal.model_busy, Refusal.at_capacity] | None = None


class AlertJob(JobAnswer):
    fingerprint: str


class IgnoredAlert(BaseModel):
    fingerprint: str
    why: str


class AlertsResult(BaseModel):
    """What each alert of an Alertmanager notification led to."""

    started: list[AlertJob]
    duplicate: list[str]
    skipped: list[AlertJob]
    ignored: list[IgnoredAlert]


class Jobs(BaseModel):
    """Retraining jobs, newest first."""

    jobs: list[JobRecord]


class PolicyStatus(BaseModel):
    file: str
    rules: list[dict[str, Any]]


class WindowSizes(BaseModel):
    events: int
    seconds: float
    min_drift_rows: int


class FiredJob(BaseModel):
    """What a ``retrain`` rule's request came to: a :class:`JobAnswer`, where ``refused`` may
    also be ``unknown_model`` or ``not_watched`` (asked of the rule's scope, not refused by a
    422 as ``POST /retrain`` is)."""

    job: str
    status: Answered
    detail: str
    refused: Refusal | None = None


class FiringEntry(BaseModel):
    """A rule that fired (``job``: what a ``retrain`` rule's request came to)."""

    rule: str
    scope: str
    value: float
    samples: int
    at: float
    action: str
    message: str
    job: FiredJob | None = None


class Status(BaseModel):
    """The sidecar's summary: models (drift, quality, latency), rules, jobs, resources."""

    ready: bool
    started_at: float | None
    store: str
    policy: PolicyStatus
    trigger: str
    windows: WindowSizes
    drift_engine_ready: bool
    models: dict[str, Any]
    resources: dict[str, Any]
    jobs: list[JobRecord]
    recent_firings: list[FiringEntry]


class Health(BaseModel):
    status: Literal["alive", "ready", "not ready"]


# -- operations -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Operation:
    summary: str
    ok: dict[int, tuple[str, dict[str, Any]]]
    """Status -> (media type, schema) of each success answer."""
    errors: tuple[int, ...] = ()
    body: dict[str, Any] | None = None
    params: list[dict[str, Any]] = field(default_factory=list)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(model=name)}


def _json(name: str) -> tuple[str, dict[str, Any]]:
    return "application/json", _ref(name)


def _query(name: str, schema: dict[str, Any], what: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": what,
            "schema": schema}


_MODEL_NAME = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[^\\u0000]*$"}
_MODEL_QUERY = _query("model", _MODEL_NAME, "A model's name.")
_HTML = ("text/html", {"type": "string"})
_BAD_BODY = (400, 413, 415, 422)
"""Broken JSON, a body over the route's limit or in a content coding, a body that does not fit
its schema."""

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/events"): Operation(
        "Store prediction events (a batch, validated whole; 200 once committed)",
        {200: _json("EventsAccepted")}, (*_BAD_BODY, 408, 503),
        body={"anyOf": [_ref("EventBatch"), _ref("ColumnBatch")]}),
    ("POST", "/feedback"): Operation(
        "Join true labels to earlier predictions", {200: _json("FeedbackResult")},
        (*_BAD_BODY, 408, 503), body={"anyOf": [_ref("Feedback"), _ref("FeedbackList")]}),
    ("GET", "/status"): Operation("The sidecar's summary", {200: _json("Status")}),
    ("POST", "/check"): Operation(
        "Run the check now (of one model, or all) and answer the status",
        {200: _json("Status")}, (404,), params=[_MODEL_QUERY]),
    ("GET", "/reports/drift/latest"): Operation(
        "The newest drift report (HTML) of the one model watched, or of ?model=",
        {200: _HTML}, (400, 404), params=[_MODEL_QUERY]),
    ("GET", "/reports/drift/{model}/latest"): Operation(
        "The newest drift report (HTML) of a model", {200: _HTML}, (404,),
        params=[{"name": "model", "in": "path", "required": True, "description": "A model's name.",
                 "schema": {**_MODEL_NAME, "pattern": "^[^/\\u0000]+$"}}]),
    ("POST", "/retrain"): Operation(
        "Start a retraining job of a model",
        {202: _json("JobAnswer"), 409: _json("JobAnswer"), 429: _json("JobAnswer"),
         502: _json("JobAnswer")}, _BAD_BODY, body=_ref("RetrainRequest")),
    ("POST", "/alertmanager"): Operation(
        "Alertmanager's webhook: each firing alert with a `model` label asks for a retraining "
        "(at most `MAX_ALERTS_PER_BODY` alerts)",
        {200: _json("AlertsResult")}, _BAD_BODY, body=_ref("WebhookPayload")),
    ("GET", "/jobs"): Operation("Retraining jobs, newest first", {200: _json("Jobs")}, (422,),
                                params=[_MODEL_QUERY]),
    ("GET", "/export/labelled"): Operation(
        "Labelled events of a model as Parquet (features, label, prediction, version, timestamp)",
        {200: ("application/vnd.apache.parquet", {"type": "string", "contentMediaType":
                                                  "application/vnd.apache.parquet"})},
        (404, 422), params=[
            _query("model", _MODEL_NAME, "The model's name.", required=True),
            _query("since", {"type": "number", "minimum": 0, "maximum": 1e11, "default": 0},
                   "Only events from this unix time (seconds) on."),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 1_000_000,
                             "default": 100_000}, "At most this many events per version.")]),
    ("GET", "/metrics"): Operation("Prometheus exposition",
                                   {200: ("text/plain", {"type": "string"})}),
    ("GET", "/live"): Operation("Liveness", {200: _json("Health")}),
    ("GET", "/ready"): Operation("Readiness (503 while starting or shutting down)",
                                 {200: _json("Health"), 503: _json("Health")}),
    ("GET", "/openapi.json"): Operation("This document",
                                        {200: ("application/json", {"type": "object"})}),
}

_STATUS_TEXT = {
    400: "Broken JSON or Content-Length (or a missing choice, such as which model)",
    401: "No key, or an unknown one (`WWW-Authenticate: Bearer`)",
    403: "A key of another role",
    404: "No such model, report or data",
    408: "The body was not received within `BODY_READ_TIMEOUT_S`",
    413: "The body is over the route's limit (`MAX_BODY_BYTES`, `MAX_FEEDBACK_BODY_BYTES`, "
         "`MAX_ALERTMANAGER_BODY_BYTES`)",
    415: "The body is in a `Content-Encoding` (send it uncompressed)",
    422: "The request does not fit its schema or the model version; `errors` name the fields",
    503: "Busy (the route's queue is full: retry after `Retry-After` seconds) or nothing stored",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again",
                                "schema": {"type": "string"}}}
_SUCCESS_TEXT = {200: "OK", 202: "Job started", 409: "Another job of the model is active",
                 429: "At most MAX_ACTIVE_JOBS jobs at once (`Retry-After`)",
                 502: "The trigger could not start the job", 503: "Not ready"}


_ENV = {"admin": "API_KEY", "ingest": "INGEST_KEY", "feedback": "FEEDBACK_KEY",
        "alertmanager": "ALERTMANAGER_KEY"}


def _components() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        EventBatch, ColumnBatch, Feedback, FeedbackList, WebhookPayload, RetrainRequest, Error,
        EventsAccepted, FeedbackResult, JobAnswer, AlertsResult, Jobs, Status, Health]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    schemas: dict[str, Any] = top["$defs"]
    return {
        "schemas": dict(sorted(schemas.items())),
        "securitySchemes": {f"{role}Key": {
            "type": "http", "scheme": "bearer",
            "description": f"The {role} key (MODELLOOP_MONITOR_{_ENV[role]})"} for role in _ENV},
    }


def _security(role: str | None) -> list[dict[str, list[str]]]:
    """Either key opens a guarded route: its role's or the admin key (OpenAPI: a list of
    alternatives); an open route needs none."""
    return [] if role is None else [{f"{r}Key": []} for r in dict.fromkeys((role, "admin"))]


def _responses(op: Operation, role: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, (media, schema) in op.ok.items():
        out[str(status)] = {"description": _SUCCESS_TEXT[status],
                            "content": {media: {"schema": schema}}}
        if status == 429:
            out[str(status)]["headers"] = _RETRY_AFTER
    codes = (*op.errors, *((401, 403) if role else ()))
    for status in sorted(codes):
        out[str(status)] = {"description": _STATUS_TEXT[status],
                            "content": {"application/json": {"schema": _ref("Error")}}}
        if status == 503:
            out[str(status)]["headers"] = _RETRY_AFTER
        if status == 401:
            out[str(status)]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return dict(sorted(out.items()))


def openapi_document(routes: Iterable[tuple[str, str, str | None]]) -> dict[str, Any]:
    """The document for the app's ``(path, method, role)`` routes (role None: open)."""
    paths: dict[str, dict[str, Any]] = {}
    routed = set()
    for path, method, role in routes:
        op = OPERATIONS.get((method, path))
        if op is None:
            raise LookupError(f"{method} {path} has no description in monitoring/openapi.py")
        routed.add((method, path))
        entry: dict[str, Any] = {
            "operationId": re.sub(r"[^a-z0-9]+", "_", f"{method} {path}".lower()).strip("_"),
            "summary": op.summary,
            "security": _security(role),
            "responses": _responses(op, role),
        }
        if op.params:
            entry["parameters"] = op.params
        if op.body is not None:
            entry["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": op.body}}}
        paths.setdefault(path, {})[method.lower()] = entry
    if missing := set(OPERATIONS) - routed:
        raise LookupError(f"described but not routed: {sorted(missing)}")
    return {
        "openapi": "3.1.0",
        "info": {"title": "modelloop monitoring sidecar", "version": _version(),
                 "description": "Event ingest, feedback, status, drift reports, retraining and "
                                "the Alertmanager receiver. Guarded routes take a bearer key of "
                                "their role or the admin key once MODELLOOP_MONITOR_API_KEY is "
                                "set (without it the sidecar listens on loopback only, open)."},
        "paths": dict(sorted(paths.items())),
        "components": _components(),
    }


def _version() -> str:
    try:
        return metadata.version("modelloop")
    except metadata.PackageNotFoundError:
        return "0"
