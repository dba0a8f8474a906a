"""A user's residual CNN (tests/training/byo_nets.py), trained here on generated 3 x 32 x 32
images, registered through training.byo.register_module, served by a real `modelloop serve`
(Open Inference Protocol binary tensors through tritonclient, and /predict) with its events
reaching a real sidecar, and quantized to int8 with `modelloop quantize`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from modelloop.registry import Registry
from modelloop.schemas import INPUT_NAME, PROBABILITIES
from tests.monitoring.helpers import ServingProcess, SidecarProcess
from tests.training import byo_nets
from tests.training.conftest import quiet_settings
from tests.training.test_byo import fit
from tests.training.test_byo_import import ingested
from training.byo import ExampleData, not_retrainable, register_module

MODELLOOP = str(Path(sys.executable).with_name("modelloop"))
SHAPE = (3, 32, 32)
CLASSES = np.array(["diagonal", "horizontal", "vertical"])
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def stripes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of stripes (horizontal, vertical or diagonal, of random frequency, phase
    and colour) with noise, and their class indexes into CLASSES."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    rows, cols = np.mgrid[0:32, 0:32].astype(np.float32)
    direction = np.stack([(rows + cols) / 1.4, rows, cols])[y]  # [n, 32, 32]
    freq, phase = rng.uniform(0.4, 1.0, (n, 1, 1)), rng.uniform(0, 2 * np.pi, (n, 1, 1))
    gray = np.sin(freq * direction + phase)
    colour = rng.uniform(0.5, 1.5, (n, 3, 1, 1))
    x = gray[:, None] * colour + rng.normal(0, 0.3, (n, *SHAPE))
    return x.astype(np.float32), y


def test_a_users_cnn_is_registered_served_monitored_and_quantized(tmp_path: Path) -> None:
    import tritonclient.http as triton

    x, y = stripes(900, seed=0)
    torch.manual_seed(0)
    net = fit(byo_nets.SmallResNet(n_classes=3), x, y, nn.functional.cross_entropy, epochs=60)
    # a file, so `modelloop quantize` can reload the data the version was judged on
    frame = pd.DataFrame(x.reshape(len(x), -1), columns=[f"p{i}" for i in range(x[0].size)])
    frame["label"] = CLASSES[y]
    frame.to_parquet(tmp_path / "stripes.parquet", index=False)

    settings = quiet_settings(tmp_path / "home")
    registry = Registry(settings.registry_dir)
    meta = register_module(net, ExampleData(tmp_path / "stripes.parquet", target="label"),
                           name="stripes", input_shape=SHAPE, init_kwargs={"n_classes": 3},
                           registry=registry, settings=settings, promote=True)
    assert meta.inputs[0].shape == [None, *SHAPE] and meta.class_labels == list(CLASSES)
    assert meta.parity is not None and meta.parity.passed
    assert meta.metrics["accuracy"] > 0.9  # on the rows the split held out
    assert "image module" in (not_retrainable(meta) or "")

    images, labels = stripes(16, seed=1)
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(images)), -1).numpy()
    assert (expected.argmax(1) == labels).mean() >= 0.8
    sidecar = SidecarProcess(settings.home, tmp_path / "sidecar.log").start()
    server = ServingProcess(settings.home, tmp_path / "serve.log", sidecar.url, model="stripes")
    try:
        server.start()
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        tensor = triton.InferInput(INPUT_NAME, list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=True)
        result = client.infer("stripes", [tensor],
                              outputs=[triton.InferRequestedOutput(PROBABILITIES, binary_data=True)])
        np.testing.assert_allclose(result.as_numpy(PROBABILITIES), expected, atol=1e-5)
        client.close()
        resp = server.client.post("/predict", json={"instances": images[:4].tolist()})
        assert resp.status_code == 200, resp.text
        assert [p["label"] for p in resp.json()["predictions"]] == list(CLASSES[expected[:4].argmax(1)])

        deadline = time.monotonic() + 30
        while ingested(sidecar, "stripes") < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ingested(sidecar, "stripes") >= 20
        check = httpx.post(f"{sidecar.url}/check", params={"model": "stripes"}, timeout=120)
        assert check.status_code == 200, check.text
    finally:
        server.close()
        sidecar.close()

    done = subprocess.run([MODELLOOP, "quantize", "stripes", "--method", "static", "--json"],
                          env={**os.environ, "MODELLOOP_HOME": str(settings.home)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["version"] == 2
    int8 = registry.get("stripes", 2).metadata
    assert int8.inputs[0].shape == [None, *SHAPE]
    assert int8.metrics["accuracy"] >= meta.metrics["accuracy"] - 0.05
