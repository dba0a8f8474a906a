"""The HTTP routes: JSON ``/predict``, Open Inference Protocol v2, batch scoring, admin.

A thin transport over :class:`~serving.state.ServingState`: every route validates at the boundary
(:mod:`serving.validation`), goes through the same batcher and runtime, and answers errors as
the body both apps share (:mod:`modelloop.http`: ``{"error": message, "code": ...,
"field": ..., "errors": [message]}``) with a 4xx status (503 + ``Retry-After`` when
shedding load). ``serving/service.py`` puts this app in front of (or inside) BentoML's.

Routes (auth = bearer token when ``MODELLOOP_SERVING_API_KEY`` is set)::

    POST /predict                          auth   {"instances": [{...}, ...] | [[...], ...]}
    POST /models/{name}/predict            auth   the same, for any served model
    GET  /v2  /v2/health/live  /v2/health/ready   open
    GET  /v2/models/{name}[/versions/{v}][/ready] auth
    POST /v2/models/{name}[/versions/{v}]/infer   auth
    POST /explain  /v2/models/{name}[/versions/{v}]/explain   auth   SHAP attributions (serving/explain.py)
    POST /batch/score                      auth   CSV or Parquet body -> scored file
    POST /batch/jobs                       auth   CSV or Parquet body -> {"job_id": ...}
    GET  /batch/jobs/{id}  /batch/jobs/{id}/result  auth
    DELETE /batch/jobs/{id}                auth   a finished job and its files
    GET  /admin/model   POST /admin/reload auth
    POST /v2/repository/index              auth   the served models, READY or UNAVAILABLE (why)
    POST /v2/repository/models/{name}/load | unload   auth

``/predict``, batch scoring and ``/admin/*`` serve the default model; the model routes any model
of the repository (:mod:`serving.repository`), loading it on its first request.

Their OpenAPI document (:mod:`serving.openapi`) is built from the table of routes in
:func:`build_app` and merged into BentoML's ``/docs.json``.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from modelloop import http
from modelloop.categorical import unknown_counts
from modelloop.http import (
    JSON,
    ApiError,
    content_length,
    error_response,
    internal_error,
    json_response,
)
from serving import oip
from serving.batch import BatchInputError, check_scorable, read_upload, score_table
from serving.batcher import BatchResult, Overloaded, retry_after_header
from serving.events import new_request_id
from serving.explain import ExplainWorker, explain_json, oip_explain_json, rows_of
from serving.jobs import JobLimits
from serving.openapi import REQUEST_ID_PATTERN, openapi_document
from serving.predictions import answer_json
from serving.repository import ModelNotFound, ModelUnavailable, ServedModel
from serving.sampling import LABEL_EXPECTED_HEADER, labelled
from serving.state import ServingState
from serving.validation import RequestError, parse_predict_body, unknown_category_error

logger = logging.getLogger(__name__)

PARQUET_TYPES = ("application/vnd.apache.parquet", "application/x-parquet", "application/parquet")
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
Handler = Callable[[Request, ServingState], Awaitable[Response]]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body within ``limit`` bytes: the core's reader (:func:`modelloop.http.read_body`:
    a compressed body 415, a Content-Length not a number 400), with serving's 413."""
    return await http.read_body(request, limit, _too_large)


def _too_large(size: int | None, limit: int) -> RequestError:
    said = f"{size} bytes is" if size is not None else "the body is"
    return RequestError(413, "body_too_large", "body",
                        f"body: {said} more than the limit of {limit} (MODELLOOP_SERVING_MAX_BODY_BYTES)")


def error_reason(exc: ApiError) -> str:
    """The ``reason`` label of the error counter for a refused request."""
    if exc.status == 401:
        return "auth"
    if exc.status == 413:
        return "too_large"
    if exc.code == "model_unavailable":
        return "unavailable"
    return "validation"


_BATCH_STATUS = {"malformed_body": 400, "unsupported_encoding": 415, "too_many_rows": 413, "too_large": 413}
"""HTTP status of a :class:`BatchInputError` by its code; any other is 422."""


def batch_error(exc: BatchInputError) -> RequestError:
    return RequestError(_BATCH_STATUS.get(exc.code, 422), exc.code, exc.column or "body", str(exc))


