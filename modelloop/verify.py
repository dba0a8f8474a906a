"""The check a version passes before an alias moves to it, and again before serving swaps to it.

:func:`check_version` loads a registered version's ONNX file with ONNX Runtime (CPU) and runs it
on its reference rows; :func:`check_outputs` judges the outputs of any runner, so serving checks
the session it is about to serve, on its own provider. A version passes when:

* the file loads and the graph runs on the reference rows, one output row per input row;
* every value of every output is finite;
* a classifier's probabilities lie in [0, 1] and each row's sum to 1 (within ``PROBABILITY_TOL``);
* its predictions are those stored in its reference sample when it was registered: the same
  class, where a row whose stored class is within ``TIE_TOL`` of the top probability is a tie
  either way; a value within ``VALUE_RTOL`` of the stored value's magnitude plus the stored
  values' spread. At most ``MISMATCH_SHARE`` of the rows may differ (another provider's
  arithmetic).

A sequence model's reference sample holds each feature's mean over time, not the sequences, so it
is run on those means held for ``SEQUENCE_STEPS`` steps and only the first three checks apply.
Anything that fails raises one :class:`~modelloop.registry.BrokenVersion` naming the version, the
file and the reason on one line.

Example::

    result = check_version(registry.get("churn", 3))  # raises BrokenVersion
    result.rows, result.compared                      # (1024, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelloop.categorical import feeds, is_categorical
from modelloop.registry import BrokenVersion, ModelVersion
from modelloop.schemas import (
    CATEGORIES_INPUT,
    INPUT_NAME,
    PREDICTION,
    PROBABILITIES,
    REF_PREDICTION,
    SCORE,
    Task,
)

MAX_ROWS = 1024
"""Reference rows run at most (evenly spaced over the sample)."""
SEQUENCE_STEPS = 8
PROBABILITY_TOL = 1e-3
TIE_TOL = 1e-3
VALUE_RTOL = 1e-2
MISMATCH_SHARE = 0.01

Runner = Callable[[np.ndarray], Mapping[str, np.ndarray]]
MAIN_OUTPUT = {Task.classification: PROBABILITIES, Task.regression: PREDICTION, Task.anomaly: SCORE}


@dataclass(frozen=True)
class CheckResult:
    """A version that passed: how many reference rows ran, whether its predictions were
    compared with the stored ones (not for a sequence model) and how many differed."""

    rows: int
    compared: bool
    mismatches: int


def check_version(version: ModelVersion, threads: int = 0) -> CheckResult:
    """Load ``version`` with ONNX Runtime on the CPU and check it (module docstring); raises
    BrokenVersion. ``threads`` > 0 caps ONNX Runtime's intra-op threads."""
    import onnxruntime as ort

    reference = _reference(version)  # the cheaper failures first
    x = _inputs(version, reference)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads > 0:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(version.onnx_path), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises several types; all mean "cannot load"
        raise _broken(version, version.onnx_path, f"ONNX Runtime cannot load it: {exc}") from exc
    inputs = [i.name for i in session.get_inputs()]
    meta = version.metadata
    expected = [INPUT_NAME, CATEGORIES_INPUT] if is_categorical(meta) else [INPUT_NAME]
    if inputs != expected:
        want = f"{expected}" if len(expected) > 1 else f"one named {INPUT_NAME!r}"
        raise _broken(version, version.onnx_path, f"its graph takes the inputs {inputs}, not {want}")
    names = [o.name for o in session.get_outputs()]

    def run(rows: np.ndarray) -> dict[str, np.ndarray]:
        fed = feeds(meta, rows) if rows.dtype == object else {INPUT_NAME: rows}
        return dict(zip(names, session.run(names, fed), strict=True))

    return _judge(version, run, reference, x)


def check_outputs(version: ModelVersion, run: Runner) -> CheckResult:
    """Run ``run`` (float32 ``[rows, *input_dims]`` in, outputs by name out) on ``version``'s
    reference rows and check what it returns (module docstring); raises BrokenVersion."""
    reference = _reference(version)
    return _judge(version, run, reference, _inputs(version, reference))


