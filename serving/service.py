"""The BentoML service: ``bentoml serve serving.service:ModelService`` (or ``modelloop serve``).

BentoML runs the processes (its arbiter, one uvicorn worker per core sharing the socket), the
lifecycle, ``/metrics`` (its built-ins plus our catalog, summed over workers through its
multiprocess directory), ``/healthz``, ``/livez``, ``/readyz``, its docs UI, and
``bentoml build``. The prediction routes are our Starlette app (``serving/app.py``).

Why a front door: BentoML wraps every request in OpenTelemetry tracing, its own HTTP metrics and a
context middleware. For a small model that costs about three quarters of the throughput (profile
in docs/serving.md), so by default (``MODELLOOP_SERVING_FAST_PATH=true``) :class:`FrontDoor`
sends our route prefixes straight to our app and everything else through BentoML's whole stack.
With the fast path off our app is mounted inside BentoML's app and every request takes its path.

BentoML's ``service_class`` hook is what makes this a BentoML service still: the worker loads
``ModelService``, calls :meth:`ModelloopService.to_asgi`, and serves what it returns. Settings
come from the environment (``MODELLOOP_SERVING_*``), read once per worker here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import bentoml
from prometheus_client import CollectorRegistry

from serving.app import OWN_PREFIXES, build_app
from serving.settings import ServingSettings
from serving.state import ServingState

logger = logging.getLogger(__name__)


class FrontDoor:
    """ASGI dispatch: our prefixes to our app, the rest (and lifespan) to BentoML's."""

    def __init__(self, ours: Any, bento: Any, prefixes: tuple[str, ...] = OWN_PREFIXES) -> None:
        self.ours = ours
        self.bento = bento
        self.prefixes = prefixes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefixes):
            await self.ours(scope, receive, send)
        else:
            await self.bento(scope, receive, send)


class ModelloopService(bentoml.Service):
    """A BentoML service whose ASGI app is our routes in front of (or inside) BentoML's."""

    def to_asgi(self, is_main: bool = True) -> Any:
        settings = ServingSettings()
        logging.getLogger("serving").setLevel(settings.log_level)
        state = ServingState(settings, CollectorRegistry(auto_describe=True))
        ours = build_app(state)
        if not settings.fast_path:
            self.mount_asgi_app(ours, path="/", name="modelloop")
        bento = super().to_asgi(is_main)
        bento_lifespan = bento.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            # the model loads before BentoML marks the worker ready (/readyz)
            await state.start()
            try:
                async with bento_lifespan(app):
                    yield
            finally:
                await state.stop()

        bento.router.lifespan_context = lifespan
        return FrontDoor(ours, bento) if settings.fast_path else bento


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
