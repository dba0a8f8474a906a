"""Global feature importance of a model version, for the drift report: each feature's mean
absolute SHAP attribution (:func:`modelloop.explain.global_importance`) over the version's
reference sample, computed once per version on its ONNX graph and kept.

It runs in the report's thread (off the check's path, at the report's bounded rate): the first
report of a version pays for it (seconds: shap compiles its kernels on its first use in the
process), later ones read it from the cache. A version that cannot be explained (a sequence model,
no reference sample) has no importance; the report says why.

Example::

    importance = version_importance(registry, "churn", 3)     # ImportanceResult
    importance.values["f02"]                                  # 0.071
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from modelloop.explain import NotExplainable, global_importance, session_runner
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


_cache: dict[tuple[str, str, int], ImportanceResult] = {}
_lock = threading.Lock()


def version_importance(registry: Registry, model: str, version: int) -> ImportanceResult:
    """The importance of ``model`` v``version`` (computed on its first call, then cached)."""
    key = (str(registry.root), model, version)
    with _lock:  # one computation per version, even if two report threads ask at once
        found = _cache.get(key)
        if found is None:
            found = _cache[key] = _compute(registry, model, version)
            while len(_cache) > KEPT:
                del _cache[next(iter(_cache))]
        return found


def _compute(registry: Registry, model: str, version: int) -> ImportanceResult:
    import shap  # heavy (numba): at the first report that needs it

    started = time.perf_counter()
    try:
        mv = registry.get(model, version)
        values = global_importance(session_runner(mv), mv.metadata, mv.reference(), shap=shap)
    except (NotExplainable, RegistryError) as exc:
        return ImportanceResult(note=" ".join(str(exc).split()))
    except Exception as exc:  # the drift report is still written, saying why this is missing
        log.exception("global importance of %s v%d failed", model, version)
        return ImportanceResult(note=f"computing it failed: {type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - started
    log.info("global importance of %s v%d computed in %.1f s", model, version, seconds)
    return ImportanceResult(values, seconds=seconds)