def _judge(version: ModelVersion, run: Runner, reference: Any, x: np.ndarray) -> CheckResult:
    meta = version.metadata
    path = version.onnx_path
    n = len(x)
    try:
        outputs = {name: np.asarray(value) for name, value in run(x).items()}
    except Exception as exc:  # whatever the runtime raises, the version cannot serve
        raise _broken(version, path, f"running it on {n} reference rows failed: {exc}") from exc
    main = MAIN_OUTPUT[meta.task]
    if main not in outputs:
        raise _broken(version, path, f"a {meta.task.value} model must output {main!r}; the graph "
                      f"outputs {sorted(outputs)}")
    for name in sorted(outputs):
        value = outputs[name]
        if value.ndim == 0 or len(value) != n:
            raise _broken(version, path, f"output {name!r} has shape {list(value.shape)} for {n} "
                          "reference rows")
        if value.dtype.kind in "fc":
            bad = ~np.isfinite(value.reshape(n, -1)).all(axis=1)
            if bad.any():
                raise _broken(version, path, f"output {name!r} is not finite (NaN or infinity) in "
                              f"{int(bad.sum())} of {n} reference rows, first row {int(bad.argmax())}")
    if meta.task is Task.classification:
        _check_probabilities(version, outputs[main])
    if _is_sequence(version):
        return CheckResult(n, False, 0)
    stored = _stored_predictions(version, reference)
    if meta.task is Task.classification:
        differ, detail = _class_mismatches(outputs[main].astype(np.float64), stored)
    else:
        differ, detail = _value_mismatches(outputs[main].reshape(n, -1)[:, 0].astype(np.float64),
                                           stored)
    allowed = math.floor(MISMATCH_SHARE * n)
    count = int(differ.sum())
    if count > allowed:
        i = int(differ.argmax())
        raise _broken(version, path, f"its predictions differ from those stored in its reference "
                      f"sample in {count} of {n} rows (at most {allowed} may); row {i}: "
                      + detail(i))
    return CheckResult(n, True, count)


def _is_sequence(version: ModelVersion) -> bool:
    return None in version.metadata.input_dims


def _broken(version: ModelVersion, path: Path, reason: str) -> BrokenVersion:
    return BrokenVersion(f"{version.name} v{version.version}", path, reason)


def _rows(total: int) -> np.ndarray:
    if total <= MAX_ROWS:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, MAX_ROWS).round().astype(np.int64))


def _reference(version: ModelVersion) -> Any:
    import pandas as pd

    path = version.reference_path
    if not path.exists():
        raise _broken(version, path, "it has no reference sample to be checked on")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise _broken(version, path, f"the reference sample cannot be read: {exc}") from exc
    if len(frame) == 0:
        raise _broken(version, path, "the reference sample has no rows")
    return frame


def _inputs(version: ModelVersion, reference: Any) -> np.ndarray:
    meta = version.metadata
    missing = [f for f in meta.feature_names if f not in reference.columns]
    if missing:
        raise _broken(version, version.reference_path, f"the reference sample lacks the feature "
                      f"columns {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if is_categorical(meta):  # an object matrix: numbers, and strings (None missing)
        return _categorical_inputs(version, reference)
    try:
        features = reference[meta.feature_names].iloc[_rows(len(reference))].to_numpy(np.float32)
    except (TypeError, ValueError) as exc:
        raise _broken(version, version.reference_path,
                      f"the reference sample's features are not numbers: {exc}") from exc
    dims = meta.input_dims
    if _is_sequence(version):  # a sequence: each feature's mean, held for a few steps
        return np.ascontiguousarray(np.repeat(features[:, None, :], SEQUENCE_STEPS, axis=1))
    size = math.prod(d for d in dims if d is not None)
    if size != features.shape[1]:
        raise _broken(version, version.metadata_path, f"the input {list(dims)} holds {size} values "
                      f"but there are {features.shape[1]} feature names")
    return np.ascontiguousarray(features.reshape(len(features), *dims))


def _categorical_inputs(version: ModelVersion, reference: Any) -> np.ndarray:
    """The reference rows of a model with categorical features as modelloop/categorical.py holds
    them: floats for the numeric features, ``str`` (None missing) for the categorical ones."""
    meta = version.metadata
    frame = reference[meta.feature_names].iloc[_rows(len(reference))]
    rows = np.empty(frame.shape, dtype=object)
    for j, name in enumerate(meta.feature_names):
        column = frame[name]
        if name in meta.categories:
            rows[:, j] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                          for v in column.tolist()]
            continue
        try:
            rows[:, j] = column.to_numpy(np.float32)
        except (TypeError, ValueError) as exc:
            raise _broken(version, version.reference_path,
                          f"the reference sample's feature {name!r} is not numbers: {exc}") from exc
    return rows


