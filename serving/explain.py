"""Explanations of the served model: ``POST /explain``, ``/v2/models/{name}/explain`` and
``modelloop batch explain``.

Per-feature attributions (permutation SHAP, :mod:`modelloop.explain`) of the served version's
ONNX graph, with a background drawn from its reference sample. An explanation runs thousands of
graph rows and a few seconds of Python (``shap`` compiles its numba kernels on first use), so the
routes hand it to :class:`ExplainWorker`: one child process per serving worker, started on the
first explanation, that runs one explanation at a time on its own ONNX Runtime session (one
thread) at the lowest CPU priority (``explain_nice``, 19). Predictions never wait for it: not for
the event loop, not for the GIL, and the kernel gives the worker the CPU first. At most
``explain_max_pending`` explanations wait for it; more get 503 with ``Retry-After``.

Example::

    worker = ExplainWorker(settings)
    answer = await worker.explain(runtime.version, x)       # a modelloop.explain.Explanation
    body = explain_json(runtime.metadata, answer)    # per instance: values, base values, attributions
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from modelloop.children import low_priority_child
from modelloop.explain import (
    ADDITIVITY_TOL,
    Explanation,
    NotExplainable,
    background_rows,
    check_explainable,
    explain,
    explained_outputs,
    plan,
)
from modelloop.registry import ModelVersion, RegistryError
from modelloop.schemas import ModelMetadata
from serving.batch import BatchInputError, InputFile, check_columns, features_of, file_format
from serving.runtime import ModelLoadError, OnnxRuntime
from serving.settings import NanPolicy, ServingSettings
from serving.validation import RequestError

logger = logging.getLogger(__name__)
EXPLAINER = "permutation"
RETRY_AFTER_S = 1


def rows_of(meta: ModelMetadata, x: np.ndarray) -> np.ndarray:
    """A parsed request's input as rows of features (an image's pixels flattened), refusing a
    sequence model and a model with categorical features (422 naming why)."""
    try:
        check_explainable(meta)
    except NotExplainable as exc:
        raise RequestError(422, "not_explainable", "model_name", f"model_name: {exc}") from None
    return np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)


def permutations_for(settings: ServingSettings, meta: ModelMetadata, instances: int) -> int:
    """Permutations per instance within ``explain_max_evals`` (413 naming it when none fits)."""
    try:
        return plan(meta.n_features, instances, settings.explain_background_rows, settings.explain_max_evals)
    except NotExplainable as exc:
        raise RequestError(413, "too_many_evaluations", "instances",
                           f"instances: {exc} (MODELLOOP_SERVING_EXPLAIN_MAX_EVALS)") from None


# -- the child process ------------------------------------------------------------------------
_MODELS: OrderedDict[str, tuple[Any, np.ndarray]] = OrderedDict()
"""In the child: the latest versions' (runtime, background) by folder (versions never change)."""
_MODELS_KEPT = 4


def _model_in_child(version: ModelVersion, background: int) -> tuple[Any, np.ndarray]:
    key = f"{version.path}:{background}"
    if key not in _MODELS:
        runtime = OnnxRuntime(version, provider="cpu", threads=1, warmup_rows=(1, 2)).load()
        try:
            reference = version.reference()
        except RegistryError as exc:
            raise NotExplainable(f"{version.name} v{version.version}: {exc}; the background "
                                 "is drawn from it") from None
        _MODELS[key] = (runtime, background_rows(reference, version.metadata.feature_names, background))
        while len(_MODELS) > _MODELS_KEPT:
            _MODELS.popitem(last=False)
    _MODELS.move_to_end(key)
    return _MODELS[key]


def explain_in_child(version: ModelVersion, x: np.ndarray, background: int, permutations: int) -> Explanation:
    """Run in the child process: the explanation of ``x`` on ``version``'s graph."""
    import shap  # heavy (numba): in the child, at its first explanation

    runtime, bg = _model_in_child(version, background)
    return explain(runtime.predict, version.metadata, x, bg, permutations=permutations, shap=shap)