def unavailable(exc: ModelUnavailable) -> RequestError:
    return RequestError(503, "model_unavailable", "model_name", f"model_name: {exc}")


class Routes:
    """Route handlers bound to one worker's state."""

    def __init__(self, state: ServingState) -> None:
        self.state = state
        s = state.settings
        key = s.api_key.get_secret_value() if s.api_key else None
        self._key = key.encode() if key else None
        self.max_body = s.max_body_bytes
        self.max_rows = s.max_rows_per_request
        self.nan_policy = s.nan_policy
        self.reject_unknown = s.unknown_categories == "reject"
        self.job_limits = JobLimits(max_active=s.max_active_jobs, max_disk_bytes=s.max_jobs_disk_bytes,
                                    max_row_group_bytes=s.job_max_row_group_bytes)
        self.explainer = ExplainWorker(s)

    # -- shared plumbing ---------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        self.check_authorization(request.headers.get("authorization", ""))

    def check_authorization(self, value: str) -> None:
        """Refuse (401) an ``Authorization`` value (HTTP header, gRPC metadata) without the key."""
        if self._key is None:
            return
        # the scheme is case-insensitive (RFC 7235: "bearer" is "Bearer"), the token is not
        scheme, _, token = value.partition(" ")
        if not (hmac.compare_digest(token.lstrip(" ").encode(), self._key) and scheme.lower() == "bearer"):
            raise RequestError(401, "unauthorized", "Authorization",
                               "Authorization: a valid bearer token is required "
                               "(Authorization: Bearer <MODELLOOP_SERVING_API_KEY>)", {"WWW-Authenticate": "Bearer"})

    def request_id(self, request: Request, given: str | None = None) -> str:
        """The request's id: ``given`` (an inference request's ``id``), else ``X-Request-ID``,
        else a new one; it names the rows' events, so its characters are few. A
        :class:`~serving.sampling.LabelledId` when ``X-Modelloop-Label-Expected: 1`` says the
        request will be labelled (the event sample keeps all its rows)."""
        return labelled(self.checked_request_id(given, request.headers.get("x-request-id")),
                        request.headers.get(LABEL_EXPECTED_HEADER))

    @staticmethod
    def checked_request_id(given: str | None, header: str | None) -> str:
        """:meth:`request_id` from the inference request's ``id`` and the ``x-request-id`` header
        (HTTP or gRPC metadata)."""
        rid = given or header
        if rid is None:
            return new_request_id()  # time-ordered: cheaper for the sidecar's index
        if not _REQUEST_ID.fullmatch(rid):  # (match would pass a trailing "\n")
            field = "id" if given else "X-Request-ID"
            raise RequestError(422, "wrong_type", field,
                               f"{field}: 1-100 characters of letters, digits, '.', '_', ':' or '-'")
        return rid

    def guarded(self, route: str, handler: Handler, *, auth: bool = True) -> Callable[[Request], Awaitable[Response]]:
        """Auth, error mapping and request metrics around a handler."""
        state = self.state

        async def endpoint(request: Request) -> Response:
            start = time.perf_counter()
            try:
                if auth:
                    self.authorize(request)
                response = await handler(request, state)
            except ApiError as exc:  # (RequestError, and the core body reader's refusals)
                state.count_error(self.label(request), error_reason(exc))
                response = error_response(exc)
            except Overloaded as exc:
                state.count_error(self.label(request), "overloaded")
                response = error_response(RequestError(503, "overloaded", "body", f"overloaded: {exc}; retry later",
                                                       {"Retry-After": retry_after_header(exc.retry_after_s)}))
            except Exception as exc:  # a bug: logged under an id that the answer names
                state.count_error(self.label(request), "internal")
                response = error_response(internal_error(logger, request, exc, "the server's log"))
            if route:
                state.observe_request(self.label(request), route, response.status_code,
                                      time.perf_counter() - start)
            return response

        return endpoint

    # -- the served models --------------------------------------------------------------------
    def label(self, request: Request) -> str:
        """The ``model`` label of a request's metrics."""
        return self.state.repository.label(request.path_params.get("name"))

    async def acquire(self, name: str | None) -> ServedModel:
        """The served model ``name`` (None: the default model), loaded and held in flight until
        ``state.repository.release``; 404 when it is not served, 503 naming why it cannot
        answer (unloaded, or its load failed)."""
        repo = self.state.repository
        name = repo.default if name is None else name
        try:
            if name is None:
                raise ModelNotFound("")
            return await repo.acquire(name)
        except ModelNotFound:
            raise self.not_served(name) from None
        except ModelUnavailable as exc:
            raise unavailable(exc) from None

    def not_served(self, name: str | None) -> RequestError:
        served = self.state.repository.names()
        shown = ", ".join(repr(n) for n in served[:10]) + (", ..." if len(served) > 10 else "")
        if name is None:
            return RequestError(404, "not_found", "model_name",
                                f"model_name: no default model (MODELLOOP_SERVING_MODEL) among the "
                                f"served models ({shown}): use /models/{{name}}/predict")
        return RequestError(404, "not_found", "model_name",
                            f"model_name: model {name!r} is not served here (serving {shown})")

    def check_categories(self, runtime: Any, x: np.ndarray, prefix: str) -> None:
        """Count the values of a model with categorical features that its vocabularies lack
        (``modelloop_unknown_category_total``), or refuse them (422 naming the first,
        ``MODELLOOP_SERVING_UNKNOWN_CATEGORIES=reject``); nothing for other models."""
        if not runtime.categorical:
            return
        meta = runtime.metadata
        counts = unknown_counts(meta, x)
        if self.reject_unknown and any(counts.values()):
            raise unknown_category_error(meta, x, prefix)
        self.state.count_unknown_categories(meta, counts)

    # -- /predict ----------------------------------------------------------------------------
    async def predict(self, request: Request, state: ServingState) -> Response:
        start = time.perf_counter()
        served = await self.acquire(request.path_params.get("name"))
        lane = None
        try:
            base = self.request_id(request)
            lane = served.route(base)  # production, or the canary for its share of the ids
            runtime = lane.manager.current
            body = await read_body(request, self.max_body)
            x = parse_predict_body(body, runtime.metadata, nan_policy=self.nan_policy, max_rows=self.max_rows)
            self.check_categories(runtime, x, "instances")
            # with events on, the tag has the batcher hand these rows to the state's events,
            # with the rest of their model batch, at once
            result = await lane.batcher.predict(runtime, x, state.event_tag(base, start))
        finally:
            served.leave(lane)
            state.repository.release(served)
        runtime = result.runtime
        preds = result.predictions
        n = len(x)
        state.count_rows(runtime.name, n)
        body = answer_json(runtime.name, runtime.model_version, base, preds)
        return Response(body, 200, {"x-request-id": base}, JSON)

    # -- Open Inference Protocol v2 ----------------------------------------------------------
    async def server_metadata(self, request: Request, state: ServingState) -> Response:
        return json_response(oip.server_metadata())

    async def live(self, request: Request, state: ServingState) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request, state: ServingState) -> Response:
        return json_response({"ready": state.ready}, 200 if state.ready else 503)

    @staticmethod
    def check_version(served: ServedModel, version: str | None) -> Any:
        """The runtime serving ``served`` when ``version`` is it (None or "": the current one;
        the canary's version: the canary), else a 404 naming the version served."""
        runtime = served.manager.current
        canary = served.canary
        if version and canary is not None and version == str(canary.version):
            return canary.manager.current
        if version not in (None, "", str(runtime.model_version)):
            raise RequestError(404, "not_found", "model_version",
                               f"model_version: {served.name} v{version} is not served "
                               f"(serving v{runtime.model_version})")
        return runtime

    async def metadata_of(self, name: str, version: str | None) -> dict[str, Any]:
        """OIP model metadata of ``name`` (loading it if needed): REST and gRPC."""
        served = await self.acquire(name)
        try:
            return oip.model_metadata(self.check_version(served, version).metadata)
        finally:
            self.state.repository.release(served)

    def ready_of(self, name: str, version: str | None) -> bool:
        """Whether ``name`` (at ``version``) answers now, without loading it: REST and gRPC."""
        try:
            served = self.state.repository.get(name)
        except ModelNotFound:
            raise self.not_served(name) from None
        if served.state != "READY":
            return False
        self.check_version(served, version)
        return True

    async def model_metadata(self, request: Request, state: ServingState) -> Response:
        p = request.path_params
        return json_response(await self.metadata_of(p["name"], p.get("version")))

    async def model_ready(self, request: Request, state: ServingState) -> Response:
        p = request.path_params
        ready = self.ready_of(p["name"], p.get("version"))
        return json_response({"name": p["name"], "ready": ready}, 200 if ready else 503)

    async def infer(self, request: Request, state: ServingState) -> Response:
        start = time.perf_counter()
        served = await self.acquire(request.path_params["name"])
        try:
            runtime = self.check_version(served, request.path_params.get("version"))
            body = await read_body(request, self.max_body)
            req = self.decode_infer(body, request.headers.get(oip.HEADER_LENGTH), runtime)
            base = self.request_id(request, req.id)
            result = await self.infer_rows(served, req, runtime, base, start,
                                           request.path_params.get("version"), decode=lambda rt: self.decode_infer(
                                               body, request.headers.get(oip.HEADER_LENGTH), rt))
        finally:
            state.repository.release(served)
        runtime = result.runtime
        content, headers = oip.encode_infer(runtime.metadata, runtime.model_version, base, req, result.outputs)
        media = "application/octet-stream" if headers else JSON
        return Response(content, 200, headers, media)

    def decode_infer(self, body: bytes, header_length: str | None, runtime: Any) -> oip.InferRequest:
        return oip.decode_infer(body, header_length, runtime.metadata,
                                nan_policy=self.nan_policy, max_rows=self.max_rows)

    async def infer_rows(self, served: ServedModel, req: Any, decoded_with: Any, request_id: str,
                         start: float, version: str | None,
                         decode: Callable[[Any], Any]) -> BatchResult:
        """An OIP request's rows through production's or the canary's batcher (by its id, or the
        ``version`` asked for; their events named ``request_id`` when the sidecar is on),
        counted: what the REST and gRPC infer share. ``req`` was decoded against the runtime
        ``decoded_with``; ``decode(runtime)`` decodes it again for another one (a canary's
        schema may differ)."""
        state = self.state
        lane = served.route(request_id, version)
        try:
            runtime = lane.manager.current
            x = req.x if runtime is decoded_with else decode(runtime).x
            self.check_categories(runtime, x, "inputs")
            result = await lane.batcher.predict(runtime, x, state.event_tag(request_id, start))
        finally:
            served.leave(lane)
        state.count_rows(result.runtime.name, len(x))
        return result

    # -- explanations: in the worker's explanation process (serving/explain.py) -----------------
    async def explain(self, request: Request, state: ServingState) -> Response:
        served = await self.acquire(request.path_params.get("name"))
        try:
            runtime = served.manager.current  # (taken while held: an unload cannot come between)
        finally:
            state.repository.release(served)  # the explanation process loads the version itself
        body = await read_body(request, self.max_body)
        base = self.request_id(request)
        meta = runtime.metadata
        x = parse_predict_body(body, meta, nan_policy=self.nan_policy, max_rows=self.max_rows)
        expl = await self.explainer.explain(runtime.version, rows_of(meta, x))
        return json_response({"model": runtime.name, "version": runtime.model_version, "request_id": base,
                              **explain_json(meta, expl)}, headers={"x-request-id": base})

    async def oip_explain(self, request: Request, state: ServingState) -> Response:
        served = await self.acquire(request.path_params["name"])
        try:
            runtime = self.check_version(served, request.path_params.get("version"))
        finally:
            state.repository.release(served)
        body = await read_body(request, self.max_body)
        req = self.decode_infer(body, request.headers.get(oip.HEADER_LENGTH), runtime)
        base = self.request_id(request, req.id)
        expl = await self.explainer.explain(runtime.version, rows_of(runtime.metadata, req.x))
        return json_response(oip_explain_json(runtime.metadata, expl, base))

    # -- the model repository extension --------------------------------------------------------
    async def repository_index(self, request: Request, state: ServingState) -> Response:
        body = await read_body(request, self.max_body)
        ready_only = False
        if body.strip():
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise RequestError(400, "malformed_json", "body", "body: not JSON") from None
            if not isinstance(doc, dict) or set(doc) - {"ready"} or not isinstance(doc.get("ready", False), bool):
                raise RequestError(422, "wrong_type", "body", 'body: an object {"ready": true|false}')
            ready_only = doc.get("ready", False)
        index = state.repository.index()
        return json_response([m for m in index if m["state"] == "READY"] if ready_only else index)

    async def repository_load(self, request: Request, state: ServingState) -> Response:
        name = request.path_params["name"]
        try:
            await state.repository.load(name)
        except ModelNotFound:
            raise self.not_served(name) from None
        except ModelUnavailable as exc:
            raise unavailable(exc) from None
        return json_response({})

    async def repository_unload(self, request: Request, state: ServingState) -> Response:
        name = request.path_params["name"]
        try:
            await state.repository.unload(name)
        except ModelNotFound:
            raise self.not_served(name) from None
        return json_response({})

    # -- batch scoring -----------------------------------------------------------------------
    @staticmethod
    def _file_format(request: Request) -> str:
        fmt = request.query_params.get("format")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if fmt is None:
            fmt = "parquet" if ctype in PARQUET_TYPES else "csv" if ctype in ("text/csv", "application/csv") else None
        if fmt not in ("csv", "parquet"):
            raise RequestError(415, "unsupported_media_type", "Content-Type",
                               f"Content-Type: {ctype or 'none'!r}; send text/csv or "
                               "application/vnd.apache.parquet (or ?format=csv|parquet)")
        return fmt

    @staticmethod
    def _scorable(runtime: Any) -> None:
        try:
            check_scorable(runtime, "body")
        except BatchInputError as exc:
            raise RequestError(422, "wrong_shape", "body", str(exc)) from None

    async def batch_score(self, request: Request, state: ServingState) -> Response:
        fmt = self._file_format(request)
        served = await self.acquire(None)  # (the session stays with `runtime` until it is done)
        state.repository.release(served)
        runtime = served.manager.current
        self._scorable(runtime)
        body = await read_body(request, self.max_body)
        base = self.request_id(request)
        s = state.settings

        def score() -> tuple[bytes, pa.Table, np.ndarray]:
            # on a thread: reading, scoring and writing a file of 100,000 rows would stall the
            # event loop (and every /predict on this worker) for as long as they take
            table = read_upload(body, fmt, runtime.metadata.feature_names, max_rows=s.sync_batch_max_rows,
                                max_decoded_bytes=s.sync_batch_max_decoded_bytes,
                                categorical=runtime.metadata.categories)
            scored, x = score_table(runtime, table, source="body", nan_policy=self.nan_policy)
            sink = io.BytesIO()
            if fmt == "parquet":
                pq.write_table(scored, sink)
            else:
                pacsv.write_csv(scored, sink)
            return sink.getvalue(), scored, x

        try:
            content, scored, x = await asyncio.get_running_loop().run_in_executor(None, score)
        except BatchInputError as exc:
            raise batch_error(exc) from None
        state.record_batch_chunk(runtime, scored, x, base, 0)
        media = PARQUET_TYPES[0] if fmt == "parquet" else "text/csv"
        return Response(content, 200, {"x-request-id": base, "x-model-version": str(runtime.model_version)}, media)

    async def job_submit(self, request: Request, state: ServingState) -> Response:
        fmt = self._file_format(request)
        served = await self.acquire(None)  # (the job keeps the session until it is done)
        state.repository.release(served)
        runtime = served.manager.current
        self._scorable(runtime)
        status = await state.jobs.submit(fmt, request.stream(), runtime,
                                         on_chunk=state.record_batch_chunk, limits=self.job_limits,
                                         declared_bytes=content_length(request))
        return json_response(status, 202, {"Location": f"/batch/jobs/{status['job_id']}"})

    async def job_delete(self, request: Request, state: ServingState) -> Response:
        return json_response(await asyncio.to_thread(state.jobs.delete, request.path_params["job_id"]))

    async def job_status(self, request: Request, state: ServingState) -> Response:
        return json_response(state.jobs.status(request.path_params["job_id"]))

    async def job_result(self, request: Request, state: ServingState) -> Response:
        path, fmt = state.jobs.result(request.path_params["job_id"])
        return FileResponse(path, media_type=PARQUET_TYPES[0] if fmt == "parquet" else "text/csv",
                            filename=f"{request.path_params['job_id']}{path.suffix}")

    # -- admin -------------------------------------------------------------------------------
    async def admin_model(self, request: Request, state: ServingState) -> Response:
        served = await self.acquire(None)
        state.repository.release(served)
        status = served.manager.status()
        canary = served.canary
        status["canary"] = None if canary is None else {**canary.manager.status(), "share": canary.share}
        shadow = served.shadow
        status["shadow"] = None if shadow is None else {**shadow.manager.status(), "queued_rows": shadow.queued_rows}
        status.update(queued_rows=served.batcher.queued_rows, events_pending=state.emitter.pending_rows,
                      events_sent=state.emitter.sent, events_dropped=state.emitter.dropped)
        return json_response(status)

    async def admin_reload(self, request: Request, state: ServingState) -> Response:
        served = await self.acquire(None)
        state.repository.release(served)
        return json_response(await served.manager.refresh(force=True))


