"""The BentoML service: ``bentoml serve serving.service:ModelService`` (or ``modelloop serve``).

BentoML runs the processes (its arbiter, one uvicorn worker per core sharing the socket), the
lifecycle, ``/metrics`` (its built-ins plus our catalog, summed over workers through its
multiprocess directory), ``/healthz``, ``/livez``, ``/readyz``, its docs UI, and
``bentoml build``. The prediction routes are our Starlette app (``serving/app.py``).

Why a front door: BentoML wraps every request in OpenTelemetry tracing, its own HTTP metrics and a
context middleware. For a small model that costs about three quarters of the throughput (profile
in docs/serving.md), so by default (``MODELLOOP_SERVING_FAST_PATH=true``) :class:`FrontDoor`
sends our route prefixes straight to our app, BentoML's own routes through BentoML's whole stack,
and any other path to our app, which refuses it in the shared JSON error body.
With the fast path off our app is mounted inside BentoML's app and every request takes its path.

BentoML's ``service_class`` hook is what makes this a BentoML service still: the worker loads
``ModelService``, calls :meth:`ModelloopService.to_asgi`, and serves what it returns. Settings
come from the environment (``MODELLOOP_SERVING_*``), read once per worker here.

A worker whose model cannot load or fails its check at start-up (``production`` moved to a broken
version behind the registry's back, then a worker was respawned) logs the reason in one line and
stops the whole server (:func:`stop_server`) instead of failing with a traceback and being
respawned forever; ``modelloop serve`` then exits non-zero with that line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bentoml
from prometheus_client import CollectorRegistry
from starlette.routing import Match

from serving.app import OWN_PREFIXES, build_app
from serving.openapi import merge_into
from serving.runtime import ModelLoadError
from serving.settings import ServingSettings
from serving.state import ServingState

logger = logging.getLogger(__name__)
BENTOML_WORKER = "_bentoml_impl.worker.service"  # the module BentoML's arbiter runs as a worker
GRPC_GRACE_S = 5.0  # how long gRPC calls in flight may finish when a worker stops


def startup_failure_file(server_pid: int) -> Path:
    """Where a worker that could not start leaves its reason for ``modelloop serve`` (the arbiter,
    process ``server_pid``) to print as it exits."""
    return Path(tempfile.gettempdir()) / f"modelloop-serve-{server_pid}.failed"


def unloaded_models_file(server_pid: int) -> Path:
    """Where the workers of server ``server_pid`` list the models unloaded through
    ``POST /v2/repository/models/{name}/unload``, so that every worker follows (one server's,
    gone with it: ``modelloop serve`` removes it)."""
    return Path(tempfile.gettempdir()) / f"modelloop-serve-{server_pid}.unloaded.json"


def stop_server(reason: str) -> None:
    """In a BentoML worker: log ``reason`` in one line, leave it for ``modelloop serve``, ask the
    arbiter (the parent process) to stop the server and exit, since a respawned worker would fail
    the same way forever. Anywhere else (the app run in-process) it returns at once."""
    server = os.getppid()
    if not _in_bentoml_worker():
        return
    logger.error("%s; stopping the server", reason)
    with contextlib.suppress(OSError):
        startup_failure_file(server).write_text(reason)
    os.kill(server, signal.SIGTERM)  # circus stops the other workers gracefully
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(3)  # no traceback: the line above says it all


def _in_bentoml_worker() -> bool:
    """Whether this process is a worker of BentoML's arbiter (its parent)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == BENTOML_WORKER and os.getppid() > 1


class FrontDoor:
    """ASGI dispatch: our prefixes to our app; BentoML's own routes (``/healthz``, ``/metrics``,
    its docs UI) and lifespan to BentoML's app; any other path to ours too, which answers it
    with the shared JSON error (404 ``not_found``) where BentoML would answer in plain text."""

    def __init__(self, ours: Any, bento: Any, prefixes: tuple[str, ...] = OWN_PREFIXES) -> None:
        self.ours = ours
        self.bento = bento
        self.prefixes = prefixes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (scope["path"].startswith(self.prefixes)
                                        or not self._bentos(scope)):
            await self.ours(scope, receive, send)
        else:
            await self.bento(scope, receive, send)

    def _bentos(self, scope: dict[str, Any]) -> bool:
        """Whether one of BentoML's routes takes the path (whatever the method: BentoML answers
        a wrong method on its own routes), or takes it with its trailing slash added or removed
        (BentoML's router redirects ``/healthz/`` to ``/healthz``)."""
        path = scope["path"]
        paths = [path] if path == "/" else [path, path[:-1] if path.endswith("/") else path + "/"]
        return any(route.matches({**scope, "path": p})[0] is not Match.NONE
                   for p in paths for route in self.bento.router.routes)


class ModelloopService(bentoml.Service):
    """A BentoML service whose ASGI app is our routes in front of (or inside) BentoML's."""

    def to_asgi(self, is_main: bool = True) -> Any:
        settings = ServingSettings()
        logging.getLogger("serving").setLevel(settings.log_level)
        state = ServingState(settings, CollectorRegistry(auto_describe=True))
        if _in_bentoml_worker():
            state.repository.unloaded_file = unloaded_models_file(os.getppid())
        ours = build_app(state)
        if not settings.fast_path:
            self.mount_asgi_app(ours, path="/", name="modelloop")
        bento = super().to_asgi(is_main)
        # /docs.json (BentoML's view of openapi_spec, below): built once, here
        self._docs = merge_into(super().openapi_spec.asdict(), ours.state.openapi)
        bento_lifespan = bento.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            # the model loads before BentoML marks the worker ready (/readyz)
            try:
                await state.start()
            except ModelLoadError as exc:
                stop_server(str(exc))
                raise
            grpc_server = None
            if settings.grpc_port:
                # grpc and the protocol's messages load only when the port is set
                from serving.oip_grpc import start_grpc_server

                try:
                    grpc_server = await start_grpc_server(state)
                except RuntimeError as exc:  # the port is taken by another program
                    stop_server(f"MODELLOOP_SERVING_GRPC_PORT: {exc}")
                    raise
            try:
                async with bento_lifespan(app):
                    yield
            finally:
                if grpc_server is not None:
                    await grpc_server.stop(GRPC_GRACE_S)
                await state.stop()

        bento.router.lifespan_context = lifespan
        return FrontDoor(ours, bento) if settings.fast_path else bento

    @property
    def openapi_spec(self) -> Any:
        """What BentoML's ``/docs.json`` answers: its document with ours merged in, once the app
        is made (``bentoml build``, which writes the document too, gets BentoML's alone)."""
        docs = getattr(self, "_docs", None)
        return super().openapi_spec if docs is None else _Document(docs)


class _Document:
    """A finished document where BentoML expects its ``OpenAPISpecification`` (``.asdict()``)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self._doc = doc

    def asdict(self) -> dict[str, Any]:
        return self._doc


@bentoml.service(
    name="modelloop",
    service_class=ModelloopService,
    workers="cpu_count",
    # our routes log through the "serving" logger; BentoML's access log would double it
    logging={"access": {"enabled": False}},
    traffic={"timeout": 300},
)
class ModelService:
    """Serves the registry's production model on ONNX Runtime (routes: serving/app.py)."""
