"""OnnxRuntime: lifecycle, provider selection and verification, IO binding, load errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from modelloop.registry import Registry
from modelloop.schemas import Task
from modelloop.synthetic import SyntheticTask
from serving.runtime import ModelLoadError, OnnxRuntime, gpu_present, requested_providers
from tests.serving.onnx_models import fit_mlp, metadata_for, mlp_graph, register_mlp


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("reg"))
    register_mlp(reg, "clf", n_features=6, n_classes=3, hidden=(8, 4))
    register_mlp(reg, "reg", n_features=6, task=Task.regression)
    return reg


def forward(mlp: object, x: np.ndarray) -> np.ndarray:
    """The MLP in numpy: what the ONNX graph must compute (imputation, scaling, layers, softmax)."""
    m = mlp  # type: ignore[assignment]
    h = (np.where(np.isnan(x), m.means, x) - m.means) / m.scales  # type: ignore[attr-defined]
    for i, (w, b) in enumerate(zip(m.weights, m.biases, strict=True)):  # type: ignore[attr-defined]
        h = h @ w + b
        if i < len(m.weights) - 1:  # type: ignore[attr-defined]
            h = np.maximum(h, 0)
    e = np.exp(h - h.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_a_model_loaded_beside_a_busy_event_loop_is_still_judged_cheap(registry: Registry) -> None:
    """A model loads on a thread while the event loop keeps the GIL busy (a lazy load or a swap
    under load). Its cost model decides whether a batch runs inline or on a thread (the batcher's
    ``inline_below_s``, 0.5 ms by default), so it must not count the waits for the GIL: here
    each call of a model of a few microseconds waits for a thread that runs Python bytecode,
    which gives the GIL up only at the 5 ms switch interval (timed by the wall clock, a 1-row
    batch was judged at several milliseconds)."""
    quiet = OnnxRuntime(registry.get("clf"), provider="cpu", threads=1).load().cost
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(lambda: OnnxRuntime(registry.get("clf"), provider="cpu", threads=1).load())
        while not loading.done():  # the busy loop: bytecode, which holds the GIL for whole intervals
            total = 0
            for i in range(20_000):
                total += i
        busy = loading.result().cost  # (a failed load raises here)
    assert quiet.estimate(1) < 0.0001  # the premise: a small model
    assert busy.estimate(1) < 0.0005, (quiet, busy)


def test_lifecycle_load_ready_predict_unload(registry: Registry) -> None:
    rt = OnnxRuntime(registry.get("clf"), provider="cpu", threads=1)
    assert not rt.ready
    with pytest.raises(RuntimeError, match="not loaded"):
        rt.predict(np.zeros((1, 6), np.float32))
    rt.load()
    assert rt.ready and rt.active_provider == "cpu"
    assert rt.cost.per_row_s >= 0 and rt.cost.estimate(64) > 0
    out = rt.predict(np.zeros((5, 6), np.float32))
    assert out["probabilities"].shape == (5, 3)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1, rtol=1e-5)
    rt.unload()
    assert not rt.ready


def test_graph_computes_the_trained_mlp_with_imputation(tmp_path: Path) -> None:
    task = SyntheticTask(n_features=5, n_informative=5, n_classes=3)
    df = task.sample(500, missing=0.1)
    mlp = fit_mlp(df, task.feature_names, hidden=(8,))
    reg = Registry(tmp_path)
    meta = reg.register(metadata_for("m", mlp, task.feature_names, ["a", "b", "c"]), mlp_graph(mlp, 5))
    rt = OnnxRuntime(reg.get("m", meta.version), provider="cpu").load()
    x = task.sample(64, seed=3, missing=0.2)[task.feature_names].to_numpy(np.float32)
    assert np.isnan(x).any()
    np.testing.assert_allclose(rt.predict(x)["probabilities"], forward(mlp, x.astype(np.float64)), atol=1e-5)


def test_io_binding_gives_the_same_outputs(registry: Registry) -> None:
    x = np.random.default_rng(0).normal(size=(33, 6)).astype(np.float32)
    plain = OnnxRuntime(registry.get("clf"), provider="cpu", io_binding="off").load()
    bound = OnnxRuntime(registry.get("clf"), provider="cpu", io_binding="on").load()
    np.testing.assert_array_equal(plain.predict(x)["probabilities"], bound.predict(x)["probabilities"])


def test_regressor_output(registry: Registry) -> None:
    rt = OnnxRuntime(registry.get("reg"), provider="auto").load()
    assert rt.predict(np.ones((3, 6), np.float32))["prediction"].shape == (3, 1)


@pytest.mark.parametrize(("choice", "first"), [
    ("cpu", "CPUExecutionProvider"),
    ("cuda", "CUDAExecutionProvider"),
    ("tensorrt", "TensorrtExecutionProvider"),
])
def test_requested_providers(choice: str, first: str) -> None:
    wanted = requested_providers(choice)
    assert (wanted[0] if isinstance(wanted[0], str) else wanted[0][0]) == first
    assert wanted[-1] == "CPUExecutionProvider"  # always a CPU fallback for unsupported nodes


def test_auto_is_cpu_without_a_gpu(registry: Registry) -> None:
    if gpu_present():
        pytest.skip("this machine has a GPU")
    assert requested_providers("auto") == ["CPUExecutionProvider"]
    assert OnnxRuntime(registry.get("clf"), provider="auto").load().active_provider == "cpu"


def test_explicit_gpu_provider_that_does_not_activate_fails_the_load(registry: Registry) -> None:
    if gpu_present():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError, match=r"clf v1: provider 'cuda' was requested .* activated \['CPUExecutionProvider'\]"):
        OnnxRuntime(registry.get("clf"), provider="cuda").load()


def test_corrupt_onnx_file_fails_the_load(registry: Registry) -> None:
    meta = registry.get("clf").metadata
    bad = registry.register(meta.model_copy(), b"not onnx")
    with pytest.raises(ModelLoadError, match=f"clf v{bad.version}: ONNX Runtime cannot load"):
        OnnxRuntime(registry.get("clf", bad.version), provider="cpu").load()


def test_graph_that_breaks_the_conventions_fails_the_load(registry: Registry) -> None:
    meta = registry.get("clf").metadata
    wrong_width = meta.model_copy(update={"feature_names": [f"g{i}" for i in range(7)]})
    onnx_bytes = registry.get("clf").onnx_path.read_bytes()
    v = registry.register(wrong_width, onnx_bytes)
    with pytest.raises(ModelLoadError, match="does not match the 7 features"):
        OnnxRuntime(registry.get("clf", v.version), provider="cpu").load()
