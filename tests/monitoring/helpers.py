"""Test helpers for the sidecar: a real model (scikit-learn, exported to a real ONNX graph that
follows the project's conventions), registration with its reference sample, and real
``modelloop serve`` and ``modelloop monitor`` processes on OS-chosen ports."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from modelloop.ports import free_port
from modelloop.registry import Registry
from modelloop.schemas import (
    REF_LABEL,
    REF_PREDICTION,
    REF_PROBA_PREFIX,
    ModelMetadata,
    Task,
    TensorSpec,
)
from modelloop.synthetic import TARGET, SyntheticTask

CLASS_LABELS = ["no", "yes"]


@dataclass
class TrainedModel:
    """A standardising logistic regression fitted with scikit-learn."""

    task: SyntheticTask
    pipeline: Any

    @classmethod
    def fit(cls, task: SyntheticTask, rows: int = 4000, seed: int = 11) -> TrainedModel:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        train = task.sample(rows, seed=seed)
        pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
        pipe.fit(train[task.feature_names].to_numpy(np.float64), train[TARGET].to_numpy())
        return cls(task, pipe)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.pipeline.predict_proba(np.asarray(x, dtype=np.float64))

    def onnx_bytes(self) -> bytes:
        """Input ``input`` [N, F] float32 -> ``probabilities`` [N, 2] (scaling and softmax in
        the graph); softmax([0, z]) is the logistic regression's [1 - p, p]."""
        from onnx import TensorProto, helper, numpy_helper

        scaler, lr = self.pipeline[0], self.pipeline[1]
        n = len(self.task.feature_names)
        w = np.zeros((n, 2), np.float32)
        w[:, 1] = lr.coef_[0]
        b = np.array([0.0, lr.intercept_[0]], np.float32)
        inits = [numpy_helper.from_array(scaler.mean_.astype(np.float32), "mean"),
                 numpy_helper.from_array(scaler.scale_.astype(np.float32), "scale"),
                 numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
        nodes = [helper.make_node("Sub", ["input", "mean"], ["centred"]),
                 helper.make_node("Div", ["centred", "scale"], ["scaled"]),
                 helper.make_node("MatMul", ["scaled", "w"], ["logits0"]),
                 helper.make_node("Add", ["logits0", "b"], ["logits"]),
                 helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
        graph = helper.make_graph(
            nodes, "logreg",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, n])],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        return model.SerializeToString()

    def reference(self, rows: int = 3000, seed: int = 21) -> pd.DataFrame:
        ref = self.task.sample(rows, seed=seed)
        proba = self.predict_proba(ref[self.task.feature_names].to_numpy())
        df = ref[self.task.feature_names].copy()
        df[REF_LABEL] = ref[TARGET].to_numpy()
        df[REF_PREDICTION] = proba.argmax(axis=1)
        for i in range(proba.shape[1]):
            df[f"{REF_PROBA_PREFIX}{i}"] = proba[:, i]
        return df

    def register(self, registry_dir: Path, name: str = "churn", promote: bool = True,
                 reference_rows: int = 3000, gate_metric: str | None = None) -> ModelMetadata:
        n = len(self.task.feature_names)
        meta = ModelMetadata(
            name=name, task=Task.classification, architecture="logreg",
            inputs=[TensorSpec(name="input", shape=[None, n])],
            outputs=[TensorSpec(name="probabilities", shape=[None, 2])],
            feature_names=self.task.feature_names, class_labels=CLASS_LABELS,
            config={"gate_metric": gate_metric} if gate_metric else {},
        )
        reg = Registry(registry_dir)
        meta = reg.register(meta, self.onnx_bytes(), reference=self.reference(reference_rows))
        if promote:
            reg.promote(name, meta.version)
        return meta


class ServingProcess:
    """A real ``modelloop serve`` (one BentoML worker) whose prediction events go to the sidecar
    at ``sidecar_url``; its log is kept for failure reports."""

    def __init__(self, home: Path, log_path: Path, sidecar_url: str, model: str = "churn") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.model = model
        self.env = {**os.environ, "MODELLOOP_HOME": str(home),
                    "BENTOML_HOME": str(home / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
                    "MODELLOOP_SERVING_MODEL": model,
                    "MODELLOOP_SERVING_SIDECAR_URL": sidecar_url,
                    "MODELLOOP_SERVING_EVENT_FLUSH_INTERVAL_S": "0.1"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def start(self, timeout: float = 120.0) -> ServingProcess:
        exe = Path(sys.executable).with_name("modelloop")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(exe), "serve", "--port", str(self.port), "--host", "127.0.0.1",
                 "--workers", "1"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_ready(self.proc, f"{self.url}/v2/health/ready", timeout, self.log)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def predict(self, df: pd.DataFrame, rows_per_request: int = 500) -> tuple[list[str], np.ndarray]:
        """Request ids and predicted class indexes for ``df``'s rows, through ``/predict``."""
        ids: list[str] = []
        preds: list[int] = []
        for start in range(0, len(df), rows_per_request):
            part = df.iloc[start:start + rows_per_request]
            resp = self.client.post("/predict", json={"instances": part.to_dict("records")})
            assert resp.status_code == 200, resp.text
            for p in resp.json()["predictions"]:
                ids.append(p["request_id"])
                preds.append(int(p["prediction"]))
        return ids, np.array(preds)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float, log: Any) -> None:
    """Poll ``url`` for a 200 until ``timeout``; fail with the process's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}:\n{log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready within {timeout} s:\n{log()}")


class SidecarProcess:
    """``modelloop monitor --port P`` as a child process, its log kept for failure reports."""

    def __init__(self, home: Path, log_path: Path, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.home = home
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {**os.environ, "MODELLOOP_HOME": str(home), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> SidecarProcess:
        exe = Path(sys.executable).with_name("modelloop")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(exe), "monitor", "--port", str(self.port)],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_ready(self.proc, f"{self.url}/ready", timeout, self.log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@contextlib.contextmanager
def serve_in_thread(app: Any, timeout: float = 30.0) -> Iterator[str]:
    """Run an ASGI app under a real uvicorn server on an OS-chosen port, in a thread; yields its
    URL and shuts it down (running the app's lifespan shutdown) afterwards."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


@contextlib.contextmanager
def sidecar_process(home: Path, log_path: Path, port: int | None = None,
                    **env: str) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(home, log_path, env, port)
    try:
        yield proc.start()
    except BaseException:
        print(f"--- sidecar log ---\n{proc.log()}")
        raise
    finally:
        proc.close()


def wait_for_job(url: str, headers: dict[str, str] | None = None,
                 timeout: float = 600.0) -> dict[str, Any]:
    """The sidecar's newest retraining job once it has ended (``GET /jobs``; with the admin
    ``headers`` of a keyed sidecar), or as it stands at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = httpx.get(f"{url}/jobs", headers=headers, timeout=30).json()["jobs"][0]
        if job["status"] not in ("started", "running") or time.monotonic() > deadline:
            return job
        time.sleep(0.5)
