"""Canary traffic against a real `modelloop serve` (2 workers): a share of the request ids,
sticky, answered by the canary version; the share set to 0, or the alias removed, under load.

The canary is set as an operator sets it, with ``modelloop models promote --alias canary`` and
``modelloop models traffic --canary-share``; serving follows the registry without a restart.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tgrpc

from modelloop.registry import Registry
from tests.serving.conftest import (
    MODEL,
    MODELLOOP,
    Hammer,
    Server,
    Sidecar,
    free_port,
    start_server,
    stop_server,
    wait_until,
)
from tests.serving.onnx_models import register_mlp

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("show_log_on_failure")]
SHARE = 0.2
ROWS = np.random.default_rng(7).normal(0, 2, size=(2000, 20)).astype(np.float32)


@pytest.fixture(scope="module")
def server(model_home: Path, sidecar: Sidecar, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    register_mlp(Registry(model_home / "registry"), MODEL, seed=1, promote=False)  # v2: the canary
    env = {"MODELLOOP_SERVING_ALIAS_POLL_INTERVAL_S": "0.1", "MODELLOOP_SERVING_SIDECAR_URL": sidecar.url,
           "MODELLOOP_SERVING_EVENT_FLUSH_INTERVAL_S": "0.1"}
    grpc_port = free_port()
    srv = start_server(model_home, tmp_path_factory.mktemp("log") / "server.log", env, "--workers", "2",
                       "--grpc-port", str(grpc_port))
    srv.env["GRPC"] = f"127.0.0.1:{grpc_port}"
    sys.modules[__name__]._server = srv  # type: ignore[attr-defined]
    yield srv
    stop_server(srv)


def models_cli(server: Server, *args: str) -> str:
    out = subprocess.run([MODELLOOP, "models", *args], env=server.env | {"MODELLOOP_HOME": str(server.home)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def canaries(server: Server) -> set[Any]:
    """The canary (version, share) each worker reports (several requests reach both workers)."""
    found = set()
    for _ in range(12):
        canary = httpx.get(f"{server.url}/admin/model").json()["canary"]
        found.add(None if canary is None else (canary["version"], canary["share"]))
    return found


def onnx_probabilities(server: Server, version: int, x: np.ndarray) -> np.ndarray:
    path = Registry(server.home / "registry").get(MODEL, version).onnx_path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {session.get_inputs()[0].name: x})[0]


def test_canary_share_is_sticky_and_answers_with_the_canary_version(server: Server, sidecar: Sidecar) -> None:
    assert "canary -> v2" in models_cli(server, "promote", MODEL, "2", "--alias", "canary")
    models_cli(server, "traffic", MODEL, "--canary-share", str(SHARE))
    wait_until(lambda: canaries(server) == {(2, SHARE)}, 60, "both workers to load the canary")
    expected = {v: onnx_probabilities(server, v, ROWS) for v in (1, 2)}
    answered: dict[str, int] = {}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for i, row in enumerate(ROWS):
            rid = f"canary-test-{i}"
            resp = client.post("/predict", json={"instances": [row.tolist()]}, headers={"X-Request-ID": rid})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            answered[rid] = body["version"]
            probs = list(body["predictions"][0]["probabilities"].values())
            np.testing.assert_allclose(probs, expected[body["version"]][i], rtol=1e-6, atol=1e-7)
        counts = Counter(answered.values())
        share = counts[2] / len(answered)
        print(f"canary share over {len(answered)} ids: {share:.4f} ({dict(counts)})")
        assert set(counts) == {1, 2} and abs(share - SHARE) <= 0.03, counts
        # sticky: the same id lands on the same version again, whichever worker takes it
        for i in range(0, 2000, 10):
            rid = f"canary-test-{i}"
            resp = client.post("/predict", json={"instances": [ROWS[i].tolist()]}, headers={"X-Request-ID": rid})
            assert resp.json()["version"] == answered[rid], rid
        # OIP: the id in the body routes the same way; model_version says which answered
        for i in range(0, 400, 4):
            rid = f"canary-test-{i}"
            doc = {"id": rid, "inputs": [{"name": "input", "shape": [1, 20], "datatype": "FP32",
                                          "data": ROWS[i].tolist()}]}
            out = client.post(f"/v2/models/{MODEL}/infer", json=doc).json()
            assert out["model_version"] == str(answered[rid])
            probs = next(o for o in out["outputs"] if o["name"] == "probabilities")["data"]
            np.testing.assert_allclose(probs, expected[answered[rid]][i], rtol=1e-6, atol=1e-7)
    # OIP over gRPC: the same ids, the same versions
    grpc = tgrpc.InferenceServerClient(server.env["GRPC"])
    wait_until(grpc.is_server_ready, 30, "the gRPC server")
    for i in range(1, 400, 4):
        rid = f"canary-test-{i}"
        inp = tgrpc.InferInput("input", [1, 20], "FP32")
        inp.set_data_from_numpy(ROWS[i:i + 1])
        result = grpc.infer(MODEL, [inp], request_id=rid)
        assert result.get_response().model_version == str(answered[rid]), rid
        np.testing.assert_allclose(result.as_numpy("probabilities")[0], expected[answered[rid]][i],
                                   rtol=1e-6, atol=1e-7)
    grpc.close()
    # the events of each request name the version that answered it
    def events() -> dict[str, int]:
        return {e["request_id"][:-2]: e["version"] for e in sidecar.events
                if e["request_id"].startswith("canary-test-")}
    wait_until(lambda: len(events()) == len(answered), 30, "the events of every request")
    assert events() == answered


@pytest.mark.parametrize("end", [("traffic", MODEL, "--canary-share", "0"), ("unalias", MODEL, "canary")],
                         ids=["share-0", "alias-removed"])
def test_ending_the_canary_under_load_fails_no_request(server: Server, end: tuple[str, ...]) -> None:
    models_cli(server, "promote", MODEL, "2", "--alias", "canary")
    models_cli(server, "traffic", MODEL, "--canary-share", str(SHARE))
    wait_until(lambda: canaries(server) == {(2, SHARE)}, 60, "both workers to load the canary")
    with Hammer(server.url, ids=True, instances=lambda n: [ROWS[n % len(ROWS)].tolist()]) as hammer:
        wait_until(lambda: hammer.count() >= 300, 60, "load with the canary on")
        models_cli(server, *end)
        wait_until(lambda: canaries(server) == {None}, 60, "both workers to close the canary")
        closed = hammer.count() + 8  # (up to 4 requests were in flight on each worker)
        wait_until(lambda: hammer.count() >= closed + 300, 60, "load after the canary closed")
    assert hammer.failures == []
    assert set(hammer.versions[:300]) == {1, 2}, Counter(hammer.versions[:300])
    assert set(hammer.versions[closed:]) == {1}, Counter(hammer.versions[closed:])
    assert server.metric("modelloop_serving_model_info", model=MODEL, version="2") == 0
    assert server.metric("modelloop_serving_model_info", model=MODEL, version="1") == 1


def served(server: Server) -> set[tuple[int, Any]]:
    """The (production version, canary version or None) each worker reports."""
    found = set()
    for _ in range(12):
        doc = httpx.get(f"{server.url}/admin/model").json()
        found.add((doc["version"], doc["canary"] and doc["canary"]["version"]))
    return found


def test_the_canary_swaps_and_is_promoted_without_a_failed_request(server: Server) -> None:
    v3 = register_mlp(Registry(server.home / "registry"), MODEL, seed=2, promote=False).version
    models_cli(server, "promote", MODEL, "2", "--alias", "canary")
    models_cli(server, "traffic", MODEL, "--canary-share", "0.5")
    wait_until(lambda: served(server) == {(1, 2)}, 60, "both workers to load the canary")
    with Hammer(server.url, ids=True, instances=lambda n: [ROWS[n % len(ROWS)].tolist()]) as hammer:
        wait_until(lambda: hammer.count() >= 200, 60, "load with the canary on")
        models_cli(server, "promote", MODEL, str(v3), "--alias", "canary")  # the canary swaps
        wait_until(lambda: served(server) == {(1, v3)}, 60, "both workers to swap the canary")
        swapped = hammer.count() + 8  # (up to 4 requests were in flight on each worker)
        wait_until(lambda: hammer.count() >= swapped + 300, 60, "load after the canary swapped")
        models_cli(server, "promote", MODEL, str(v3))  # the canary becomes production
        wait_until(lambda: served(server) == {(v3, None)}, 60, "both workers to serve the canary")
        promoted = hammer.count() + 8
        wait_until(lambda: hammer.count() >= promoted + 300, 60, "load after the promotion")
    assert hammer.failures == []
    assert set(hammer.versions[swapped:swapped + 300]) == {1, v3}, Counter(hammer.versions[swapped:])
    assert set(hammer.versions[promoted:]) == {v3}, Counter(hammer.versions[promoted:])
    for version, info in ((1, 0), (2, 0), (v3, 1)):
        assert server.metric("modelloop_serving_model_info", model=MODEL, version=str(version)) == info
