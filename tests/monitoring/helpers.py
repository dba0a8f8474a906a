"""Test helpers for the sidecar: a real model (scikit-learn, exported to a real ONNX graph that
follows the project's conventions), registration with its reference sample, a client that turns
predictions into events the way serving does, and a sidecar process on an OS-chosen port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

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
                 reference_rows: int = 3000) -> ModelMetadata:
        n = len(self.task.feature_names)
        meta = ModelMetadata(
            name=name, task=Task.classification, architecture="logreg",
            inputs=[TensorSpec(name="input", shape=[None, n])],
            outputs=[TensorSpec(name="probabilities", shape=[None, 2])],
            feature_names=self.task.feature_names, class_labels=CLASS_LABELS,
        )
        reg = Registry(registry_dir)
        meta = reg.register(meta, self.onnx_bytes(), reference=self.reference(reference_rows))
        if promote:
            reg.promote(name, meta.version)
        return meta


class EmulatedServing:
    """Predicts with ONNX Runtime on the registered file and sends one event per row to the
    sidecar's ``POST /events``, as serving's emitter does (until the real serving process is
    driven instead: then ``predict`` calls its ``/predict`` and serving sends the events)."""

    def __init__(self, registry_dir: Path, name: str, sidecar_url: str) -> None:
        import onnxruntime as ort

        mv = Registry(registry_dir).get(name)
        self.meta = mv.metadata
        self.session = ort.InferenceSession(str(mv.onnx_path), providers=["CPUExecutionProvider"])
        self.client = httpx.Client(base_url=sidecar_url, timeout=60)
        self.sent = 0

    def predict(self, df: pd.DataFrame, batch: int = 2000) -> tuple[list[str], np.ndarray]:
        """Request ids and probabilities for ``df``'s rows; events acknowledged by the sidecar."""
        x = df[self.meta.feature_names].to_numpy(np.float32)
        ids, probas = [], []
        for start in range(0, len(x), batch):
            t0 = time.perf_counter()
            proba = self.session.run(["probabilities"], {"input": x[start:start + batch]})[0]
            latency = (time.perf_counter() - t0) / max(1, len(proba))
            now = time.time()
            events = []
            for i, p in enumerate(proba):
                rid = uuid.uuid4().hex
                ids.append(rid)
                row = x[start + i]
                events.append({
                    "request_id": rid, "timestamp": now, "model": self.meta.name,
                    "version": self.meta.version, "mode": "batch",
                    "features": [None if np.isnan(v) else float(v) for v in row],
                    "prediction": int(p.argmax()), "probabilities": [float(v) for v in p],
                    "latency_s": latency,
                })
            resp = self.client.post("/events", json={"events": events})
            assert resp.status_code == 200, resp.text
            assert resp.json()["accepted"] == len(events)
            self.sent += len(events)
            probas.append(proba)
        return ids, np.concatenate(probas)

    def close(self) -> None:
        self.client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class SidecarProcess:
    """``modelloop monitor --port P`` as a child process, its log kept for failure reports."""

    def __init__(self, home: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {**os.environ, "MODELLOOP_HOME": str(home), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> SidecarProcess:
        exe = Path(sys.executable).with_name("modelloop")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(exe), "monitor", "--port", str(self.port)],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        raise AssertionError(f"sidecar not ready within {timeout} s:\n{self.log()}")

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
def sidecar_process(home: Path, log_path: Path, **env: str) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(home, log_path, env)
    try:
        yield proc.start()
    except BaseException:
        print(f"--- sidecar log ---\n{proc.log()}")
        raise
    finally:
        proc.close()
