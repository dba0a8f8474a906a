"""The sidecar's HTTP API (Starlette): a thin transport over :class:`~monitoring.sidecar.Sidecar`.

Routes: ``POST /events``, ``POST /feedback``, ``GET /status``, ``POST /check``,
``GET /reports/drift/latest``, ``POST /retrain``, ``POST /alertmanager``, ``GET /jobs``,
``GET /export/labelled``, ``GET /metrics``, ``GET /live``, ``GET /ready``. Bad input gets a 4xx
JSON body ``{"error": ..., "errors": [...]}`` naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from monitoring.ingest import InputError, parse_feedback
from monitoring.reports import latest_report
from monitoring.sidecar import Sidecar

log = logging.getLogger(__name__)


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS,
                            default=_default)


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _error(status: int, message: str, **extra: Any) -> ORJSONResponse:
    return ORJSONResponse({"error": message, "errors": [message], **extra}, status_code=status)


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError(413, "too_large", [f"body: {declared} bytes is over the {limit} byte limit"])
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(413, "too_large", [f"body: over the {limit} byte limit"])
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(sidecar: Sidecar) -> Starlette:
    """The ASGI app; the sidecar is started by the caller and stopped when the app shuts down."""
    settings = sidecar.settings
    limit = settings.max_body_bytes

    async def events(request: Request) -> Response:
        try:
            body = await _body(request, limit)
            accepted, new = await asyncio.wrap_future(sidecar.submit_events(body))
        except InputError as exc:
            if exc.reason == "too_large":
                sidecar.reject("too_large")
            return ORJSONResponse(exc.body(), status_code=exc.status)
        except Exception as exc:  # nothing was acknowledged: serving keeps the batch and retries
            return _error(503, f"events not stored: {exc}")
        sidecar.ingested(new)
        return ORJSONResponse({"accepted": accepted, "new": sum(new.values())})

    async def feedback(request: Request) -> Response:
        try:
            body = await _body(request, limit)
            items, single = parse_feedback(body)
            result = await run_in_threadpool(sidecar.feedback, items, single)
        except InputError as exc:
            if exc.reason != "invalid_label":
                sidecar.reject(exc.reason, exc.rejected)
            return ORJSONResponse(exc.body(), status_code=exc.status)
        return ORJSONResponse(result)

    async def status(request: Request) -> Response:
        return ORJSONResponse(await run_in_threadpool(sidecar.status))

    async def check(request: Request) -> Response:
        model = request.query_params.get("model")
        if model is not None and model not in sidecar.evaluator.models(refresh=True):
            return _error(404, f"model: no events of model {model!r} to check")
        await run_in_threadpool(sidecar.evaluator.check, [model] if model else None)
        return ORJSONResponse(await run_in_threadpool(sidecar.status))

    async def report(request: Request) -> Response:
        model = request.path_params.get("model") or request.query_params.get("model")
        if model is None:
            models = sidecar.evaluator.models()
            if len(models) != 1:
                return _error(400, "model: name the model (?model=NAME); this sidecar watches "
                                   f"{', '.join(models) or 'no model with events yet'}")
            model = models[0]
        path = latest_report(settings.reports_dir, model)
        if path is None:
            return _error(404, f"no drift report for model {model!r} yet (one is written after "
                               f"the first judged drift check)")
        return FileResponse(path, media_type="text/html")

    async def retrain(request: Request) -> Response:
        try:
            data = orjson.loads(await _body(request, limit) or b"{}")
        except orjson.JSONDecodeError:
            return _error(400, "body: invalid JSON")
        if not isinstance(data, dict) or not isinstance(data.get("model"), str) or not data["model"]:
            return _error(422, "model: required, the name of the model to retrain")
        reason = data.get("reason") or "manual request"
        if not isinstance(reason, str):
            return _error(422, "reason: must be a string")
        try:
            outcome = await run_in_threadpool(sidecar.retrain, data["model"], reason)
        except InputError as exc:
            return ORJSONResponse(exc.body(), status_code=exc.status)
        code = {"running": 202, "skipped": 409, "failed": 502}[outcome.status]
        return ORJSONResponse(outcome.as_dict(), status_code=code)

    async def alertmanager(request: Request) -> Response:
        try:
            body = await _body(request, limit)
            result = await run_in_threadpool(sidecar.alertmanager, body)
        except InputError as exc:
            return ORJSONResponse(exc.body(), status_code=exc.status)
        return ORJSONResponse(result)

    async def jobs(request: Request) -> Response:
        records = await run_in_threadpool(sidecar.store.jobs, request.query_params.get("model"))
        return ORJSONResponse({"jobs": [r.__dict__ for r in records]})

    async def export_labelled(request: Request) -> Response:
        model = request.query_params.get("model")
        if not model:
            return _error(422, "model: required")
        try:
            since = float(request.query_params.get("since", 0))
            limit_rows = int(request.query_params.get("limit", 100_000))
        except ValueError:
            return _error(422, "since/limit: must be numbers")
        data = await run_in_threadpool(_labelled_parquet, sidecar, model, since, limit_rows)
        if data is None:
            return _error(404, f"model: no labelled events of model {model!r}")
        return Response(data, media_type="application/vnd.apache.parquet")

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(sidecar.prometheus), media_type=CONTENT_TYPE_LATEST)

    async def live(request: Request) -> Response:
        return ORJSONResponse({"status": "alive"})

    async def ready(request: Request) -> Response:
        if sidecar.ready:
            return ORJSONResponse({"status": "ready"})
        return ORJSONResponse({"status": "not ready"}, status_code=503)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # uvicorn has finished the in-flight requests: flush and close
        await run_in_threadpool(sidecar.stop)

    routes = [
        Route("/events", events, methods=["POST"]),
        Route("/feedback", feedback, methods=["POST"]),
        Route("/status", status, methods=["GET"]),
        Route("/check", check, methods=["POST"]),
        Route("/reports/drift/latest", report, methods=["GET"]),
        Route("/reports/drift/{model}/latest", report, methods=["GET"]),
        Route("/retrain", retrain, methods=["POST"]),
        Route("/alertmanager", alertmanager, methods=["POST"]),
        Route("/jobs", jobs, methods=["GET"]),
        Route("/export/labelled", export_labelled, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/live", live, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def _labelled_parquet(sidecar: Sidecar, model: str, since: float, limit: int) -> bytes | None:
    """Labelled events of ``model`` as Parquet: the features (by the version's names), the label
    and prediction in the reference sample's columns, ``version`` and ``timestamp``."""
    import pandas as pd

    from modelloop.schemas import REF_LABEL, REF_PREDICTION

    frames = []
    for version in sidecar.store.versions(model, since):
        win = sidecar.store.labelled_version(model, version, since, limit)
        if not len(win) or win.features is None:
            continue
        names = sidecar.catalog.metadata(model, version).feature_names
        df = pd.DataFrame(win.features, columns=names)
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
