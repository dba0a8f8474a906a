"""The ONNX Runtime session of one registered model version, and nothing else.

One explicit lifecycle: :meth:`OnnxRuntime.load` creates the session on the chosen execution
provider, checks that the provider really became active and warms it up; :attr:`ready` says it can
predict; :meth:`predict` runs float32 rows; :meth:`unload` frees it. A model that fails to load
raises :class:`ModelLoadError` and never serves half a model.

Example::

    rt = OnnxRuntime(registry.get("churn", "production"), provider="auto", threads=1)
    rt.load()
    outputs = rt.predict(np.zeros((4, rt.n_features), np.float32))  # {"probabilities": ...}
"""

from __future__ import annotations

import ctypes.util
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from modelloop.categorical import feeds, is_categorical
from modelloop.registry import ModelVersion
from modelloop.schemas import CATEGORIES_INPUT, INPUT_NAME, ModelMetadata

logger = logging.getLogger(__name__)

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_LABELS = {TRT: "tensorrt", CUDA: "cuda", CPU: "cpu"}
WARMUP_STEPS = 16  # time steps of the warm-up input of a sequence model (any length is served)


class ModelLoadError(Exception):
    """The model version could not be loaded; the message names the model, version and cause."""


def gpu_present() -> bool:
    """Whether an NVIDIA GPU is visible (NVML answers); cheap and silent when there is none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return bool(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no usable GPU
        return False


def requested_providers(choice: str, device_id: int = 0) -> list[Any]:
    """The provider list to ask ONNX Runtime for, most preferred first."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    cuda = (CUDA, {"device_id": device_id})
    trt = (TRT, {"device_id": device_id})
    if choice == "cpu":
        return [CPU]
    if choice == "cuda":
        return [cuda, CPU]
    if choice == "tensorrt":
        return [trt, cuda, CPU]
    # auto: a GPU provider only when the build has it and a GPU is there
    if CUDA not in available or not gpu_present():
        return [CPU]
    wanted: list[Any] = [cuda, CPU]
    if TRT in available and ctypes.util.find_library("nvinfer"):
        wanted.insert(0, trt)
    return wanted


@dataclass(frozen=True)
class CostModel:
    """Seconds one call takes for ``rows`` rows, fitted at warm-up: ``fixed + per_row * rows``."""

    fixed_s: float
    per_row_s: float

    def estimate(self, rows: float) -> float:
        return self.fixed_s + self.per_row_s * rows


