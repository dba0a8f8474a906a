"""A model repository in one server: a classifier and a regressor of different architectures
served by ONE real `modelloop serve`, each with its own OIP routes and ``/models/{name}/predict``;
the OIP repository extension (index, load, unload) under load; a broken model beside them.

The classifier `churn` (the default model) is the tests' numpy MLP exported to ONNX; the regressor
`price` is trained with PyTorch by ``training.pipeline.train_and_register``; `broken` is a valid
graph whose outputs are NaN, which fails its check when it loads.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelloop.registry import Registry, atomic_write_bytes
from modelloop.schemas import Task
from modelloop.synthetic import TARGET, SyntheticTask
from tests.serving.conftest import (
    AUTH,
    KEY,
    MODEL,
    Server,
    free_port,
    start_server,
    stop_server,
    wait_until,
)
from tests.serving.onnx_models import register_mlp

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("show_log_on_failure")]
REGRESSOR = "price"
BROKEN = "broken"
ROW = [1.5] * 20
PRICE_ROW = [0.5] * 8


def _register_regressor(home: Path) -> None:
    """`price` v1: a PyTorch MLP regressor on 8 features, trained for a few epochs, promoted."""
    from training.config import TrainingConfig
    from training.pipeline import TrainOptions, train_and_register
    from training.settings import TrainingSettings

    synth = SyntheticTask(n_features=8, n_informative=8, n_classes=2, seed=3)
    df = synth.sample(600, missing=0.0)
    df[TARGET] = np.tanh(df[synth.feature_names[:4]].to_numpy() / 10).sum(axis=1)
    settings = TrainingSettings(home=home)
    config = TrainingConfig.from_settings(settings, epochs=2, task=Task.regression, model={"hidden": [8]})
    train_and_register(df, name=REGRESSOR, promote=True, options=TrainOptions(
        config=config, settings=settings, progress=False))


def _register_broken(registry: Registry) -> None:
    """`broken` v1: its export answers NaN; production is pointed at it by hand (the registry
    refuses to), as a damaged file after promotion would be."""
    meta = register_mlp(registry, BROKEN, seed=1, rows=400, promote=False, zero_scale=True)
    atomic_write_bytes(registry.root / BROKEN / "aliases.json",
                       json.dumps({"production": meta.version}).encode())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("repo-home")
    registry = Registry(home / "registry")
    register_mlp(registry, MODEL, n_features=20, n_classes=3, seed=0)
    _register_regressor(home)
    _register_broken(registry)
    env = {"MODELLOOP_SERVING_API_KEY": KEY, "MODELLOOP_SERVING_MODEL": MODEL,
           "MODELLOOP_SERVING_MAX_LOADED_MODELS": "2", "MODELLOOP_SERVING_ALIAS_POLL_INTERVAL_S": "0.1"}
    grpc_port = free_port()
    srv = start_server(home, home / "server.log", env, "--workers", "2", "--grpc-port", str(grpc_port))
    srv.env["GRPC"] = f"127.0.0.1:{grpc_port}"
    import sys

    sys.modules[__name__]._server = srv  # type: ignore[attr-defined]
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


def test_each_model_answers_oip_metadata_infer_and_predict(client: httpx.Client) -> None:
    churn = client.get(f"/v2/models/{MODEL}").json()
    price = client.get(f"/v2/models/{REGRESSOR}").json()
    assert churn["inputs"][0]["shape"] == [-1, 20]
    assert price["inputs"][0]["shape"] == [-1, 8]
    assert {o["name"] for o in churn["outputs"]} != {o["name"] for o in price["outputs"]}

    for name, row in ((MODEL, ROW), (REGRESSOR, PRICE_ROW)):
        infer = client.post(f"/v2/models/{name}/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [2, len(row)], "data": [row, row]}]})
        assert infer.status_code == 200, infer.text
        assert infer.json()["model_name"] == name
        pred = client.post(f"/models/{name}/predict", json={"instances": [row]})
        assert pred.status_code == 200, pred.text
        assert pred.json()["model"] == name

    default = client.post("/predict", json={"instances": [ROW]}).json()
    assert default["model"] == MODEL
    assert "label" in default["predictions"][0]
    regression = client.post(f"/models/{REGRESSOR}/predict", json={"instances": [PRICE_ROW]}).json()
    assert "label" not in regression["predictions"][0]
    # a model's rows do not fit the other
    assert client.post("/predict", json={"instances": [PRICE_ROW]}).status_code == 422
    missing = client.post("/models/nope/predict", json={"instances": [ROW]})
    assert missing.status_code == 404
    assert "model 'nope' is not served here" in missing.json()["error"]


def test_grpc_routes_each_model_by_name(server: Server, client: httpx.Client) -> None:
    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException

    grpc = tgrpc.InferenceServerClient(server.env["GRPC"])
    auth = {"authorization": f"Bearer {KEY}"}  # (gRPC metadata keys are lower case)
    try:
        wait_until(lambda: _grpc_live(grpc), 30, "the gRPC server to answer", interval=0.2)
        for name, row in ((MODEL, ROW), (REGRESSOR, PRICE_ROW)):
            meta = grpc.get_model_metadata(name, headers=auth)
            assert meta.name == name
            assert list(meta.inputs[0].shape) == [-1, len(row)]
            x = np.asarray([row, row], np.float32)
            inp = tgrpc.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            first = meta.outputs[0].name
            got = grpc.infer(name, [inp], headers=auth).as_numpy(first)
            rest = client.post(f"/v2/models/{name}/infer", json={"inputs": [
                {"name": "input", "datatype": "FP32", "shape": [2, len(row)], "data": [row, row]}]}).json()
            expected = next(o for o in rest["outputs"] if o["name"] == first)
            np.testing.assert_allclose(got.ravel(), np.asarray(expected["data"], np.float32), rtol=1e-6)
        x = np.asarray([ROW], np.float32)
        inp = tgrpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException, match=f"model '{BROKEN}' is unavailable"):
            grpc.infer(BROKEN, [inp], headers=auth)
    finally:
        grpc.close()


def _grpc_live(grpc: object) -> bool:
    from tritonclient.utils import InferenceServerException

    try:
        return bool(grpc.is_server_live())  # type: ignore[attr-defined]
    except InferenceServerException:
        return False


def _index(client: httpx.Client) -> dict[str, dict[str, str]]:
    return {m["name"]: m for m in client.post("/v2/repository/index", json={}).json()}


def test_the_repository_index_lists_every_model_with_its_state(client: httpx.Client) -> None:
    # (each worker has its own index: the requests and the index go through one connection)
    client.post(f"/models/{REGRESSOR}/predict", json={"instances": [PRICE_ROW]})
    client.get(f"/v2/models/{BROKEN}")  # tries to load it
    index = _index(client)
    assert set(index) == {MODEL, REGRESSOR, BROKEN}
    assert index[MODEL]["state"] == index[REGRESSOR]["state"] == "READY"
    assert index[BROKEN]["state"] == "UNAVAILABLE"
    assert "is not finite" in index[BROKEN]["reason"]
    ready = client.post("/v2/repository/index", json={"ready": True}).json()
    assert {m["name"] for m in ready} == {MODEL, REGRESSOR}
    assert httpx.post(f"{client.base_url}/v2/repository/index", json={}).status_code == 401


def test_a_broken_model_answers_503_naming_it_and_the_others_keep_serving(client: httpx.Client) -> None:
    for path, body in ((f"/models/{BROKEN}/predict", {"instances": [ROW]}),
                       (f"/v2/models/{BROKEN}/infer", {"inputs": [
                           {"name": "input", "datatype": "FP32", "shape": [1, 20], "data": ROW}]})):
        resp = client.post(path, json=body)
        assert resp.status_code == 503
        assert resp.json()["code"] == "model_unavailable"
        assert f"model '{BROKEN}' is unavailable" in resp.json()["error"]
        assert "not finite" in resp.json()["error"]
    load = client.post(f"/v2/repository/models/{BROKEN}/load")
    assert load.status_code == 503
    assert "not finite" in load.json()["error"]
    assert client.get(f"/v2/models/{BROKEN}/ready").status_code == 503
    assert client.post("/predict", json={"instances": [ROW]}).status_code == 200
    assert client.post(f"/models/{REGRESSOR}/predict", json={"instances": [PRICE_ROW]}).status_code == 200


class Load:
    """Client threads sending requests to both models without pause; every answer is recorded."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.answers: Counter[tuple[str, int, str]] = Counter()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(name, row), daemon=True)
                         for name, row in ((MODEL, ROW), (REGRESSOR, PRICE_ROW), (MODEL, ROW),
                                           (REGRESSOR, PRICE_ROW))]

    def _run(self, name: str, row: list[float]) -> None:
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    resp = client.post(f"/models/{name}/predict", json={"instances": [row, row]})
                    code = resp.json().get("code", "") if resp.status_code != 200 else ""
                    key = (name, resp.status_code, code)
                except httpx.HTTPError as exc:
                    key = (name, 0, repr(exc))
                with self._lock:
                    self.answers[key] += 1

    def count(self, name: str) -> int:
        with self._lock:
            return sum(n for (m, _, _), n in self.answers.items() if m == name)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)


