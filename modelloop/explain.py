"""Per-feature attributions (SHAP values) of a registered version's ONNX graph.

Model-agnostic: ``shap``'s permutation explainer calls a function that runs the graph (ONNX
Runtime, never torch), masking features with rows drawn from the version's reference sample (the
background). For each instance and each explained output::

    base_value + sum(attributions) == output        (checked: ``Explanation.additivity_error``)

where ``base_value`` is the output's mean over the background. What is explained is the graph's
main output (:func:`explained_outputs`): a classifier's probability of every class (one column
each, ``probability_<label>``), a regressor's ``prediction``, an anomaly detector's ``score``.

The cost is bounded: one permutation of ``M`` features needs ``2 * M + 1`` masked inputs, each run
on every background row, so an instance costs ``permutations * (2 * M + 1) * background_rows``
graph rows (:func:`plan`). The sidecar's global importance (mean absolute attribution per feature,
:func:`global_importance`) uses the same code on the reference sample itself.

Example::

    background = background_rows(version.reference(), meta.feature_names, rows=100)
    explanation = explain(runner, meta, x, background, shap=shap,
                          permutations=plan(meta.n_features, 1, 100, 10**5))
    explanation.attributions[0, :, 1]      # instance 0, every feature, the second output
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloop.schemas import PREDICTION, PROBABILITIES, SCORE, ModelMetadata, Task

ADDITIVITY_TOL = 1e-4
"""Largest ``|base_value + sum(attributions) - output|`` an explanation may have."""
MAX_PERMUTATIONS = 10
"""Permutations per instance when the budget allows more (shap's own default is 10)."""

Runner = Callable[[np.ndarray], Mapping[str, np.ndarray]]
"""Runs float32 rows ``[rows, n_features]`` through the graph; its outputs by name."""


class NotExplainable(ValueError):
    """The version or the request cannot be explained; the message says why, on one line."""


def explained_outputs(meta: ModelMetadata) -> list[str]:
    """The names of the explained output columns, as batch scoring names them."""
    if meta.task == Task.classification:
        return [f"probability_{label}" for label in meta.class_labels_or_indices()]
    return [PREDICTION if meta.task == Task.regression else SCORE]


def output_matrix(meta: ModelMetadata, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The explained outputs of a graph run as float64 ``[rows, len(explained_outputs)]``."""
    key = {Task.classification: PROBABILITIES, Task.regression: PREDICTION}.get(meta.task, SCORE)
    value = np.asarray(outputs[key], dtype=np.float64)
    return value.reshape(len(value), -1)


def check_explainable(meta: ModelMetadata) -> None:
    """Refuse a model whose input is not rows of numbers: a sequence model (its time axis has
    no fixed set of features to attribute to) and a model with categorical features (the
    explainer perturbs float rows; theirs hold strings, modelloop/categorical.py). An image model
    is explained per pixel."""
    if None in meta.input_dims:
        raise NotExplainable(
            f"{meta.name} v{meta.version} takes sequences [rows, steps, {meta.n_features}]: "
            "explanations attribute an output to a fixed set of features, and a sequence's "
            "steps vary; explain a model that takes rows (or an image model, per pixel)")
    if meta.categories:
        raise NotExplainable(f"{meta.name} v{meta.version} takes categorical features "
                             f"({', '.join(meta.categorical_features[:5])}), which explanations do "
                             "not perturb yet; explain a model whose features are numbers")


def background_rows(reference: Any, feature_names: list[str], rows: int, seed: int = 0) -> np.ndarray:
    """``rows`` rows of the reference sample's features (a seeded draw; all when fewer), float32."""
    missing = [f for f in feature_names if f not in reference.columns]
    if missing:
        raise NotExplainable(f"the reference sample lacks the features {missing[:5]}")
    x: np.ndarray = reference[feature_names].to_numpy(dtype=np.float32)
    if len(x) == 0:
        raise NotExplainable("the reference sample has no rows to draw a background from")
    if len(x) > rows:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), rows, replace=False))]
    return x


def masks_per_permutation(n_features: int) -> int:
    return 2 * n_features + 1


