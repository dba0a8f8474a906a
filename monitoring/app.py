"""The sidecar's HTTP API (Starlette): a thin transport over :class:`~monitoring.sidecar.Sidecar`.

Routes, with the role whose key each needs once ``MODELLOOP_MONITOR_API_KEY`` is set (the admin
key opens every route; see :mod:`monitoring.auth`)::

    POST /events          ingest         POST /feedback       feedback
    POST /alertmanager    alertmanager   GET  /status  POST /check  POST /retrain  GET /jobs
    GET  /reports/drift/latest  GET /reports/drift/{model}/latest   GET /export/labelled   admin
    GET  /metrics  GET /live  GET /ready  GET /openapi.json                                open

A handler refuses a request by raising an :class:`~modelloop.http.ApiError` (the sidecar's
:class:`~monitoring.ingest.InputError` is one), and the core's exception handlers
(:data:`~modelloop.http.EXCEPTION_HANDLERS`) answer it in the error shape both apps share,
``{"error", "code", "field", "errors", ...}`` naming the field; a full ingest queue is a 503
with ``Retry-After``, and so are events the store could not take. Every refused ``/events`` and
``/feedback`` body is counted once, by the sidecar (:meth:`Sidecar.refused`). Anything else that
fails is a bug: it is logged with its traceback under an error id, counted
(``modelloop_monitor_errors_total{reason="unexpected"}``) and answered 500 with that id. Events
and feedback are read within budgets of their own, so a label provider cannot starve serving's
events. ``/openapi.json`` describes all of it (:mod:`monitoring.openapi`, built once from this
table of routes).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from modelloop.http import (
    EXCEPTION_HANDLERS,
    ApiError,
    content_length,
    internal_error,
    json_response,
    read_body,
)
from monitoring.auth import Role, RoleKeys
from monitoring.ingest import InputError, NotStored, parse_retrain
from monitoring.jobs import JobStatus, Refusal
from monitoring.metrics import MonitorMetrics
from monitoring.openapi import openapi_document
from monitoring.records import window_frame
from monitoring.reports import latest_report
from monitoring.sidecar import Sidecar

log = logging.getLogger(__name__)


Handler = Callable[[Request], Awaitable[Response]]
EXPORT_MAX_ROWS = 1_000_000


def _answer_unexpected(handler: Handler, metrics: MonitorMetrics) -> Handler:
    """``handler``, with an error nobody expected logged (traceback and an id), counted, and
    answered 500 with the id, so the sender's answer finds the log line. Refusals (ApiError,
    Starlette's HTTPException) and a client gone away pass through as before."""
    async def answered(request: Request) -> Response:
        try:
            return await handler(request)
        except (ApiError, HTTPException, ClientDisconnect):
            raise
        except Exception as exc:
            metrics.errors.labels("unexpected").inc()
            raise internal_error(log, request, exc, "the sidecar's log") from exc
    return answered


class IngestBudget:
    """Bytes of one route's bodies held at once, from reading to commit: a body that would pass
    the budget is refused at once (503), so bursts cannot grow memory or the writer's queue. One
    body is always let in, so a body under the body limit is never refused forever."""

    def __init__(self, name: str, limit: int, body_limit: int) -> None:
        self.name = name
        self.limit = limit
        self.body_limit = body_limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held and self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


def _query_number(request: Request, name: str, default: float, low: float, high: float,
                  integer: bool = False) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise InputError(422, "invalid_query", [
            f"{name}: expected {'a whole number' if integer else 'a number'}, got {raw[:40]!r}"]) from None
    if not low <= value <= high:  # NaN fails too
        raise InputError(422, "invalid_query", [f"{name}: must be between {low:g} and {high:g}, "
                                                f"got {raw[:40]}"])
    return value


def _query_model(request: Request) -> str | None:
    """``?model=``, refused with a NUL in it (the store is asked about it; PostgreSQL would fail)."""
    model = request.query_params.get("model")
    if model is not None and "\x00" in model:
        raise InputError(422, "invalid_query", ["model: must not contain NUL (\\u0000)"])
    return model


