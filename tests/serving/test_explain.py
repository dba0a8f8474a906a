"""Explanations against a real `modelloop serve` and a real `modelloop batch explain`: SHAP
attributions of trained MLPs' ONNX graphs add up to the served outputs (within 1e-4), over
``/explain`` and the OIP ``/v2/models/{name}/explain``; bad requests get a 4xx naming the field."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from modelloop.registry import Registry
from modelloop.schemas import Task
from tests.serving.conftest import AUTH, FEATURES, KEY, MODELLOOP, start_server, stop_server
from tests.serving.onnx_models import register_mlp

pytestmark = pytest.mark.integration
TOL = 1e-4
MAX_EVALS = 50_000
BACKGROUND = 50  # one permutation of 20 features: 41 masked inputs x 50 rows = 2050 evaluations


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`churn` (3 classes) and `price` (a regressor), both of 20 features, trained and promoted."""
    home = tmp_path_factory.mktemp("explain-home")
    registry = Registry(home / "registry")
    register_mlp(registry, "churn", n_features=20, n_classes=3, seed=0)
    register_mlp(registry, "price", n_features=20, task=Task.regression, seed=1)
    return home


@pytest.fixture(scope="module")
def server(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    env = {"MODELLOOP_SERVING_API_KEY": KEY, "MODELLOOP_SERVING_MODEL": "churn",
           "MODELLOOP_SERVING_EXPLAIN_MAX_EVALS": str(MAX_EVALS),
           "MODELLOOP_SERVING_EXPLAIN_BACKGROUND_ROWS": str(BACKGROUND)}
    srv = start_server(home, tmp_path_factory.mktemp("log") / "server.log", env, "--workers", "1")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[httpx.Client]:
    # the first explanation starts the worker's explanation process (shap compiles its kernels)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=180) as c:
        yield c


def rows(home: Path, model: str, n: int) -> pd.DataFrame:
    return Registry(home / "registry").get(model, "production").reference()[FEATURES].head(n)


def test_attributions_add_up_to_the_predicted_probabilities(client: httpx.Client, home: Path) -> None:
    x = rows(home, "churn", 4)
    x.iloc[1, 3] = None  # a missing value: the graph imputes it, the explanation follows
    records = [{k: (None if pd.isna(v) else float(v)) for k, v in r.items()} for r in x.to_dict("records")]
    r = client.post("/explain", json={"instances": records}, headers={"X-Request-ID": "why-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"], body["request_id"]) == ("churn", 1, "why-1")
    assert body["background_rows"] == BACKGROUND and body["permutations"] >= 1
    assert body["evaluations_per_instance"] * 4 <= MAX_EVALS
    predicted = client.post("/predict", json={"instances": records}).json()["predictions"]
    outputs = [f"probability_class_{k}" for k in range(3)]
    for expl, pred in zip(body["explanations"], predicted, strict=True):
        assert list(expl["values"]) == outputs
        for out in outputs:
            attributions = expl["attributions"][out]
            assert list(attributions) == FEATURES
            # the explained value is the served probability, and the attributions add up to it
            assert expl["values"][out] == pytest.approx(pred["probabilities"][out.removeprefix("probability_")], abs=1e-6)
            assert abs(expl["base_values"][out] + sum(attributions.values()) - expl["values"][out]) <= TOL
        assert expl["additivity_error"] <= TOL
    # the base value is the same for every instance: the mean output over the background
    assert len({tuple(e["base_values"].values()) for e in body["explanations"]}) == 1


def test_oip_explain_of_a_regressor_adds_up(client: httpx.Client, home: Path) -> None:
    x = rows(home, "price", 3).to_numpy(np.float32)
    req = {"id": "oip-1", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                      "data": [None if np.isnan(v) else float(v) for v in x.ravel()]}]}
    r = client.post("/v2/models/price/explain", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("price", "1", "oip-1")
    params = body["parameters"]
    assert params["feature_names"] == FEATURES and params["output_names"] == ["prediction"]
    tensors = {t["name"]: np.asarray(t["data"]).reshape(t["shape"]) for t in body["outputs"]}
    assert tensors["attributions"].shape == (3, 20, 1)
    served = client.post("/v2/models/price/infer", json=req).json()["outputs"][0]["data"]
    np.testing.assert_allclose(tensors["values"].ravel(), served, atol=1e-6)
    total = tensors["base_values"] + tensors["attributions"].sum(axis=1)
    assert np.abs(total - tensors["values"]).max() <= TOL
    assert params["additivity_error"] <= TOL
    # the version route explains the served version too
    again = client.post("/v2/models/price/versions/1/explain", json=req)
    assert again.status_code == 200 and again.json()["outputs"] == body["outputs"]  # seeded: the same


ROW = list(range(20))


@pytest.mark.parametrize(("path", "body", "headers", "status", "code", "field"), [
    # no bearer token
    ("/explain", {"instances": [ROW]}, {"Authorization": ""}, 401, "unauthorized", "Authorization"),
    # not JSON
    ("/explain", b"{nope", {}, 400, "malformed_json", "body"),
    # no instances
    ("/explain", {"rows": [ROW]}, {}, 422, "missing_field", "instances"),
    # a feature the model does not have (and one it lacks)
    ("/explain", {"instances": [{**{f: 1.0 for f in FEATURES[1:]}, "zz": 1.0}]}, {}, 422,
     "unknown_feature", "instances[0].zz"),
    # a string where a number goes
    ("/explain", {"instances": [["a", *ROW[1:]]]}, {}, 422, "wrong_type", "instances[0][0]"),
    # more instances than MAX_EVALS lets one permutation each (25 x 2050 > 50,000)
    ("/explain", {"instances": [ROW] * 25}, {}, 413, "too_many_evaluations", "instances"),
    # a model that is not served
    ("/v2/models/nope/explain", {"inputs": []}, {}, 404, "not_found", "model_name"),
    # a version that is not served
    ("/v2/models/churn/versions/7/explain", {"inputs": []}, {}, 404, "not_found", "model_version"),
    # an OIP tensor of the wrong width
    ("/v2/models/churn/explain", {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                                              "data": [1, 2, 3]}]}, {}, 400, "wrong_shape", "inputs[0].shape"),
])
def test_bad_requests_are_refused_naming_the_field(client: httpx.Client, path: str, body: Any,
                                                   headers: dict[str, str], status: int, code: str,
                                                   field: str) -> None:
    content = body if isinstance(body, bytes) else None
    r = client.post(path, content=content, json=None if content else body, headers=headers)
    assert (r.status_code, r.json()["code"], r.json()["field"]) == (status, code, field), r.text