def build_app(state: ServingState) -> Starlette:
    """The Starlette app of our routes (no lifespan: ``serving/service.py`` runs the state's),
    with its OpenAPI document, built from the same table, in ``app.state.openapi``."""
    r = Routes(state)
    state.closers.append(r.explainer.close)  # queued explanations are cancelled at shutdown
    v2 = "/v2/models/{name}"
    vv = "/v2/models/{name}/versions/{version}"
    # (path, method, route label of the request metrics ("": not counted), guarded, handler)
    table: list[tuple[str, str, str, bool, Handler]] = [
        ("/predict", "POST", "predict", True, r.predict),
        ("/models/{name}/predict", "POST", "predict", True, r.predict),
        ("/v2", "GET", "", False, r.server_metadata),
        ("/v2/health/live", "GET", "", False, r.live),
        ("/v2/health/ready", "GET", "", False, r.ready),
        *[(p, "GET", "", True, r.model_metadata) for p in (v2, vv)],
        *[(p + "/ready", "GET", "", True, r.model_ready) for p in (v2, vv)],
        *[(p + "/infer", "POST", "infer", True, r.infer) for p in (v2, vv)],
        ("/explain", "POST", "explain", True, r.explain),
        *[(p + "/explain", "POST", "explain", True, r.oip_explain) for p in (v2, vv)],
        ("/batch/score", "POST", "batch", True, r.batch_score),
        ("/batch/jobs", "POST", "batch", True, r.job_submit),
        ("/batch/jobs/{job_id}", "GET", "", True, r.job_status),
        ("/batch/jobs/{job_id}", "DELETE", "", True, r.job_delete),
        ("/batch/jobs/{job_id}/result", "GET", "", True, r.job_result),
        ("/admin/model", "GET", "", True, r.admin_model),
        ("/admin/reload", "POST", "", True, r.admin_reload),
        ("/v2/repository/index", "POST", "", True, r.repository_index),
        ("/v2/repository/models/{name}/load", "POST", "", True, r.repository_load),
        ("/v2/repository/models/{name}/unload", "POST", "", True, r.repository_unload),
    ]
    routes = [Route(path, r.guarded(label, handler, auth=guarded), methods=[method])
              for path, method, label, guarded, handler in table]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed})
    app.state.openapi = openapi_document((path, method, guarded) for path, method, _, guarded, _ in table)
    return app


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(RequestError(404, "not_found", "path", f"path: no route {request.url.path}"))


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(RequestError(405, "method_not_allowed", "method",
                                       f"method: {request.method} is not allowed on {request.url.path}"))


# Paths the front door in serving/service.py sends straight to this app (it sends BentoML's own
# routes to BentoML, and any other path here too).
OWN_PREFIXES = ("/predict", "/models/", "/v2", "/batch/", "/admin/", "/explain")