class ExplainWorker:
    """The child process that explanations run in (module docstring); its queue is bounded."""

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        self._pool: ProcessPoolExecutor | None = None
        self._pending = 0

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: the serving worker runs threads, which a forked child must not inherit
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=low_priority_child,
                                             initargs=(self.settings.explain_nice, os.getpid()))
        return self._pool

    async def explain(self, version: ModelVersion, x: np.ndarray) -> Explanation:
        """The explanation of ``x`` (rows of features) on ``version``; RequestError when it is
        refused (422 not explainable, 413 over the budget, 503 while too many wait)."""
        s = self.settings
        permutations = permutations_for(s, version.metadata, len(x))
        if self._pending >= s.explain_max_pending:
            raise RequestError(503, "overloaded", "body",
                               f"body: {self._pending} explanations are waiting (the most, "
                               "MODELLOOP_SERVING_EXPLAIN_MAX_PENDING); retry later",
                               {"Retry-After": str(RETRY_AFTER_S)})
        self._pending += 1
        pool = self._executor()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(pool, explain_in_child, version, x,
                                              s.explain_background_rows, permutations)
        except NotExplainable as exc:
            raise RequestError(422, "not_explainable", "model_name", f"model_name: {exc}") from None
        except BrokenProcessPool:
            logger.error("the explanation process died; a new one starts with the next explanation")
            if self._pool is pool:  # (a late failure of an older pool leaves a new one alone)
                self._pool = None
            raise RequestError(503, "explainer_restarted", "body",
                               "body: the explanation process stopped (see the server log); retry",
                               {"Retry-After": str(RETRY_AFTER_S)}) from None
        except (ModelLoadError, MemoryError) as exc:  # the version, not the request, is at fault
            logger.error("%s v%d cannot be explained here: %s", version.name, version.version, exc)
            raise RequestError(503, "not_explainable_here", "model_name",
                               f"model_name: {version.name} v{version.version} cannot be explained by "
                               f"this server now ({type(exc).__name__}: {exc})",
                               {"Retry-After": str(RETRY_AFTER_S)}) from None
        finally:
            self._pending -= 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


# -- answers ----------------------------------------------------------------------------------
def _checked(meta: ModelMetadata, expl: Explanation) -> np.ndarray:
    error = expl.additivity_error
    if (error > ADDITIVITY_TOL).any():
        logger.warning("%s v%d: an explanation does not add up to the output (error %.3g > %g)",
                       meta.name, meta.version, float(error.max()), ADDITIVITY_TOL)
    return error


def explain_json(meta: ModelMetadata, expl: Explanation) -> dict[str, Any]:
    """``POST /explain``'s answer (without model, version and request id): per instance, each
    explained output's value, base value and attributions by feature, and the additivity error
    ``max |base + sum(attributions) - value|``."""
    names, outputs = meta.feature_names, explained_outputs(meta)
    error = _checked(meta, expl)
    explanations = []
    for i in range(len(expl.values)):
        explanations.append({
            "values": dict(zip(outputs, expl.values[i].tolist(), strict=True)),
            "base_values": dict(zip(outputs, expl.base_values[i].tolist(), strict=True)),
            "attributions": {out: dict(zip(names, expl.attributions[i, :, k].tolist(), strict=True))
                             for k, out in enumerate(outputs)},
            "additivity_error": float(error[i]),
        })
    return {**_about(expl), "explanations": explanations}


def _about(expl: Explanation) -> dict[str, Any]:
    return {"explainer": EXPLAINER, "background_rows": expl.background_rows, "permutations": expl.permutations,
            "evaluations_per_instance": expl.evaluations, "additivity_tolerance": ADDITIVITY_TOL}