class OnnxRuntime:
    """An ONNX Runtime inference session for one model version (see the module docstring)."""

    def __init__(
        self,
        version: ModelVersion,
        *,
        provider: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto",
        threads: int = 1,
        io_binding: Literal["auto", "on", "off"] = "auto",
        device_id: int = 0,
        warmup_rows: Sequence[int] = (1, 64),
    ) -> None:
        self.version = version
        self.metadata: ModelMetadata = version.metadata
        self.provider_choice = provider
        self.threads = threads
        self.io_binding_choice = io_binding
        self.device_id = device_id
        self.warmup_rows = tuple(warmup_rows)
        self._dims = self.metadata.input_dims
        # one row of the warm-up input; the cost model counts work in these
        self._warm_row = tuple(WARMUP_STEPS if d is None else d for d in self._dims)
        self._row_size = math.prod(self._warm_row)
        # rows of features are reshaped to this (an image model's [channels, height, width])
        self._row_shape = self._dims if len(self._dims) > 1 and self.takes_rows else None
        self.categorical = is_categorical(self.metadata)
        """The model takes categorical features: rows are object matrices (strings beside
        numbers, modelloop/categorical.py), fed to the graph's two inputs."""
        self.active_provider = ""
        self.cost = CostModel(0.0, 0.0)
        self.output_names: list[str] = []
        self._session: Any = None
        self._use_io_binding = False

    # -- identity ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def model_version(self) -> int:
        return self.metadata.version

    @property
    def n_features(self) -> int:
        return self.metadata.n_features

    @property
    def input_dims(self) -> tuple[int | None, ...]:
        """The input's axes after the batch axis (``ModelMetadata.input_dims``)."""
        return self._dims

    def work_rows(self, x: np.ndarray) -> float:
        """``x`` in rows of the warm-up's size, what the cost model counts: its rows, or for a
        sequence model its rows times its steps over the warm-up's steps."""
        return x.size / self._row_size

    @property
    def takes_rows(self) -> bool:
        """Rows of ``n_features`` values can be fed (reshaped for an image model); False for a
        model whose input has a dynamic axis besides the batch (a sequence model)."""
        return None not in self._dims

    @property
    def ready(self) -> bool:
        return self._session is not None

    def __repr__(self) -> str:
        state = self.active_provider or "not loaded"
        return f"OnnxRuntime({self.name} v{self.model_version}, {state})"

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self) -> OnnxRuntime:
        """Create the session, verify the active provider, warm up. Raises ModelLoadError."""
        import onnxruntime as ort

        label = f"{self.name} v{self.model_version}"
        requested = requested_providers(self.provider_choice, self.device_id)
        names = [p[0] if isinstance(p, tuple) else p for p in requested]
        if names[0] != CPU and hasattr(ort, "preload_dlls"):
            # CUDA/cuDNN from the nvidia-* wheels, before the first GPU session
            ort.preload_dlls()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The event loop shares the cores with ONNX Runtime's pool: spinning threads would starve it.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                str(self.version.onnx_path), sess_options=opts, providers=requested
            )
        except Exception as exc:
            raise ModelLoadError(f"{label}: ONNX Runtime cannot load {self.version.onnx_path}: {exc}") from exc
        active = session.get_providers()
        self._check_graph(session, label)
        if self.provider_choice in ("cuda", "tensorrt") and active[0] != names[0]:
            raise ModelLoadError(
                f"{label}: provider {self.provider_choice!r} was requested (MODELLOOP_SERVING_PROVIDERS)"
                f" but ONNX Runtime activated {active}"
            )
        self.active_provider = PROVIDER_LABELS.get(active[0], active[0])
        self.output_names = [o.name for o in session.get_outputs()]
        gpu = self.active_provider != "cpu"
        self._use_io_binding = self.io_binding_choice == "on" or (
            self.io_binding_choice == "auto" and gpu
        )
        self._session = session
        try:
            self._warm_up()
        except Exception as exc:
            self._session = None
            raise ModelLoadError(f"{label}: warm-up inference failed: {exc}") from exc
        logger.info(
            "loaded %s on %s (requested %s, active %s, %d threads, io binding %s, %.1f us/row)",
            label, self.active_provider, names, active, self.threads,
            "on" if self._use_io_binding else "off", self.cost.per_row_s * 1e6,
        )
        return self

    def _check_graph(self, session: Any, label: str) -> None:
        inputs = session.get_inputs()
        if self.categorical:
            self._check_categorical_inputs(inputs, label)
        elif len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise ModelLoadError(f"{label}: expected one input named {INPUT_NAME!r}, got "
                                 f"{[i.name for i in inputs]}")
        self._check_outputs(session, label)
        if self.categorical:
            return
        shape = inputs[0].shape
        dims = self._dims
        if len(shape) != 1 + len(dims) or any(
                isinstance(g, int) and m is not None and g != m for g, m in zip(shape[1:], dims, strict=True)):
            want = (f"{self.n_features} features" if len(dims) == 1 else "input [batch, "
                    + ", ".join("any" if d is None else str(d) for d in dims) + "]")
            raise ModelLoadError(f"{label}: input shape {shape} does not match the {want} "
                                 "in its metadata")

    def _check_categorical_inputs(self, inputs: Any, label: str) -> None:
        """A model with categorical features takes ``input`` float ``[rows, n_numeric]`` and
        ``categories`` string ``[rows, n_categorical]`` (modelloop/categorical.py)."""
        meta = self.metadata
        want = {INPUT_NAME: ("tensor(float)", len(meta.numeric_features)),
                CATEGORIES_INPUT: ("tensor(string)", len(meta.categorical_features))}
        got = {i.name: i for i in inputs}
        if sorted(got) != sorted(want):
            raise ModelLoadError(f"{label}: a model with categorical features takes the inputs "
                                 f"{sorted(want)}, the graph {[i.name for i in inputs]}")
        for name, (dtype, width) in want.items():
            shape = got[name].shape
            if got[name].type != dtype or len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != width):
                raise ModelLoadError(f"{label}: input {name!r} is {got[name].type} {shape}; the metadata "
                                     f"wants {dtype} [rows, {width}]")

    def _check_outputs(self, session: Any, label: str) -> None:
        outs = {o.name for o in session.get_outputs()}
        expected = {o.name for o in self.metadata.outputs}
        if not expected <= outs:
            raise ModelLoadError(f"{label}: graph outputs {sorted(outs)} lack {sorted(expected - outs)}")

    def _warm_up(self) -> None:
        # The first runs allocate and (on GPU) build kernels; time the later ones for the cost model.
        # A model often loads on a thread while the event loop serves (lazily, or a swap under
        # load). The wall clock then counts the wait for the GIL after each call, up to the
        # switch interval: a model that runs a full batch in 0.08 ms was judged at 5-21 ms. On
        # the CPU provider a call's work is this thread's CPU time (ONNX Runtime's caller takes
        # part in its pool and spin-waits for the pool's threads), which that wait leaves out;
        # on a GPU it is not, and the wall clock stays.
        timings: list[tuple[int, float]] = []
        on_cpu = self.active_provider == "cpu"
        for rows in self.warmup_rows:
            x = self._warm_input(rows)
            self.predict(x)
            best = float("inf")
            for _ in range(5):
                t0, c0 = time.perf_counter(), time.thread_time()
                self.predict(x)
                took = time.perf_counter() - t0
                best = min(best, min(took, time.thread_time() - c0) if on_cpu else took)
            timings.append((rows, best))
        (r0, t0), (r1, t1) = timings[0], timings[-1]
        per_row = max(0.0, (t1 - t0) / (r1 - r0)) if r1 != r0 else t0 / max(r0, 1)
        self.cost = CostModel(fixed_s=max(0.0, t0 - per_row * r0), per_row_s=per_row)

    def _warm_input(self, rows: int) -> np.ndarray:
        """Zeros, and for a model with categorical features each one's first known value."""
        if not self.categorical:
            return np.zeros((rows, *self._warm_row), np.float32)
        meta = self.metadata
        row = [meta.categories[f][0] if meta.categories.get(f) else None if f in meta.categories else 0.0
               for f in meta.feature_names]
        x = np.empty((rows, len(row)), dtype=object)
        x[:] = row
        return x

    def unload(self) -> None:
        """Free the session; :attr:`ready` becomes False."""
        self._session = None

    # -- inference ---------------------------------------------------------------------------
    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``x`` (float32 ``[rows, *input_dims]``, or ``[rows, n_features]`` for an image
        model; an object matrix ``[rows, n_features]`` for a model with categorical features);
        returns every graph output by name."""
        session = self._session
        if session is None:
            raise RuntimeError(f"{self!r} is not loaded")
        if self.categorical:  # (strings stay on the host: no I/O binding)
            fed = feeds(self.metadata, x)
            return dict(zip(self.output_names, session.run(self.output_names, fed), strict=True))
        if self._row_shape is not None and x.ndim == 2:
            x = x.reshape(len(x), *self._row_shape)
        if self._use_io_binding:
            return self._predict_bound(session, x)
        return dict(zip(self.output_names, session.run(self.output_names, {INPUT_NAME: x}), strict=True))

    def _predict_bound(self, session: Any, x: np.ndarray) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        binding = session.io_binding()
        if self.active_provider == "cpu":
            binding.bind_cpu_input(INPUT_NAME, x)
        else:
            # one host-to-device copy; outputs come back to the host in one copy each
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", self.device_id)
            binding.bind_ortvalue_input(INPUT_NAME, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))
