"""The models one worker serves: a repository of :class:`ServedModel`, one per registered model.

Each served model follows its own alias with its own :class:`~serving.models.ModelManager` (and
its zero-downtime swap) and runs through its own :class:`~serving.batcher.AdaptiveBatcher`.
Which models are served: ``MODELLOOP_SERVING_MODELS`` (names or globs, comma-separated; every
registered model by default); the default model (``/predict``) is ``MODELLOOP_SERVING_MODEL``,
or the only one served.

A model loads on its first request (or on ``POST /v2/repository/models/{name}/load``); beyond
``MODELLOOP_SERVING_MAX_LOADED_MODELS`` the least recently used one is unloaded, and loads again
on its next request. An unload, by the budget or by ``.../unload``, first stops admitting
requests to that model, then waits for its requests in flight, then stops its batcher and frees
its session: no request in flight fails. After an explicit unload the model answers 503 until it
is loaded again. A model that fails to load (or its check, :mod:`modelloop.verify`) answers 503
with the reason, and is tried again when its alias moves or on an explicit load; the others keep
serving.

Example::

    repo = ModelRepository(registry, settings, metrics, make_batcher)
    await repo.start()                  # loads the default model (raises ModelLoadError)
    served = await repo.acquire("fraud")  # loads it if needed; ModelUnavailable, ModelNotFound
    try:
        result = await served.batcher.predict(served.manager.current, x)
    finally:
        repo.release(served)
    await repo.unload("fraud")          # waits for requests in flight
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from modelloop.registry import Registry, atomic_write_bytes
from modelloop.schemas import ALIAS_CHALLENGER, ModelMetadata
from serving.batcher import AdaptiveBatcher
from serving.canary import ALIAS_CANARY, Canary, Lane, canary_bucket
from serving.events import EventEmitter
from serving.metrics import ServingMetrics
from serving.models import ModelManager, RuntimeFactory
from serving.runtime import ModelLoadError, OnnxRuntime
from serving.settings import ServingSettings
from serving.shadow import Shadow

logger = logging.getLogger(__name__)
State = Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]


def served_names(registry: Registry, settings: ServingSettings) -> list[str]:
    """The registered models ``MODELLOOP_SERVING_MODELS`` names (read against the registry now,
    so a model registered later is served too), the default model first when it is set."""
    patterns = [p.strip() for p in settings.models.split(",") if p.strip()]
    found = [m for m in registry.models() if any(fnmatch.fnmatchcase(m, p) for p in patterns)]
    if settings.model and settings.model not in found:
        found.insert(0, settings.model)
    return found


def default_model(names: list[str], settings: ServingSettings) -> str | None:
    """The model ``/predict`` serves: ``MODELLOOP_SERVING_MODEL``, else the only one served."""
    return settings.model or (names[0] if len(names) == 1 else None)


class ModelNotFound(Exception):
    """No registered model of that name is served here."""


class ModelUnavailable(Exception):
    """The model is served here but cannot answer now: ``reason`` says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"model {name!r} is unavailable: {reason}")
        self.name = name
        self.reason = reason


class ServedModel:
    """One model of the repository: its manager, its batcher, its requests in flight."""

    def __init__(self, name: str, manager: ModelManager, batcher: AdaptiveBatcher) -> None:
        self.name = name
        self.manager = manager
        self.batcher = batcher
        self.state: State = "UNAVAILABLE"
        self.reason = "not loaded yet (it loads on its first request)"
        self.unloaded = False  # by POST .../unload: 503 until loaded again
        self.failed_stamp: Any = None  # the alias stamp of a failed load (None: not failed)
        self.users = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.last_used = 0.0
        self.lock = asyncio.Lock()
        self.canary: Canary | None = None
        """The canary version beside production (:mod:`serving.canary`), while one is served."""
        self.canary_failed: int | None = None  # a canary version that failed to load: not retried
        self.shadow: Shadow | None = None
        """The challenger scoring copies of production's traffic (:mod:`serving.shadow`)."""
        self.shadow_failed: int | None = None  # a challenger that failed to load: not retried

    @property
    def version(self) -> int | None:
        return self.manager.current.model_version if self.manager.ready else None

    def route(self, request_id: str, version: str | None = None) -> Lane:
        """Where a request runs: the canary when its id falls in the canary's share (or it asks
        for the canary's ``version``), else production. Give the lane back with :meth:`leave`."""
        canary = self.canary
        if canary is not None and (str(canary.version) == version if version else
                                   canary_bucket(request_id) < canary.share):
            canary.enter()
            return Lane(canary.manager, canary.batcher, canary)
        return Lane(self.manager, self.batcher)

    @staticmethod
    def leave(lane: Lane | None) -> None:
        if lane is not None and lane.canary is not None:
            lane.canary.leave()


