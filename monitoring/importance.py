"""Global feature importance of a model version, for the drift report: each feature's mean
absolute SHAP attribution (:func:`modelloop.explain.global_importance`) over the version's
reference sample, computed once per version on its ONNX graph and kept.

It is asked for in the report's thread (off the check's path, at the report's bounded rate) and
computed in a child process at nice 10, started for it and gone after: shap compiles its kernels
on its first use in a process (about 13 s of Python holding the GIL), which in the sidecar's own
process would stall ingest and feedback meanwhile. The first report of a version pays for it,
later ones read it from the cache. A version that cannot be explained (a sequence model, no
reference sample) has no importance, and the report says why; a computation that failed is not
kept (the next report tries again).

Example::

    importance = version_importance(registry, "churn", 3)     # ImportanceResult
    importance.values["f02"]                                  # 0.071
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from modelloop.children import low_priority_child
from modelloop.explain import NotExplainable, check_explainable, global_importance, session_runner
from modelloop.registry import Registry, RegistryError

log = logging.getLogger(__name__)
KEPT = 32
"""Versions whose importance is kept (a few dozen floats each)."""


@dataclass(frozen=True)
class ImportanceResult:
    """A version's importance by feature, or why it has none (``note``)."""

    values: dict[str, float] = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0
    failed: bool = False
    """It could have been computed but was not (kept out of the cache: tried again next time)."""


_cache: dict[tuple[str, str, int], ImportanceResult] = {}
_lock = threading.Lock()


def version_importance(registry: Registry, model: str, version: int, *,
                       nice: int = 10) -> ImportanceResult:
    """The importance of ``model`` v``version`` (computed on its first call, in a child process
    at ``nice``, then cached)."""
    key = (str(registry.root), model, version)
    with _lock:  # one computation per version, even if two report threads ask at once
        found = _cache.get(key)
        if found is None:
            found = (_unexplainable(registry, model, version)
                     or _in_child(str(registry.root), model, version, nice))
            if not found.failed:
                _cache[key] = found
            while len(_cache) > KEPT:
                del _cache[next(iter(_cache))]
        return found


def _unexplainable(registry: Registry, model: str, version: int) -> ImportanceResult | None:
    """Why the version has no importance, when its metadata says so (a sequence model, one with
    categorical features): no child process is started for it."""
    try:
        check_explainable(registry.get(model, version).metadata)
    except (NotExplainable, RegistryError) as exc:
        return ImportanceResult(note=" ".join(str(exc).split()))
    return None


def _in_child(root: str, model: str, version: int, nice: int) -> ImportanceResult:
    """:func:`_compute` in a child process (module docstring)."""
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=low_priority_child, initargs=(nice, os.getpid())) as pool:
            return pool.submit(_compute, root, model, version).result()
    except Exception as exc:  # the child died (memory, a signal): the report says so
        log.exception("global importance of %s v%d: its process failed", model, version)
        return ImportanceResult(note=f"computing it failed: {type(exc).__name__}: {exc}", failed=True)


def _compute(root: str, model: str, version: int) -> ImportanceResult:
    import shap  # heavy (numba): in the child

    started = time.perf_counter()
    registry = Registry(root)
    try:
        mv = registry.get(model, version)
        values = global_importance(session_runner(mv), mv.metadata, mv.reference(), shap=shap)
    except (NotExplainable, RegistryError) as exc:
        return ImportanceResult(note=" ".join(str(exc).split()))
    except Exception as exc:  # the drift report is still written, saying why this is missing
        log.exception("global importance of %s v%d failed", model, version)
        return ImportanceResult(note=f"computing it failed: {type(exc).__name__}: {exc}", failed=True)
    seconds = time.perf_counter() - started
    log.info("global importance of %s v%d computed in %.1f s", model, version, seconds)
    return ImportanceResult(values, seconds=seconds)
