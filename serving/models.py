"""Which model version a worker serves, and the zero-downtime swap to a new one.

:class:`ModelManager` follows an alias (``production`` by default) in the registry. When the alias
moves, it loads and warms the new version beside the old one (on a thread, so requests keep being
served), checks it on its reference rows (:func:`load_checked`), then swaps one reference.
Requests already validated against the old version still run on it (the batcher keeps each
request with the runtime it was checked against), so no request fails or sees a schema it was not
checked against; the old session is freed when the last of them is done. A version that fails to
load or to pass its check (the alias may have been written by hand, or the file damaged after
promotion), and an alias that names no registered version, are logged, counted in
``modelloop_serving_reloads_total{result="failure"}`` by reason (``broken``, ``missing_version``,
``unresolved``), shown in :meth:`ModelManager.status`, and not tried again until the alias moves
once more; the old version keeps serving.

Example::

    manager = ModelManager(Registry(settings.registry_dir), settings, metrics, name="churn")
    manager.load_initial()              # raises ModelLoadError
    await manager.check_alias()         # swaps when the alias moved (serving/repository.py polls)
    manager.current                     # the OnnxRuntime to use for the next request
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelloop.registry import BrokenVersion, ModelVersion, Registry, RegistryError
from modelloop.verify import check_outputs
from serving.metrics import ServingMetrics
from serving.runtime import ModelLoadError, OnnxRuntime
from serving.settings import ServingSettings

logger = logging.getLogger(__name__)

RuntimeFactory = Callable[[ModelVersion], OnnxRuntime]


def resolve_model_name(registry: Registry, name: str | None) -> str:
    """The model a batch command (``modelloop batch score`` and ``explain``) uses: ``name``,
    or the registry's only model (``modelloop serve`` serves every model instead:
    :func:`serving.repository.served_names`)."""
    if name:
        return name
    models = registry.models()
    if len(models) == 1:
        return models[0]
    if not models:
        raise ModelLoadError(f"no model is registered under {registry.root}")
    raise ModelLoadError(f"which model? pass --name (or set MODELLOOP_SERVING_MODEL); "
                         f"registered models: {', '.join(models)}")


def runtime_factory(settings: ServingSettings) -> RuntimeFactory:
    """OnnxRuntime instances configured from the settings."""

    def make(version: ModelVersion) -> OnnxRuntime:
        return OnnxRuntime(version, provider=settings.providers, threads=settings.ort_threads(),
                           io_binding=settings.io_binding, device_id=settings.device_id)

    return make


def load_checked(factory: RuntimeFactory, version: ModelVersion) -> OnnxRuntime:
    """Load ``version`` and check it on the session that will serve it, on its provider: run on
    its reference rows, outputs finite and consistent with the sample (``modelloop.verify``).
    Raises ModelLoadError, whose one-line message names the file and why."""
    runtime = factory(version).load()
    try:
        check_outputs(version, runtime.predict)
    except BrokenVersion as exc:
        runtime.unload()
        raise ModelLoadError(str(exc)) from exc
    return runtime


@dataclass
class ReloadStatus:
    """The outcome of the last alias check that found a new version."""

    version: int | None = None
    result: str = ""  # "success" | "failure" | ""
    error: str = ""
    at: float = 0.0


class ModelManager:
    """Serves the version an alias points at and swaps without downtime (module docstring)."""

    def __init__(self, registry: Registry, settings: ServingSettings, metrics: ServingMetrics,
                 factory: RuntimeFactory | None = None, *, name: str, alias: str | None = None,
                 publish: bool = True) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.factory = factory or runtime_factory(settings)
        self.name = name
        self.alias = alias or settings.alias
        """The alias followed: ``MODELLOOP_SERVING_ALIAS``, or ``canary`` for a canary."""
        self.publish = publish
        """Whether the version it holds shows in ``modelloop_serving_model_info`` (a shadow
        challenger answers nobody: it does not)."""
        self._current: OnnxRuntime | None = None
        self._stamp: int | None = None
        self._failed: set[int] = set()
        self._lock = asyncio.Lock()
        self.last_reload = ReloadStatus()

    @property
    def current(self) -> OnnxRuntime:
        runtime = self._current
        if runtime is None:
            raise RuntimeError("no model is loaded yet")
        return runtime

    @property
    def ready(self) -> bool:
        return self._current is not None and self._current.ready

    def load_initial(self) -> OnnxRuntime:
        """Load and check the version the alias names; raises ModelLoadError."""
        self._stamp = self.registry.alias_stamp(self.name)
        try:
            version = self.registry.get(self.name, self.alias)
        except RegistryError as exc:
            raise ModelLoadError(
                f"{exc} (MODELLOOP_SERVING_ALIAS={self.alias}); promote a version with "
                f"`modelloop models promote {self.name} <version>`"
            ) from exc
        runtime = load_checked(self.factory, version)
        self._install(runtime)
        return runtime

    def _install(self, runtime: OnnxRuntime) -> None:
        old = self._current
        self._current = runtime  # one reference assignment: the swap
        previous = (old.model_version, old.active_provider) if old is not None else None
        if self.publish:
            self.metrics.set_model(runtime.name, runtime.model_version, runtime.active_provider, previous)

    async def check_alias(self) -> None:
        """Swap when the alias moved since the last check (the repository polls this)."""
        stamp = self.registry.alias_stamp(self.name)
        if stamp != self._stamp:
            self._stamp = stamp
            await self.refresh()

    async def refresh(self, *, force: bool = False) -> dict[str, Any]:
        """Load the version the alias points at if it is not served yet; returns the status."""
        async with self._lock:
            alias = self.alias
            number: int | None = None
            try:
                number = self.registry.resolve(self.name, alias)
                if number not in self.registry.version_numbers(self.name):
                    return self._failure(number, "missing_version",
                                         f"alias {alias!r} of {self.name} points at v{number}, "
                                         f"which is not registered")
                version = self.registry.get(self.name, number)
            except RegistryError as exc:
                return self._failure(number, "unresolved",
                                     f"alias {alias!r} of {self.name} cannot be resolved: {exc}")
            if number == self.current.model_version or (number in self._failed and not force):
                return self.status()
            logger.info("%s: alias %r moved to v%d; loading it beside v%d", self.name,
                        self.alias, number, self.current.model_version)
            loop = asyncio.get_running_loop()
            try:
                runtime = await loop.run_in_executor(None, load_checked, self.factory, version)
            except Exception as exc:
                self._failed.add(number)
                return self._failure(number, "broken", f"{self.name}: v{number} failed to load "
                                                       f"or its check: {exc}", str(exc))
            old = self.current
            self._install(runtime)
            self._failed.discard(number)
            self.last_reload = ReloadStatus(number, "success", "", time.time())
            self.metrics.reloads.labels(model=self.name, result="success", reason="swapped").inc()
            logger.info("%s: now serving v%d (was v%d)", self.name, number, old.model_version)
            # requests already queued for `old` keep their reference; it is freed after them
            return self.status()

    def _failure(self, number: int | None, reason: str, message: str,
                 error: str | None = None) -> dict[str, Any]:
        """Record a swap that did not happen: logged, counted by ``reason``, kept in the status
        (``error``, the message by default); the current version keeps serving."""
        self.last_reload = ReloadStatus(number, "failure", error or message, time.time())
        self.metrics.reloads.labels(model=self.name, result="failure", reason=reason).inc()
        logger.error("%s; still serving v%d", message, self.current.model_version)
        return self.status()

    def status(self) -> dict[str, Any]:
        rt = self._current
        return {
            "model": self.name,
            "alias": self.alias,
            "version": rt.model_version if rt else None,
            "provider": rt.active_provider if rt else None,
            "ready": self.ready,
            "last_reload": {
                "version": self.last_reload.version,
                "result": self.last_reload.result or None,
                "error": self.last_reload.error or None,
                "at": self.last_reload.at or None,
            },
        }

    async def close(self) -> None:
        """Unload, after a swap in progress (it holds the lock) has finished."""
        async with self._lock:
            self.unload()

    def unload(self) -> None:
        """Stop serving: drop the session. A request or batch job still holding it keeps it
        until it is done (the same as after a swap); then it is freed."""
        runtime = self._current
        if runtime is not None:
            self._current = None
            if self.publish:
                self.metrics.model_info.labels(model=self.name, version=str(runtime.model_version),
                                               provider=runtime.active_provider).set(0)