class ModelRepository:
    """The served models of one worker (module docstring)."""

    def __init__(self, registry: Registry, settings: ServingSettings, metrics: ServingMetrics,
                 make_batcher: Callable[[], AdaptiveBatcher], factory: RuntimeFactory | None = None,
                 emitter: EventEmitter | None = None) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.emitter = emitter
        """Where a challenger's shadow answers go; shadow is off without one that is enabled."""
        self.make_batcher = make_batcher
        self.factory = factory
        self.default: str | None = None
        self._models: dict[str, ServedModel] = {}
        self._follow: asyncio.Task[None] | None = None
        self.unloaded_file: Path | None = None
        """Where the explicitly unloaded models are listed for every worker of the server (set
        by serving/service.py); None: this worker alone."""
        self._unloaded_stamp: int | None = None

    # -- which models --------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The models served here (:func:`served_names`)."""
        return served_names(self.registry, self.settings)

    def label(self, name: str | None) -> str:
        """The ``model`` label of a request for ``name``: only names served here, so a client
        cannot grow the metrics with made-up names."""
        if name is None:
            return self.default or ""
        return name if name in self._models else ""

    def _entry(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            if name not in self.names():
                raise ModelNotFound(name)
            manager = ModelManager(self.registry, self.settings, self.metrics, self.factory, name=name)
            model = self._models[name] = ServedModel(name, manager, self.make_batcher())
        return model

    def get(self, name: str) -> ServedModel:
        """The served model ``name`` as it is now (loaded or not); raises ModelNotFound."""
        return self._entry(name)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the default model (start-up fails with ModelLoadError when it cannot), then
        follow every loaded model's alias."""
        names = self.names()
        if not names:
            raise ModelLoadError(
                f"no model to serve: none registered under {self.registry.root} matches "
                f"MODELLOOP_SERVING_MODELS={self.settings.models!r}")
        self.default = default_model(names, self.settings)
        if self.default is not None:
            await self._load(self._entry(self.default), raise_load_error=True)
        self._follow = asyncio.create_task(self._follow_aliases(), name="modelloop-follow-aliases")

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
        for model in list(self._models.values()):
            await self._unload(model, "the server is stopping")

    @property
    def ready(self) -> bool:
        """Started, and the default model (if there is one) has loaded once."""
        return self._follow is not None

    # -- requests ------------------------------------------------------------------------------
    async def acquire(self, name: str) -> ServedModel:
        """The model ``name``, loaded, counted in flight until :meth:`release`. Raises
        ModelNotFound, or ModelUnavailable (unloaded by the API, or its load failed)."""
        model = self._entry(name)
        while model.state != "READY":
            if model.unloaded:
                raise ModelUnavailable(name, f"unloaded (POST /v2/repository/models/{name}/load loads it)")
            if model.failed_stamp is not None:
                raise ModelUnavailable(name, model.reason)
            await self._load(model)
        model.users += 1
        model.idle.clear()
        model.last_used = time.monotonic()
        return model

    def release(self, model: ServedModel) -> None:
        model.users -= 1
        if model.users == 0:
            model.idle.set()

    def shadow_of(self, runtime: OnnxRuntime) -> Shadow | None:
        """The shadow to copy a batch ``runtime`` answered to: only production's batches (a
        canary's are not the champion's answers)."""
        model = self._models.get(runtime.name)
        if model is None or model.shadow is None or runtime is not model.manager.current:
            return None
        return model.shadow

    # -- the repository extension --------------------------------------------------------------
    def index(self) -> list[dict[str, Any]]:
        """Every model served here: name, version (when loaded), state READY or UNAVAILABLE and
        the reason when unavailable."""
        out = []
        for name in self.names():
            model = self._models.get(name)
            ready = model is not None and model.state == "READY"
            reason = "" if ready else (model.reason if model is not None else "not loaded yet")
            out.append({"name": name, "version": str(model.version) if ready and model else "",
                        "state": "READY" if ready else "UNAVAILABLE", "reason": reason})
        return out

    async def load(self, name: str) -> ServedModel:
        """Load ``name`` now (again after an unload or a failed load). Raises ModelNotFound, or
        ModelUnavailable naming why it failed."""
        model = self._entry(name)
        model.unloaded = False
        model.failed_stamp = None
        self._share(name, unloaded=False)
        await self._load(model)
        return model

    async def unload(self, name: str) -> None:
        """Unload ``name`` after its requests in flight; it answers 503 until loaded again."""
        model = self._entry(name)
        model.unloaded = True
        self._share(name, unloaded=True)
        await self._unload(model, f"unloaded (POST /v2/repository/models/{name}/load loads it)")

    # -- explicit loads and unloads, shared by the workers ---------------------------------------
    def _read_unloaded(self) -> set[str]:
        try:
            return set(json.loads(self.unloaded_file.read_bytes())) if self.unloaded_file else set()
        except FileNotFoundError:
            return set()

    def _share(self, name: str, *, unloaded: bool) -> None:
        """Record an explicit unload (or the load that ends it) for the other workers, which
        follow it within ``alias_poll_interval_s``. (Two workers writing at once may lose one
        change: the API is an operator's, not a hot path.)"""
        if self.unloaded_file is None:
            return
        names = self._read_unloaded()
        names = names | {name} if unloaded else names - {name}
        atomic_write_bytes(self.unloaded_file, json.dumps(sorted(names)).encode())
        self._unloaded_stamp = os.stat(self.unloaded_file).st_mtime_ns

    async def _follow_unloads(self) -> None:
        """Apply the explicit unloads and loads another worker answered."""
        if self.unloaded_file is None:
            return
        try:
            stamp = os.stat(self.unloaded_file).st_mtime_ns
        except FileNotFoundError:
            return
        if stamp == self._unloaded_stamp:
            return
        self._unloaded_stamp = stamp
        unloaded = self._read_unloaded()
        for name in self.names():
            model = self._entry(name)
            if name in unloaded and not model.unloaded:
                model.unloaded = True
                await self._unload(model, f"unloaded (POST /v2/repository/models/{name}/load loads it)")
            elif name not in unloaded and model.unloaded:
                model.unloaded = False  # loads on its next request
                model.reason = "not loaded yet (it loads on its next request)"

    # -- loading and unloading -----------------------------------------------------------------
    async def _load(self, model: ServedModel, *, raise_load_error: bool = False) -> None:
        async with model.lock:
            if model.state == "READY":
                return
            if model.unloaded or model.failed_stamp is not None:
                raise ModelUnavailable(model.name, model.reason)
            model.state = "LOADING"
            stamp = self.registry.alias_stamp(model.name)
            try:
                # on a thread: the other models keep serving while this one loads and is checked
                runtime = await asyncio.to_thread(model.manager.load_initial)
            except ModelLoadError as exc:
                model.state, model.reason, model.failed_stamp = "UNAVAILABLE", str(exc), stamp
                logger.error("%s: cannot load: %s", model.name, exc)
                if raise_load_error:
                    raise
                raise ModelUnavailable(model.name, str(exc)) from None
            model.batcher = self.make_batcher()
            await model.batcher.start()
            model.state, model.reason = "READY", ""
            model.last_used = time.monotonic()
            logger.info("%s: loaded v%d on %s", model.name, runtime.model_version, runtime.active_provider)
        await self._evict(keep=model)

    async def _evict(self, keep: ServedModel) -> None:
        """Unload the least recently used models beyond the budget (not ``keep``)."""
        budget = self.settings.max_loaded_models
        if not budget:
            return
        while True:
            loaded = [m for m in self._models.values() if m.state == "READY" and m is not keep]
            if len(loaded) + 1 <= budget:
                return
            victim = min(loaded, key=lambda m: m.last_used)
            await self._unload(victim, "unloaded as the least recently used beyond "
                                       "MODELLOOP_SERVING_MAX_LOADED_MODELS (loads on its next request)")

    async def _unload(self, model: ServedModel, reason: str) -> None:
        async with model.lock:
            if model.state != "READY":
                model.reason = reason if model.failed_stamp is None else model.reason
                return
            model.state, model.reason = "UNLOADING", reason  # admits no new request from here
            await model.idle.wait()  # the requests in flight finish on it
            await self._close_canary(model)
            await self._close_shadow(model)
            await model.batcher.stop()
            await model.manager.close()
            model.state = "UNAVAILABLE"
            logger.info("%s: %s", model.name, reason)

    async def _follow_aliases(self) -> None:
        """Poll every loaded model's alias (swapping when it moves), and clear a failed load
        once its alias moves (its next request tries the new version)."""
        while True:
            await asyncio.sleep(self.settings.alias_poll_interval_s)
            try:
                await self._follow_unloads()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep following
                logger.exception("reading the unloaded models from %s failed", self.unloaded_file)
            for model in list(self._models.values()):
                try:
                    if model.state == "READY":
                        await model.manager.check_alias()
                        await self._follow_canary(model)
                        await self._follow_shadow(model)
                    elif model.failed_stamp is not None and \
                            self.registry.alias_stamp(model.name) != model.failed_stamp:
                        model.failed_stamp = None
                        model.reason = "its alias moved since its load failed (loads on its next request)"
                except asyncio.CancelledError:
                    raise
                except Exception:  # keep following: a registry hiccup must not stop the swaps
                    logger.exception("checking alias %r of %s failed", self.settings.alias, model.name)

    # -- the canary (serving/canary.py) ---------------------------------------------------------
    async def _follow_canary(self, model: ServedModel) -> None:
        """Load, swap, re-share or close ``model``'s canary as the registry now says."""
        target = self.registry.aliases(model.name).get(ALIAS_CANARY)
        share = self.registry.canary_share(model.name)
        wanted = target is not None and target != model.manager.current.model_version and share > 0
        canary = model.canary
        if not wanted:
            model.canary_failed = None
            await self._close_canary(model)
            return
        if canary is not None:
            canary.share = share
            await canary.manager.check_alias()  # the same zero-downtime swap as production's
            return
        if target == model.canary_failed:
            return
        manager = await self._load_side(model, ALIAS_CANARY, "production keeps all traffic")
        if manager is None:
            model.canary_failed = target
            return
        runtime = manager.current
        batcher = self.make_batcher()
        await batcher.start()
        model.canary = Canary(manager, batcher, share)
        logger.info("%s: canary v%d loaded beside v%d, share %g", model.name, runtime.model_version,
                    model.manager.current.model_version, share)

    async def _close_canary(self, model: ServedModel) -> None:
        """Stop routing to the canary at once, then close it after its requests in flight."""
        canary, model.canary = model.canary, None
        if canary is None:
            return
        version = canary.version
        await canary.close()
        if model.manager.ready and model.manager.current.model_version == version:
            # the canary was promoted: its version still serves (closing it dropped its info to 0)
            self.metrics.set_model(model.name, version, model.manager.current.active_provider, None)
        logger.info("%s: canary v%d closed; production serves all traffic", model.name, version)

    async def _load_side(self, model: ServedModel, alias: str, otherwise: str,
                         publish: bool = True) -> ModelManager | None:
        """A manager of ``model``'s version under ``alias``, loaded and checked beside
        production (on a thread); None, logged and counted, when it cannot load."""
        manager = ModelManager(self.registry, self.settings, self.metrics, self.factory,
                               name=model.name, alias=alias, publish=publish)
        try:
            await asyncio.to_thread(manager.load_initial)
        except ModelLoadError as exc:
            self.metrics.reloads.labels(model=model.name, result="failure", reason="broken").inc()
            logger.error("%s: %s version cannot load: %s; %s", model.name, alias, exc, otherwise)
            return None
        return manager

    # -- the shadow (serving/shadow.py) -----------------------------------------------------------
    async def _follow_shadow(self, model: ServedModel) -> None:
        """Load, swap or close ``model``'s shadow challenger as the registry now says."""
        emitter = self.emitter
        target = self.registry.aliases(model.name).get(ALIAS_CHALLENGER)
        wanted = (self.settings.shadow and emitter is not None and emitter.enabled
                  and target is not None and target != model.manager.current.model_version)
        shadow = model.shadow
        if not wanted:
            model.shadow_failed = None
            await self._close_shadow(model)
            return
        if shadow is not None:
            await shadow.manager.check_alias()
            unfit = _unfit(model.manager.current.metadata, shadow.manager.current.metadata)
            if unfit:  # either side moved to a version the other cannot be compared with
                logger.error("%s: %s; the shadow closes", model.name, unfit)
                model.shadow_failed = target
                await self._close_shadow(model)
            return
        if target == model.shadow_failed:
            return
        manager = await self._load_side(model, ALIAS_CHALLENGER, "production is not shadowed", publish=False)
        if manager is None:
            model.shadow_failed = target
            return
        production = model.manager.current.metadata
        challenger = manager.current.metadata
        unfit = _unfit(production, challenger)
        if unfit:
            logger.error("%s: %s; production is not shadowed", model.name, unfit)
            model.shadow_failed = target
            await manager.close()
            return
        assert emitter is not None
        model.shadow = Shadow(model.name, manager, emitter, self.metrics, self.settings.shadow_queue_rows,
                              max_call_rows=self.settings.max_batch_rows,
                              inline_below_s=self.settings.inline_below_s, share=self.settings.shadow_share)
        await model.shadow.start()
        logger.info("%s: challenger v%d shadows v%d", model.name, challenger.version, production.version)

    async def _close_shadow(self, model: ServedModel) -> None:
        shadow, model.shadow = model.shadow, None
        if shadow is not None:
            version = shadow.version
            await shadow.close()
            logger.info("%s: shadow of challenger v%d closed", model.name, version)


def _unfit(production: ModelMetadata, challenger: ModelMetadata) -> str | None:
    """Why ``challenger`` cannot shadow ``production`` (other inputs, task or classes: its
    answers could not be compared with production's), or None. Which features are categorical
    counts as the inputs too (rows with strings, or float rows); their vocabularies may differ."""
    if ((production.feature_names, production.input_dims, set(production.categories))
            == (challenger.feature_names, challenger.input_dims, set(challenger.categories))
            and production.answers_like(challenger)):
        return None
    return (f"challenger v{challenger.version} takes other inputs or answers another task or "
            f"classes than production v{production.version}")