def test_batch_explain_of_a_csv(home: Path, tmp_path: Path) -> None:
    x = rows(home, "churn", 30).assign(id=[f"r{i}" for i in range(30)])
    src, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    x.to_csv(src, index=False)
    env = {"MODELLOOP_HOME": str(home), "PATH": str(Path(MODELLOOP).parent)}
    run = subprocess.run([MODELLOOP, "batch", "explain", str(src), str(out), "-n", "churn", "-k", "id",
                          "--max-evals", "10000", "--background-rows", "50"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "explained 30 rows" in run.stderr
    got = pd.read_parquet(out)
    assert got["id"].tolist() == x["id"].tolist()
    assert (got["additivity_error"] <= TOL).all()
    for k in range(3):
        out_col = f"probability_class_{k}"
        total = got[f"{out_col}__base"] + got[[f"{out_col}__{f}" for f in FEATURES]].sum(axis=1)
        np.testing.assert_allclose(total, got[out_col], atol=TOL)
    # a missing feature column: one line naming the file and the column, exit 2
    x.drop(columns=["f03"]).to_csv(src, index=False)
    bad = subprocess.run([MODELLOOP, "batch", "explain", str(src), str(out), "-n", "churn"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and str(src) in bad.stderr and "'f03'" in bad.stderr


def test_an_image_model_is_explained_per_pixel_and_a_sequence_model_is_refused(tmp_path: Path) -> None:
    import shap
    from onnx import TensorProto, helper, numpy_helper

    from modelloop.explain import background_rows, explain, session_runner
    from modelloop.schemas import ModelMetadata, TensorSpec
    from serving.explain import rows_of
    from serving.validation import RequestError

    # a 4x4 one-channel image classifier: softmax(flattened pixels @ w), a real ONNX graph
    w = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "image", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, 4, 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        [numpy_helper.from_array(w, "w")])
    pixels = [f"px{i}" for i in range(16)]
    meta = ModelMetadata(name="img", task=Task.classification,
                         inputs=[TensorSpec(name="input", shape=[None, 1, 4, 4])],
                         outputs=[TensorSpec(name="probabilities", shape=[None, 2])],
                         feature_names=pixels, class_labels=["a", "b"])
    rng = np.random.default_rng(1)
    reference = pd.DataFrame(rng.normal(size=(50, 16)), columns=pixels)
    registry = Registry(tmp_path / "registry")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    registry.register(meta, model.SerializeToString(), reference=reference)
    version = registry.get("img", 1)
    x = rows_of(version.metadata, rng.normal(size=(3, 1, 4, 4)).astype(np.float32))  # as /predict parses it
    expl = explain(session_runner(version), version.metadata, x,
                   background_rows(reference, pixels, 20), permutations=2, shap=shap)
    assert expl.attributions.shape == (3, 16, 2)  # per pixel, per class
    assert expl.additivity_error.max() <= TOL
    # a sequence model: refused, naming why
    sequence = ModelMetadata(name="seq", version=1, task=Task.classification,
                             inputs=[TensorSpec(name="input", shape=[None, None, 3])],
                             outputs=[TensorSpec(name="probabilities", shape=[None, 2])],
                             feature_names=["c0", "c1", "c2"], class_labels=["a", "b"])
    with pytest.raises(RequestError) as refused:
        rows_of(sequence, np.zeros((1, 5, 3), np.float32))
    assert (refused.value.status, refused.value.code, refused.value.field) == (422, "not_explainable", "model_name")
    assert "seq v1 takes sequences [rows, steps, 3]" in refused.value.message