def plan(n_features: int, instances: int, background: int, max_evals: int) -> int:
    """Permutations per instance that fit ``max_evals`` graph rows for ``instances`` instances
    (at most :data:`MAX_PERMUTATIONS`); :class:`NotExplainable` when not even one fits."""
    per_permutation = masks_per_permutation(n_features) * background
    permutations = min(MAX_PERMUTATIONS, max_evals // (per_permutation * instances))
    if permutations < 1:
        raise NotExplainable(
            f"{instances} instance(s) of {n_features} features need at least "
            f"{instances * per_permutation} model evaluations (one permutation: "
            f"{masks_per_permutation(n_features)} masked inputs x {background} background rows "
            f"each), more than the limit of {max_evals}; send fewer instances")
    return permutations


@dataclass(frozen=True)
class Explanation:
    """Attributions of ``n`` instances over ``M`` features for ``k`` explained outputs."""

    values: np.ndarray
    """``[n, k]``: the model's outputs for the instances."""
    base_values: np.ndarray
    """``[n, k]``: the outputs' mean over the background (the same for every instance)."""
    attributions: np.ndarray
    """``[n, M, k]``: each feature's share of ``values - base_values``."""
    evaluations: int
    """Graph rows run per instance (masked inputs times background rows)."""
    permutations: int
    background_rows: int

    @property
    def additivity_error(self) -> np.ndarray:
        """``[n]``: the largest ``|base + sum(attributions) - value|`` over each instance's outputs."""
        total = self.base_values + self.attributions.sum(axis=1)
        error: np.ndarray = np.abs(total - self.values).max(axis=1)
        return error


def explain(runner: Runner, meta: ModelMetadata, x: np.ndarray, background: np.ndarray, *,
            permutations: int, shap: Any) -> Explanation:
    """Permutation SHAP of ``x`` (float32 ``[n, M]``) against ``background`` (``[b, M]``).
    ``shap`` is the shap module, imported by the caller: serving's and monitoring's extras
    declare it, the core's base does not (it pulls numba and scikit-learn)."""
    evaluations = 0

    def model(rows: np.ndarray) -> np.ndarray:
        nonlocal evaluations
        evaluations += len(rows)
        return output_matrix(meta, runner(np.ascontiguousarray(rows, dtype=np.float32)))

    values = output_matrix(meta, runner(x))
    masker = shap.maskers.Independent(background, max_samples=len(background))
    explainer = shap.PermutationExplainer(model, masker, seed=0)
    max_evals = permutations * masks_per_permutation(x.shape[1])
    # one row per call: shap spends extra evaluations on the later rows of a multi-row call
    # (about a quarter more here), which would break the budget of plan()
    results = [explainer(row[None], max_evals=max_evals, silent=True) for row in x]
    attributions = np.stack([np.asarray(r.values, np.float64).reshape(x.shape[1], -1) for r in results])
    base = np.stack([np.asarray(r.base_values, np.float64).reshape(-1) for r in results])
    return Explanation(values, base, attributions, evaluations // max(len(x), 1), permutations,
                       len(background))


def session_runner(version: Any, threads: int = 1) -> Runner:
    """A :data:`Runner` over ``version``'s ONNX file on ONNX Runtime's CPU provider (rows of an
    image model's pixels are reshaped to its input)."""
    import onnxruntime as ort

    from modelloop.schemas import INPUT_NAME

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(version.onnx_path), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    dims = version.metadata.input_dims

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        if len(dims) > 1:
            x = x.reshape(len(x), *dims)
        return dict(zip(names, session.run(names, {INPUT_NAME: x}), strict=True))

    return run


def global_importance(runner: Runner, meta: ModelMetadata, reference: Any, *, shap: Any,
                      rows: int = 200, background: int = 50,
                      max_evals: int = 2_000_000) -> dict[str, float]:
    """Each feature's mean absolute attribution over ``rows`` reference rows (summed over the
    explained outputs: a classifier's classes), against a background of other reference rows."""
    check_explainable(meta)
    names = meta.feature_names
    sample = background_rows(reference, names, rows + background, seed=1)
    bg, x = sample[:background], sample[background:]
    if len(x) == 0:  # a tiny reference: explain its rows against themselves
        bg, x = sample, sample
    fits = max_evals // (masks_per_permutation(len(names)) * len(bg))  # instances of one permutation
    x = x[:max(fits, 1)]
    expl = explain(runner, meta, x, bg, permutations=plan(len(names), len(x), len(bg), max_evals),
                   shap=shap)
    importance = np.abs(expl.attributions).sum(axis=2).mean(axis=0)
    return {name: float(v) for name, v in zip(names, importance, strict=True)}