def _check_probabilities(version: ModelVersion, proba: np.ndarray) -> None:
    meta = version.metadata
    path = version.onnx_path
    n = len(proba)
    if proba.ndim != 2 or (meta.class_labels and proba.shape[1] != len(meta.class_labels)):
        raise _broken(version, path, f"output {PROBABILITIES!r} has shape {list(proba.shape)}, "
                      f"expected [rows, {len(meta.class_labels or []) or 'classes'}]")
    p = proba.astype(np.float64)
    outside = ((p < -PROBABILITY_TOL) | (p > 1 + PROBABILITY_TOL)).any(axis=1)
    if outside.any():
        i = int(outside.argmax())
        raise _broken(version, path, f"probabilities outside [0, 1] in {int(outside.sum())} of {n} "
                      f"reference rows, first row {i}: {_short(p[i])}")
    sums = p.sum(axis=1)
    off = np.abs(sums - 1.0) > PROBABILITY_TOL
    if off.any():
        i = int(off.argmax())
        raise _broken(version, path, f"probabilities do not sum to 1 in {int(off.sum())} of {n} "
                      f"reference rows, first row {i} sums to {sums[i]:.6g}")


def _stored_predictions(version: ModelVersion, reference: Any) -> np.ndarray:
    path = version.reference_path
    if REF_PREDICTION not in reference.columns:
        raise _broken(version, path, f"the reference sample has no {REF_PREDICTION!r} column")
    try:
        stored: np.ndarray = reference[REF_PREDICTION].iloc[_rows(len(reference))].to_numpy(np.float64)
    except (TypeError, ValueError) as exc:
        raise _broken(version, path, f"its {REF_PREDICTION!r} column is not numbers: {exc}") from exc
    if not np.isfinite(stored).all():
        raise _broken(version, path, f"its {REF_PREDICTION!r} column holds NaN or infinity")
    if version.metadata.task is Task.classification and (stored != np.round(stored)).any():
        raise _broken(version, path, f"its {REF_PREDICTION!r} column holds values that are not "
                      "class indices")
    return stored


def _class_mismatches(proba: np.ndarray, stored: np.ndarray) -> tuple[np.ndarray, Callable[[int], str]]:
    want = stored.astype(np.int64)
    got = proba.argmax(axis=1)
    valid = (want >= 0) & (want < proba.shape[1])
    stored_p = np.where(valid, proba[np.arange(len(proba)), np.clip(want, 0, proba.shape[1] - 1)],
                        -np.inf)
    # a tie: the stored class is (almost) as probable as the top one, so either is right
    differ = (got != want) & (stored_p < proba.max(axis=1) - TIE_TOL)

    def detail(i: int) -> str:
        return f"class {got[i]} where the sample has {want[i]}"

    return differ, detail


def _value_mismatches(got: np.ndarray, stored: np.ndarray) -> tuple[np.ndarray, Callable[[int], str]]:
    spread = float(stored.std())
    if not spread > 0:
        spread = 1.0
    differ = np.abs(got - stored) > VALUE_RTOL * (np.abs(stored) + spread)

    def detail(i: int) -> str:
        return f"{got[i]:.6g} where the sample has {stored[i]:.6g}"

    return differ, detail


def _short(values: np.ndarray) -> str:
    shown = ", ".join(f"{v:.4g}" for v in values[:6])
    return f"[{shown}{', ...' if len(values) > 6 else ''}]"