class SidecarHandlers:
    """The sidecar's route handlers, one method a route, bound to one :class:`Sidecar`; the
    table of routes (:meth:`table`) is where paths, methods and roles are given."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.settings = settings = sidecar.settings
        self.keys = RoleKeys.from_settings(settings)
        self.events_budget = IngestBudget("ingest", settings.ingest_queue_bytes,
                                          settings.max_body_bytes)
        self.feedback_budget = IngestBudget("feedback", settings.feedback_queue_bytes,
                                            settings.max_feedback_body_bytes)
        self.document = orjson.dumps(openapi_document(
            (path, method, role) for path, method, role, _ in self.table()))

    def table(self) -> list[tuple[str, str, Role | None, Handler]]:
        """Every route: path, method, the role whose key it needs (None: open), handler."""
        return [
            ("/events", "POST", "ingest", self.events),
            ("/feedback", "POST", "feedback", self.feedback),
            ("/status", "GET", "admin", self.status),
            ("/check", "POST", "admin", self.check),
            ("/reports/drift/latest", "GET", "admin", self.report),
            ("/reports/drift/{model}/latest", "GET", "admin", self.report),
            ("/retrain", "POST", "admin", self.retrain),
            ("/alertmanager", "POST", "alertmanager", self.alertmanager),
            ("/jobs", "GET", "admin", self.jobs),
            ("/export/labelled", "GET", "admin", self.export_labelled),
            ("/metrics", "GET", None, self.metrics),
            ("/live", "GET", None, self.live),
            ("/ready", "GET", None, self.ready),
            ("/openapi.json", "GET", None, self.openapi),
        ]

    def guard(self, role: Role, handler: Handler) -> Handler:
        """``handler`` behind the key check of ``role`` (a no-op while no key is set)."""
        if not self.keys.enabled:
            return handler

        async def guarded(request: Request) -> Response:
            denied = self.keys.denial(request.headers.get("authorization"), role)
            if denied is None:
                return await handler(request)
            self.sidecar.metrics.denied.labels(denied).inc()
            if denied == "wrong_role":
                raise ApiError(403, denied, "Authorization",
                               f"Authorization: this key may not use {request.url.path} "
                               f"(it needs the {role} or the admin key)")
            raise ApiError(401, denied, "Authorization", "Authorization: a valid key is required "
                           "(Authorization: Bearer <key>)",
                           {"WWW-Authenticate": 'Bearer realm="modelloop"'})
        return guarded

    async def budgeted(self, request: Request, budget: IngestBudget,
                       work: Callable[[bytes], Awaitable[Response]]) -> Response:
        """Read the body within ``budget`` (by its declared length, else by the body limit) and
        run ``work`` on it, giving the bytes back when it is done. Every refusal of the body, by
        the reader or by ``work``, is told to the sidecar, which counts it once."""
        try:
            declared = content_length(request)
            size = budget.body_limit if declared is None else min(declared, budget.body_limit)
            if not budget.take(size):
                self.sidecar.metrics.ingest_busy.inc()
                raise ApiError(503, "queue_full", "body", f"body: the {budget.name} queue is full "
                               f"({budget.held} of {budget.limit} bytes held); retry after 1 s",
                               {"Retry-After": "1"})
            try:
                return await work(await self.read_within(request, budget.body_limit))
            finally:
                budget.give(size)
        except ApiError as exc:
            self.sidecar.refused(exc)
            raise

    async def read_within(self, request: Request, limit: int) -> bytes:
        """The body, refused 408 when not received within ``body_read_timeout_s``: a slow
        sender must not hold its budget."""
        timeout_s = self.settings.body_read_timeout_s
        try:
            return await asyncio.wait_for(read_body(request, limit), timeout_s)
        except TimeoutError:
            raise InputError(408, "too_slow", [
                f"body: not received within {timeout_s:g} s"]) from None

    async def store_events(self, body: bytes) -> Response:
        try:
            accepted, stored = await asyncio.wrap_future(self.sidecar.submit_events(body))
        except NotStored as exc:  # nothing was acknowledged: serving keeps the batch and retries
            self.sidecar.metrics.errors.labels("not_stored").inc()
            raise ApiError(503, "not_stored", None, f"events not stored: {exc}") from exc
        self.sidecar.ingested(stored)
        return json_response({"accepted": accepted, "new": sum(stored.new.values()),
                              "ambiguous": stored.conflicts})

    async def store_feedback(self, body: bytes) -> Response:
        items, single = self.sidecar.parse_feedback(body)
        return json_response(await run_in_threadpool(self.sidecar.feedback, items, single))

    async def events(self, request: Request) -> Response:
        return await self.budgeted(request, self.events_budget, self.store_events)

    async def feedback(self, request: Request) -> Response:
        return await self.budgeted(request, self.feedback_budget, self.store_feedback)

    async def status(self, request: Request) -> Response:
        return json_response(await run_in_threadpool(self.sidecar.status))

    async def check(self, request: Request) -> Response:
        model = request.query_params.get("model")
        evaluator = self.sidecar.evaluator
        if model is not None and model not in evaluator.models(refresh=True):
            raise ApiError(404, "unknown_model", "model", f"model: no events of model {model!r} to check")
        await run_in_threadpool(evaluator.check, [model] if model else None)
        return json_response(await run_in_threadpool(self.sidecar.status))

    async def report(self, request: Request) -> Response:
        model = request.path_params.get("model") or request.query_params.get("model")
        if model is None:
            models = self.sidecar.evaluator.models()
            if len(models) != 1:
                raise ApiError(400, "model_required", "model", "model: name the model "
                               "(?model=NAME); this sidecar watches "
                               f"{', '.join(models) or 'no model with events yet'}")
            model = models[0]
        elif model not in self.sidecar.evaluator.models():  # a name, never a path
            raise ApiError(404, "unknown_model", "model", f"model: no events of model {model!r}")
        path = latest_report(self.settings.reports_dir, model)
        if path is None:
            raise ApiError(404, "no_report", "model", f"no drift report for model {model!r} yet "
                           "(one is written after the first judged drift check)")
        return FileResponse(path, media_type="text/html")

    async def retrain(self, request: Request) -> Response:
        req = parse_retrain(await read_body(request, self.settings.max_body_bytes))
        outcome = await run_in_threadpool(self.sidecar.retrain, req.model,
                                          req.reason or "manual request")
        if outcome.refused is Refusal.at_capacity:
            return json_response(outcome.as_dict(), 429,
                                 {"Retry-After": str(int(self.settings.job_poll_s * 30))})
        code = {JobStatus.running: 202, JobStatus.skipped: 409, JobStatus.failed: 502}[outcome.status]
        return json_response(outcome.as_dict(), code)

    async def alertmanager(self, request: Request) -> Response:
        body = await read_body(request, self.settings.max_alertmanager_body_bytes)
        return json_response(await run_in_threadpool(self.sidecar.alertmanager, body))

    async def jobs(self, request: Request) -> Response:
        records = await run_in_threadpool(self.sidecar.store.jobs, _query_model(request))
        return json_response({"jobs": [r.__dict__ for r in records]})

    async def export_labelled(self, request: Request) -> Response:
        model = _query_model(request)
        if not model:
            raise InputError(422, "invalid_query", ["model: required"])
        since = _query_number(request, "since", 0.0, 0.0, 1e11)
        limit_rows = int(_query_number(request, "limit", 100_000, 1, EXPORT_MAX_ROWS, True))
        data = await run_in_threadpool(_labelled_parquet, self.sidecar, model, since, limit_rows)
        if data is None:
            raise ApiError(404, "no_labels", "model", f"model: no labelled events of model {model!r}")
        return Response(data, media_type="application/vnd.apache.parquet")

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.sidecar.prometheus), media_type=CONTENT_TYPE_LATEST)

    async def live(self, request: Request) -> Response:
        return json_response({"status": "alive"})

    async def openapi(self, request: Request) -> Response:
        return Response(self.document, media_type="application/json")

    async def ready(self, request: Request) -> Response:
        if self.sidecar.ready:
            return json_response({"status": "ready"})
        return json_response({"status": "not ready"}, 503)


def create_app(sidecar: Sidecar) -> Starlette:
    """The ASGI app; the sidecar is started by the caller and stopped when the app shuts down."""
    handlers = SidecarHandlers(sidecar)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # uvicorn has finished the in-flight requests: flush and close
        await run_in_threadpool(sidecar.stop)

    routes = [Route(path, _answer_unexpected(handlers.guard(role, handler) if role else handler,
                                             sidecar.metrics), methods=[method])
              for path, method, role, handler in handlers.table()]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers=EXCEPTION_HANDLERS)


def _labelled_parquet(sidecar: Sidecar, model: str, since: float, limit: int) -> bytes | None:
    """Labelled events of ``model`` as Parquet: the features (by the version's names; a
    categorical feature as its strings), the label and prediction in the reference sample's
    columns, ``version`` and ``timestamp``."""
    import pandas as pd

    from modelloop.schemas import REF_LABEL, REF_PREDICTION

    frames = []
    for version in sidecar.store.versions(model, since):
        win = sidecar.store.labelled_version(model, version, since, limit)
        if not len(win) or win.features is None:
            continue
        meta = sidecar.catalog.metadata(model, version)
        df = window_frame(win.features, meta.feature_names, meta.categorical_features)
        df[REF_LABEL] = win.label
        df[REF_PREDICTION] = win.prediction
        df["version"] = version
        df["timestamp"] = win.ts
        frames.append(df)
    if not frames:
        return None
    buf = io.BytesIO()
    pd.concat(frames, ignore_index=True).to_parquet(buf, index=False)
    return buf.getvalue()