def _only_refused(url: str) -> bool:
    """Whether requests on 8 new connections (spread over the workers) are all refused with 503."""
    codes = set()
    for _ in range(8):
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            codes.add(c.post(f"/models/{REGRESSOR}/predict", json={"instances": [PRICE_ROW]}).status_code)
    return codes == {503}


def test_unload_then_load_under_load_fails_no_request(server: Server, client: httpx.Client) -> None:
    with Load(server.url) as load:
        wait_until(lambda: load.count(REGRESSOR) > 20, 60, "requests to both models")
        assert client.post(f"/v2/repository/models/{REGRESSOR}/unload").status_code == 200
        seen = load.count(REGRESSOR)
        wait_until(lambda: load.count(REGRESSOR) > seen + 20, 60, "requests to the unloaded model")
        index = _index(client)
        assert index[REGRESSOR]["state"] == "UNAVAILABLE"
        assert index[REGRESSOR]["reason"].startswith("unloaded")
        # the other worker follows the unload too: every request to the model is refused
        wait_until(lambda: _only_refused(server.url), 30, "both workers to refuse the unloaded model")
        assert client.post(f"/v2/repository/models/{REGRESSOR}/load").status_code == 200
        seen = load.count(REGRESSOR)
        wait_until(lambda: load.count(REGRESSOR) > seen + 20, 60, "requests after the load")
    answers = dict(load.answers)
    # every answer: 200, or (the unloaded model only, while it was unloaded) the documented 503
    assert {k for k in answers if k[1] != 200} <= {(REGRESSOR, 503, "model_unavailable")}, answers
    assert answers[(REGRESSOR, 503, "model_unavailable")] > 0
    assert answers[(MODEL, 200, "")] > 0
    assert answers[(REGRESSOR, 200, "")] > 0
    assert client.post(f"/models/{REGRESSOR}/predict", json={"instances": [PRICE_ROW]}).status_code == 200