def oip_explain_json(meta: ModelMetadata, expl: Explanation, request_id: str) -> dict[str, Any]:
    """``/v2/models/{name}/explain``'s answer in the Open Inference Protocol's response shape:
    tensors ``attributions`` ``[rows, features, outputs]``, ``base_values`` and ``values``
    ``[rows, outputs]``; the feature and output names in ``parameters``."""
    error = _checked(meta, expl)

    def tensor(name: str, value: np.ndarray) -> dict[str, Any]:
        return {"name": name, "datatype": "FP64", "shape": list(value.shape), "data": value.ravel().tolist()}

    return {
        "model_name": meta.name, "model_version": str(meta.version), "id": request_id,
        "parameters": {**_about(expl), "feature_names": meta.feature_names,
                       "output_names": explained_outputs(meta),
                       "additivity_error": float(error.max(initial=0.0))},
        "outputs": [tensor("attributions", expl.attributions), tensor("base_values", expl.base_values),
                    tensor("values", expl.values)],
    }


# -- files --------------------------------------------------------------------------------------
ATTRIBUTION_SEP = "__"


def explanation_columns(meta: ModelMetadata, expl: Explanation) -> dict[str, np.ndarray]:
    """The output columns of ``batch explain``: per explained output ``<output>`` and
    ``<output>__base``, and per feature ``<output>__<feature>``; then ``additivity_error``."""
    cols: dict[str, np.ndarray] = {}
    for k, out in enumerate(explained_outputs(meta)):
        cols[out] = expl.values[:, k]
        cols[f"{out}{ATTRIBUTION_SEP}base"] = expl.base_values[:, k]
        for j, feature in enumerate(meta.feature_names):
            cols[f"{out}{ATTRIBUTION_SEP}{feature}"] = expl.attributions[:, j, k]
    cols["additivity_error"] = _checked(meta, expl)
    return cols


def explain_file(input_path: Path, output: Path, runtime: OnnxRuntime, *, background: int,
                 max_evals: int, chunk_rows: int = 64, nan_policy: NanPolicy = "allow",
                 keep: list[str] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> tuple[int, float]:
    """Explain every row of ``input_path`` into ``output`` (CSV or Parquet, by suffix), chunk by
    chunk, each row within ``max_evals`` model evaluations; returns (rows, seconds).
    BatchInputError names the file, column and row of a bad input."""
    import shap

    start = time.perf_counter()
    meta = runtime.metadata
    keep = keep or []
    out_fmt = file_format(output)
    try:
        check_explainable(meta)
        bg = background_rows(runtime.version.reference(), meta.feature_names, background)
        permutations = plan(meta.n_features, 1, len(bg), max_evals)
    except (NotExplainable, RegistryError) as exc:
        raise BatchInputError(f"{input_path}: {exc}") from None
    src = InputFile.open(input_path)
    check_columns(src, meta.feature_names, keep)
    src.check_parquet(meta.feature_names, None)
    tmp = output.with_name(f".{output.name}.tmp")
    writer: Any = None
    rows = 0
    try:
        for table in _chunks(src, meta.feature_names, keep, chunk_rows):
            x = features_of(table, meta.feature_names, source=str(input_path), first_row=rows,
                            nan_policy=nan_policy)
            expl = explain(runtime.predict, meta, x, bg, permutations=permutations, shap=shap)
            columns = {name: table.column(name) for name in keep}
            columns.update({k: pa.array(v) for k, v in explanation_columns(meta, expl).items()})
            scored = pa.table(columns)
            if writer is None:
                writer = pq.ParquetWriter(tmp, scored.schema) if out_fmt == "parquet" else pacsv.CSVWriter(tmp, scored.schema)
            writer.write_table(scored)
            rows += table.num_rows
            if progress is not None:
                progress(rows, src.consumed(rows))
        if writer is not None:
            writer.close()
            writer = None
        else:
            tmp.write_bytes(b"")
        tmp.replace(output)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return rows, time.perf_counter() - start


def _chunks(src: InputFile, features: list[str], keep: list[str], chunk_rows: int) -> Iterator[pa.Table]:
    yield from src.chunks(list(dict.fromkeys([*features, *keep])), chunk_rows, features)
