"""The CNN and the GRU, trained by the training package, served end to end by a
real `modelloop serve` with their prediction events going to a real sidecar: image tensors,
sequences of any length, the Open Inference Protocol (tritonclient), validation and batch
scoring."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from modelloop.registry import ModelVersion
from tests.monitoring.helpers import ServingProcess, SidecarProcess
from tests.training.conftest import Registered
from training.sequence import SequenceTask

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def sidecar(breadth_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(breadth_home, tmp_path_factory.mktemp("sidecar") / "sidecar.log")
    try:
        yield proc.start()
    finally:
        proc.close()


def _serve(registered: Registered, sidecar: SidecarProcess, tmp: Path) -> ServingProcess:
    return ServingProcess(registered.settings.home, tmp / f"{registered.version.name}.log",
                          sidecar.url, model=registered.version.name).start()


@pytest.fixture(scope="module")
def cnn_server(digits_cnn: Registered, sidecar: SidecarProcess,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingProcess]:
    server = _serve(digits_cnn, sidecar, tmp_path_factory.mktemp("cnn"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def gru_server(sequences_gru: Registered, sidecar: SidecarProcess,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingProcess]:
    server = _serve(sequences_gru, sidecar, tmp_path_factory.mktemp("gru"))
    yield server
    server.close()


def _ort(version: ModelVersion, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(version.onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.astype(np.float32)})[0]


def _proba(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    preds = response.json()["predictions"]
    return np.array([list(p["probabilities"].values()) for p in preds], np.float32)


def _digits(cnn: Registered, n: int) -> np.ndarray:
    ds, split = cnn.trained.dataset, cnn.trained.split
    return ds.features[split.test[:n]]  # rows of 64 pixels


def test_cnn_serves_images_in_every_form(digits_cnn: Registered, cnn_server: ServingProcess) -> None:
    rows = _digits(digits_cnn, 12)
    rows[0, 5] = np.nan  # a missing pixel: imputed inside the graph
    images = rows.reshape(-1, 1, 8, 8)
    expected = _ort(digits_cnn.version, images)
    as_json = [[[[None if np.isnan(v) else float(v) for v in line] for line in ch] for ch in img]
               for img in images]
    nested = _proba(cnn_server.client.post("/predict", json={"instances": as_json}))
    np.testing.assert_allclose(nested, expected, atol=1e-6)
    flat = [[None if np.isnan(v) else float(v) for v in row] for row in rows]
    np.testing.assert_allclose(_proba(cnn_server.client.post("/predict", json={"instances": flat})),
                               expected, atol=1e-6)
    names = digits_cnn.version.metadata.feature_names
    records = [dict(zip(names, r, strict=True)) for r in flat]
    np.testing.assert_allclose(
        _proba(cnn_server.client.post("/predict", json={"instances": records})), expected, atol=1e-6)
    # the test split's labels: the served CNN is as accurate as its metadata says
    labels = digits_cnn.trained.dataset.target[digits_cnn.trained.split.test[:12]]
    assert (nested.argmax(1) == labels).mean() >= 0.9


def test_cnn_over_the_open_inference_protocol(digits_cnn: Registered,
                                              cnn_server: ServingProcess) -> None:
    import tritonclient.http as triton

    images = _digits(digits_cnn, 5).reshape(-1, 1, 8, 8).astype(np.float32)
    expected = _ort(digits_cnn.version, images)
    meta = httpx.get(f"{cnn_server.url}/v2/models/digits-cnn", timeout=10).json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    client = triton.InferenceServerClient(cnn_server.url.removeprefix("http://"))
    for binary in (True, False):
        tensor = triton.InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=binary)
        result = client.infer("digits-cnn", [tensor])
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
    client.close()


@pytest.mark.parametrize(
    ("instance", "field", "message"),
    [
        # one row of the image is short
        ([[[0.0] * 8] * 7 + [[0.0] * 7]], "instances[0][0][7]", "expected 8 values, got 7"),
        # a flat row of pixels one short
        ([0.0] * 63, "instances[0]", "expected 64 values, got 63"),
        # a pixel that is not a number, in row 3 of the image
        ([[[0.0] * 8] * 3 + [[0.0, 0.0, "x"] + [0.0] * 5] + [[0.0] * 8] * 4], "instances[0][0][3][2]",
         "expected a number"),
    ],
)
def test_cnn_bad_images_get_4xx_naming_the_field(cnn_server: ServingProcess, instance: list,
                                                 field: str, message: str) -> None:
    response = cnn_server.client.post("/predict", json={"instances": [instance]})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == field and message in body["error"], body


def test_cnn_batch_scores_rows_of_pixels(digits_cnn: Registered, cnn_server: ServingProcess) -> None:
    rows = _digits(digits_cnn, 30)
    frame = pd.DataFrame(rows, columns=digits_cnn.version.metadata.feature_names)
    response = cnn_server.client.post("/batch/score", content=frame.to_csv(index=False),
                                      headers={"content-type": "text/csv"})
    assert response.status_code == 200, response.text
    scored = pd.read_csv(io.BytesIO(response.content))
    expected = _ort(digits_cnn.version, rows.reshape(-1, 1, 8, 8)).argmax(1)
    assert scored["prediction"].tolist() == expected.tolist()


def test_gru_serves_sequences_of_any_length(sequences_gru: Registered,
                                            gru_server: ServingProcess) -> None:
    task = SequenceTask()
    for length, seed in ((24, 1), (10, 2), (40, 3)):  # trained on 24 steps (stretched 12-48)
        x, y = task.sample(16, length=length, seed=seed)
        response = gru_server.client.post("/predict", json={"instances": x.tolist()})
        proba = _proba(response)
        np.testing.assert_allclose(proba, _ort(sequences_gru.version, x), atol=1e-5)
        if length == 24:
            assert (proba.argmax(1) == y).mean() >= 0.8
    # OIP: [rows, steps, channels], JSON and binary
    import tritonclient.http as triton

    x, _ = task.sample(4, length=17, seed=4)
    client = triton.InferenceServerClient(gru_server.url.removeprefix("http://"))
    for binary in (True, False):
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x.astype(np.float32), binary_data=binary)
        got = client.infer("sequences-gru", [tensor]).as_numpy("probabilities")
        np.testing.assert_allclose(got, _ort(sequences_gru.version, x), atol=1e-5)
    client.close()


@pytest.mark.parametrize(
    ("body", "status", "field", "message"),
    [
        # sequences of two lengths in one request
        ({"instances": [[[0.0] * 3] * 5, [[0.0] * 3] * 6]}, 422, "instances[1]",
         "differs from instances[0]'s"),
        # a step with 2 of the 3 channels
        ({"instances": [[[0.0] * 3, [0.0] * 2]]}, 422, "instances[0][1]", "expected 3 values, got 2"),
        # an empty sequence
        ({"instances": [[]]}, 422, "instances[0]", "expected at least 1 values, got 0"),
        # a flat row is no sequence
        ({"instances": [[0.0, 1.0, 2.0]]}, 422, "instances[0][0]", "expected an array of numbers"),
    ],
)
def test_gru_bad_sequences_get_4xx(gru_server: ServingProcess, body: dict, status: int,
                                   field: str, message: str) -> None:
    response = gru_server.client.post("/predict", json=body)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field and message in response.json()["error"]


def test_gru_refuses_batch_scoring_of_rows(gru_server: ServingProcess) -> None:
    response = gru_server.client.post("/batch/score", content="c0,c1,c2\n1,2,3\n",
                                      headers={"content-type": "text/csv"})
    assert response.status_code == 422
    assert "takes sequences [rows, steps, 3]" in response.json()["error"]


def test_the_sidecar_takes_their_events(sidecar: SidecarProcess, cnn_server: ServingProcess,
                                        gru_server: ServingProcess) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    x, _ = SequenceTask().sample(50, length=24, seed=5)
    assert gru_server.client.post("/predict", json={"instances": x.tolist()}).status_code == 200
    pixels = np.zeros((3, 64)).tolist()
    assert cnn_server.client.post("/predict", json={"instances": pixels}).status_code == 200

    def counts() -> dict[tuple[str, str], float]:
        text = httpx.get(f"{sidecar.url}/metrics", timeout=10).text
        return {(s.name, s.labels.get("model", "")): s.value
                for f in text_string_to_metric_families(text) for s in f.samples
                if s.name in ("modelloop_events_ingested_total", "modelloop_events_rejected_total")}

    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        c = counts()
        if c.get(("modelloop_events_ingested_total", "sequences-gru"), 0) >= 50 and \
                c.get(("modelloop_events_ingested_total", "digits-cnn"), 0) > 0:
            break
        time.sleep(0.2)
    c = counts()
    assert c.get(("modelloop_events_ingested_total", "sequences-gru"), 0) >= 50, c
    assert c.get(("modelloop_events_ingested_total", "digits-cnn"), 0) > 0, c
    assert not any(v for (name, _), v in c.items() if name == "modelloop_events_rejected_total"), c
    # the drift check reads the stored rows against each version's reference sample
    status = httpx.post(f"{sidecar.url}/check", params={"model": "sequences-gru"}, timeout=60)
    assert status.status_code == 200, status.text