def test_metrics_carry_each_model_s_name(server: Server) -> None:
    wait_until(lambda: server.metric("modelloop_serving_rows_total", model=REGRESSOR, mode="realtime") > 0
               and server.metric("modelloop_serving_rows_total", model=MODEL, mode="realtime") > 0,
               10, "rows of both models in /metrics")
    assert server.metric("modelloop_serving_model_info", model=REGRESSOR, version="1") == 1
    assert server.metric("modelloop_serving_errors_total", model=REGRESSOR, reason="unavailable") > 0


def test_beyond_the_budget_the_least_recently_used_model_is_unloaded_after_its_requests(
        tmp_path: Path) -> None:
    """In-process, two real models and a budget of one: loading the second unloads the first,
    but only once the request holding it is done (it runs on it meanwhile); the first loads
    again on its next request."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from serving.settings import ServingSettings
    from serving.state import ServingState

    registry = Registry(tmp_path / "registry")
    register_mlp(registry, MODEL, seed=0, rows=400)
    register_mlp(registry, "other", n_features=5, seed=1, rows=400)
    state = ServingState(ServingSettings(home=tmp_path, model=MODEL, max_loaded_models=1), CollectorRegistry())
    repo = state.repository

    async def scenario() -> None:
        await state.start()
        try:
            held = await repo.acquire(MODEL)
            loading = asyncio.create_task(repo.acquire("other"))
            for _ in range(1000):  # until the budget starts unloading `churn` (a bounded poll)
                await asyncio.sleep(0.01)
                if held.state == "UNLOADING":
                    break
            assert held.state == "UNLOADING"
            assert not loading.done()  # it waits for the request holding `churn`
            result = await held.batcher.predict(held.manager.current, np.full((2, 20), 1.5, np.float32))
            assert result.outputs["probabilities"].shape == (2, 3)
            repo.release(held)
            other = await loading
            repo.release(other)
            index = {m["name"]: m for m in repo.index()}
            assert index["other"]["state"] == "READY"
            assert index[MODEL]["state"] == "UNAVAILABLE"
            assert "least recently used" in index[MODEL]["reason"]
            again = await repo.acquire(MODEL)  # loads again, unloading `other`
            repo.release(again)
            assert [m["state"] for m in repo.index()] == ["READY", "UNAVAILABLE"]
        finally:
            await state.stop()

    asyncio.run(scenario())
