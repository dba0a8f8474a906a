"""Serving a model with categorical features (issue #16): raw strings in every way in.

The model is a real ONNX file built here as training exports one (modelloop/categorical.py):
``input`` float32 ``[N, 2]`` and ``categories`` string ``[N, 2]``, each category column coded by
an ONNX-ML ``LabelEncoder`` (unknown: 0), the codes put back in ``feature_names`` order, then a
small linear head with a softmax. One real ``modelloop serve`` answers the whole module.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelloop.ports import free_port
from modelloop.registry import Registry
from modelloop.schemas import (
    CATEGORIES_INPUT,
    INPUT_NAME,
    PROBABILITIES,
    REF_LABEL,
    ModelMetadata,
    Task,
    TensorSpec,
)
from serving import oip
from serving.app import Routes
from serving.batch import BatchInputError, features_of, score_file
from serving.events import DROP_REASONS, EventEmitter
from serving.predictions import Predictions, interpret
from serving.runtime import ModelLoadError, OnnxRuntime
from serving.settings import ServingSettings
from serving.state import ServingState
from serving.validation import RequestError, parse_instances, unknown_category_error
from tests.modelloop.onnx_graphs import with_predictions
from tests.serving.conftest import Server, Sidecar, events_of, start_server, stop_server, wait_until
from tests.serving.test_events import until

pytestmark = pytest.mark.usefixtures("show_log_on_failure")
served = pytest.mark.integration  # the tests that use the module's server

MODEL = "plans"
FEATURES = ["monthly", "plan", "tenure", "region"]
CATEGORIES = {"plan": ["basic", "pro", "team"], "region": ["eu", "us"]}
NUMERIC = [0, 2]  # positions of the numeric features in FEATURES
CATEGORICAL = [1, 3]


def categorical_graph(weights: np.ndarray, bias: np.ndarray) -> bytes:
    """The graph training exports for FEATURES (contract section 2), with a linear head."""
    n_cat = len(CATEGORICAL)
    split = [f"col{k}" for k in range(n_cat)]
    nodes = [helper.make_node("Split", [CATEGORIES_INPUT], split, axis=1)]
    for k, name in enumerate(f for f in FEATURES if f in CATEGORIES):
        nodes.append(helper.make_node("LabelEncoder", [split[k]], [f"code{k}"], domain="ai.onnx.ml",
                                      keys_strings=CATEGORIES[name],
                                      values_floats=[float(i + 1) for i in range(len(CATEGORIES[name]))],
                                      default_float=0.0))
    # [numeric..., codes...] back to the feature order
    order = np.array([(NUMERIC + CATEGORICAL).index(j) for j in range(len(FEATURES))], np.int64)
    nodes += [
        helper.make_node("Concat", [INPUT_NAME, *[f"code{k}" for k in range(n_cat)]], ["stacked"], axis=1),
        helper.make_node("Gather", ["stacked", "order"], ["features"], axis=1),
        helper.make_node("IsNaN", ["features"], ["nan_mask"]),
        helper.make_node("Where", ["nan_mask", "zero", "features"], ["imputed"]),
        helper.make_node("MatMul", ["imputed", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [PROBABILITIES], axis=-1),
    ]
    init = [numpy_helper.from_array(order, "order"), numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
            numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")]
    graph = helper.make_graph(
        nodes, "categorical",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", len(NUMERIC)]),
         helper.make_tensor_value_info(CATEGORIES_INPUT, TensorProto.STRING, ["batch", n_cat])],
        [helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", weights.shape[1]])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 2)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def run_graph(onnx_bytes: bytes, frame: pd.DataFrame) -> np.ndarray:
    """The model's probabilities for ``frame`` (strings, None missing), fed by hand."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    numbers = frame[[FEATURES[j] for j in NUMERIC]].to_numpy(np.float32)
    text = frame[[FEATURES[j] for j in CATEGORICAL]].fillna("").astype(str).to_numpy(object)
    (out,) = session.run([PROBABILITIES], {INPUT_NAME: numbers, CATEGORIES_INPUT: text})
    return np.asarray(out)


def sample(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "monthly": rng.normal(50, 20, n).round(2),
        "plan": rng.choice(CATEGORIES["plan"], n),
        "tenure": rng.integers(0, 60, n).astype(np.float64),
        "region": rng.choice(CATEGORIES["region"], n),
    })


def register_categorical(registry: Registry) -> tuple[ModelMetadata, bytes]:
    rng = np.random.default_rng(3)
    weights = rng.normal(0, 1, (len(FEATURES), 3)).astype(np.float32) * np.array(
        [[0.05], [1.0], [0.05], [1.0]], np.float32)
    onnx_bytes = categorical_graph(weights, rng.normal(0, 0.1, 3).astype(np.float32))
    frame = sample(200, seed=1)
    proba = run_graph(onnx_bytes, frame)
    reference = frame.copy()
    reference[REF_LABEL] = proba.argmax(axis=1)
    with_predictions(reference, Task.classification, proba)
    meta = ModelMetadata(
        name=MODEL, task=Task.classification, architecture="mlp",
        inputs=[TensorSpec(name=INPUT_NAME, shape=[None, len(NUMERIC)]),
                TensorSpec(name=CATEGORIES_INPUT, dtype="string", shape=[None, len(CATEGORICAL)])],
        outputs=[TensorSpec(name=PROBABILITIES, shape=[None, 3])],
        feature_names=FEATURES, class_labels=["low", "mid", "high"], dataset="synthetic",
        categories=CATEGORIES,
    )
    meta = registry.register(meta, onnx_bytes, reference=reference)
    registry.promote(MODEL, meta.version)
    return meta, onnx_bytes


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    home = tmp_path_factory.mktemp("cat-home")
    _, onnx_bytes = register_categorical(Registry(home / "registry"))
    return home, onnx_bytes


@pytest.fixture(scope="module")
def server(model: tuple[Path, bytes], sidecar: Sidecar,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "MODELLOOP_SERVING_SIDECAR_URL": sidecar.url,
        "MODELLOOP_SERVING_EVENT_FLUSH_INTERVAL_S": "0.1",
    }
    grpc_port = free_port()
    srv = start_server(model[0], tmp_path_factory.mktemp("log") / "server.log", env,
                       "--grpc-port", str(grpc_port))
    srv.env["GRPC"] = f"127.0.0.1:{grpc_port}"
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
            for row in frame.to_dict("records")]


def probabilities(answer: dict[str, Any]) -> np.ndarray:
    return np.array([[p["probabilities"][c] for c in ("low", "mid", "high")] for p in answer["predictions"]])


@served
def test_predict_takes_strings_and_equals_onnx_runtime(client: httpx.Client, model: tuple[Path, bytes]) -> None:
    frame = sample(40, seed=5)
    frame.loc[3, "plan"] = None  # a missing category: the graph's unknown code
    frame.loc[4, "monthly"] = np.nan  # a missing number: imputed by the graph
    resp = client.post("/predict", json={"instances": records(frame)})
    assert resp.status_code == 200, resp.text
    np.testing.assert_allclose(probabilities(resp.json()), run_graph(model[1], frame), rtol=1e-5, atol=1e-6)
    # arrays in the feature order answer the same
    arrays = client.post("/predict", json={"instances": [list(r.values()) for r in records(frame)]})
    assert arrays.status_code == 200, arrays.text
    np.testing.assert_allclose(probabilities(arrays.json()), probabilities(resp.json()), rtol=0, atol=0)


@served
@pytest.mark.parametrize(("instances", "field", "message"), [
    # a number where a string belongs
    ([{"monthly": 31.5, "plan": 3, "tenure": 4, "region": "eu"}], "instances[0].plan",
     "instances[0].plan: expected a string, got number 3"),
    # a string where a number belongs: refused as for any model
    ([{"monthly": "31.5", "plan": "pro", "tenure": 4, "region": "eu"}], "instances[0].monthly",
     'instances[0].monthly: expected a number, got string "31.5"'),
    # a boolean is not a category
    ([[31.5, "pro", 4, "eu"], [1.0, "pro", 2, True]], "instances[1][3]",
     "instances[1][3]: expected a string, got boolean true"),
    # nested values are not a category
    ([[31.5, ["pro"], 4, "eu"]], "instances[0][1]", 'instances[0][1]: expected a string, got array ["pro"]'),
])
def test_wrong_kinds_of_values_are_refused_naming_the_field(client: httpx.Client, instances: list[Any],
                                                            field: str, message: str) -> None:
    resp = client.post("/predict", json={"instances": instances})
    assert resp.status_code == 422, resp.text
    assert resp.json() == {"error": message, "code": "wrong_type", "field": field, "errors": [message]}


@served
def test_a_lone_surrogate_is_refused_before_the_batch_and_spares_its_neighbours(client: httpx.Client) -> None:
    """JSON's "\\ud800" decodes to a str no UTF-8 holds: refused at the boundary with a 422, so
    the micro-batch it would have joined (and ONNX Runtime) never sees it; good requests sent
    in the same moment answer 200."""
    good = orjson.dumps({"instances": records(sample(5, seed=41))})
    bad = {  # (built by hand: a JSON encoder refuses to write a lone surrogate)
        "/predict": b'{"instances": [{"monthly": 1, "plan": "\\ud800", "tenure": 2, "region": "eu"}]}',
        f"/v2/models/{MODEL}/infer": b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], '
                                     b'"data": [1, 2]}, {"name": "categories", "datatype": "BYTES", '
                                     b'"shape": [1, 2], "data": ["pro", "eu\\udfff"]}]}',
    }

    def post(path: str, body: bytes) -> httpx.Response:
        return client.post(path, content=body, headers={"Content-Type": "application/json"})

    with ThreadPoolExecutor(8) as pool:
        refused = {path: [pool.submit(post, path, body) for _ in range(6)] for path, body in bad.items()}
        answered = [pool.submit(post, "/predict", good) for _ in range(12)]
    assert [f.result().status_code for f in answered] == [200] * 12
    for path, field, message in [
            ("/predict", "instances[0].plan", "a lone surrogate (\\ud800) is not"),
            (f"/v2/models/{MODEL}/infer", "inputs[1].data[1]", "a lone surrogate (\\udfff) is not")]:
        for f in refused[path]:
            assert f.result().status_code == 422, f.result().text
            error = f"{field}: a category must be UTF-8 text; {message}"
            assert f.result().json() == {"error": error, "code": "wrong_type", "field": field, "errors": [error]}


@served
def test_an_unseen_category_answers_and_is_counted(client: httpx.Client, server: Server,
                                                   model: tuple[Path, bytes]) -> None:
    labels = {"model": MODEL, "feature": "plan"}
    before = server.metric("modelloop_unknown_category_total", **labels)
    frame = sample(3, seed=9)
    frame.loc[0, "plan"] = "enterprise"  # not in the vocabulary
    frame.loc[2, "plan"] = "Pro"  # case matters
    resp = client.post("/predict", json={"instances": records(frame)})
    assert resp.status_code == 200, resp.text
    np.testing.assert_allclose(probabilities(resp.json()), run_graph(model[1], frame), rtol=1e-5, atol=1e-6)
    wait_until(lambda: server.metric("modelloop_unknown_category_total", **labels) >= before + 2, 10,
               "the unknown-category counter to rise by 2")
    assert server.metric("modelloop_unknown_category_total", model=MODEL, feature="region") == 0


@served
def test_events_carry_the_strings(client: httpx.Client, sidecar: Sidecar) -> None:
    resp = client.post("/predict", json={"instances": [{"monthly": 12.25, "plan": "team", "tenure": None,
                                                        "region": "us"}]},
                       headers={"X-Request-ID": "cat-events-1"})
    assert resp.status_code == 200, resp.text

    def sent() -> list[Any]:  # the events as the sidecar's schema reads them
        return [e for b in list(sidecar.batches) if any(c["model"] == MODEL for c in b["columns"])
                for e in events_of(b) if e["request_id"] == "cat-events-1-0"]

    events = wait_until(sent, 10, "the event of cat-events-1 to reach the sidecar")
    assert [e["features"] for e in events] == [[12.25, "team", None, "us"]]


# -- Open Inference Protocol: `input` FP32 beside `categories` BYTES ---------------------------------
def oip_inputs(module: Any, frame: pd.DataFrame, binary: bool = True) -> list[Any]:
    numbers = frame[[FEATURES[j] for j in NUMERIC]].to_numpy(np.float32)
    text = frame[[FEATURES[j] for j in CATEGORICAL]].fillna("").astype(str).to_numpy(object)
    first = module.InferInput(INPUT_NAME, list(numbers.shape), "FP32")
    second = module.InferInput(CATEGORIES_INPUT, list(text.shape), "BYTES")
    if module is thttp:
        first.set_data_from_numpy(numbers, binary_data=binary)
        second.set_data_from_numpy(text, binary_data=binary)
    else:
        first.set_data_from_numpy(numbers)
        second.set_data_from_numpy(text)
    return [first, second]


@served
def test_the_metadata_lists_both_inputs(client: httpx.Client) -> None:
    meta = client.get(f"/v2/models/{MODEL}").json()
    assert meta["inputs"] == [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 2]},
                              {"name": CATEGORIES_INPUT, "datatype": "BYTES", "shape": [-1, 2]}]


@served
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http_sends_bytes_and_gets_what_onnx_runtime_gives(
        server: Server, model: tuple[Path, bytes], binary: bool) -> None:
    frame = sample(25, seed=11)
    frame.loc[1, "region"] = "mars"  # unknown: code 0, as the graph answers in-process
    c = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        inputs = oip_inputs(thttp, frame, binary)
        # the categories first: the inputs are matched by name
        got = c.infer(MODEL, inputs[::-1] if binary else inputs).as_numpy(PROBABILITIES)
    finally:
        c.close()
    np.testing.assert_allclose(got, run_graph(model[1], frame), rtol=1e-5, atol=1e-6)


@served
def test_tritonclient_grpc_sends_bytes_and_gets_what_onnx_runtime_gives(
        server: Server, model: tuple[Path, bytes]) -> None:
    frame = sample(25, seed=12)
    c = tgrpc.InferenceServerClient(server.env["GRPC"])
    try:
        wait_until(lambda: _live(c), 30, "the gRPC server to answer", interval=0.2)
        got = c.infer(MODEL, oip_inputs(tgrpc, frame)).as_numpy(PROBABILITIES)
        meta = c.get_model_metadata(MODEL, as_json=True)
    finally:
        c.close()
    np.testing.assert_allclose(got, run_graph(model[1], frame), rtol=1e-5, atol=1e-6)
    assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [(INPUT_NAME, "FP32"), (CATEGORIES_INPUT, "BYTES")]


def _live(c: tgrpc.InferenceServerClient) -> bool:
    try:
        return bool(c.is_server_live())
    except tgrpc.InferenceServerException:
        return False


@served
@pytest.mark.parametrize(("inputs", "status", "field"), [
    # the categories sent as numbers
    ([{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
      {"name": "categories", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}], 400, "inputs[1].datatype"),
    # a number among the strings
    ([{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
      {"name": "categories", "datatype": "BYTES", "shape": [1, 2], "data": ["pro", 3]}], 422, "inputs[1].data[1]"),
    # the categories left out
    ([{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}], 400, "inputs"),
    # a name that is not a string
    ([{"name": ["input"], "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
      {"name": "categories", "datatype": "BYTES", "shape": [1, 2], "data": ["pro", "eu"]}], 400, "inputs[0].name"),
    # rows that differ between the two tensors
    ([{"name": "input", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]},
      {"name": "categories", "datatype": "BYTES", "shape": [1, 2], "data": ["pro", "eu"]}], 400, "inputs[1].shape"),
])
def test_bad_oip_requests_name_the_field(client: httpx.Client, inputs: list[Any], status: int, field: str) -> None:
    resp = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": inputs})
    assert resp.status_code == status, resp.text
    assert resp.json()["field"] == field


# -- batch scoring: string columns from CSV and Parquet -----------------------------------------------
def predicted(client: httpx.Client, frame: pd.DataFrame) -> np.ndarray:
    resp = client.post("/predict", json={"instances": records(frame)})
    assert resp.status_code == 200, resp.text
    return probabilities(resp.json())


def scored_probabilities(table: pa.Table) -> np.ndarray:
    return np.column_stack([table.column(f"probability_{c}").to_numpy() for c in ("low", "mid", "high")])


@served
def test_batch_csv_with_string_columns_equals_predict(client: httpx.Client, server: Server,
                                                      sidecar: Sidecar) -> None:
    frame = sample(30, seed=21)
    frame.loc[2, "plan"] = "enterprise"  # unknown
    frame.loc[5, "monthly"] = np.nan  # an empty cell: missing
    frame.insert(0, "customer", [f"c{i}" for i in range(len(frame))])  # a column the model does not read
    unknown = server.metric("modelloop_unknown_category_total", model=MODEL, feature="plan")
    resp = client.post("/batch/score", content=frame.to_csv(index=False).encode(),
                       headers={"Content-Type": "text/csv", "X-Request-ID": "cat-batch-1"})
    assert resp.status_code == 200, resp.text
    got = scored_probabilities(pa.csv.read_csv(pa.BufferReader(resp.content)))
    np.testing.assert_allclose(got, predicted(client, frame[FEATURES]), rtol=1e-6, atol=1e-7)
    wait_until(lambda: server.metric("modelloop_unknown_category_total", model=MODEL, feature="plan")
               >= unknown + 1, 10, "the batch's unknown plan to be counted")

    def sent() -> list[Any]:  # the batch's events, with their strings
        return [row for b in list(sidecar.batches) for c in b["columns"] if c["model"] == MODEL
                and c["request_ids"] == ["cat-batch-1"] for row in c["features"]]

    rows = wait_until(lambda: len(sent()) == 30 and sent(), 10, "the batch's 30 events")
    f32 = [float(np.float32(frame.loc[2, f])) for f in ("monthly", "tenure")]  # as the model saw them
    assert rows[2] == [f32[0], "enterprise", f32[1], frame.loc[2, "region"]]
    assert rows[5][0] is None  # the empty cell, sent as null


@served
def test_batch_parquet_with_string_columns_equals_predict(client: httpx.Client) -> None:
    frame = sample(30, seed=22)
    frame.loc[4, "region"] = None  # a missing category
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.set_column(1, "plan", table.column("plan").dictionary_encode())  # a categorical column
    sink = io.BytesIO()
    pq.write_table(table, sink)
    resp = client.post("/batch/score", content=sink.getvalue(),
                       headers={"Content-Type": "application/vnd.apache.parquet"})
    assert resp.status_code == 200, resp.text
    got = scored_probabilities(pq.read_table(io.BytesIO(resp.content)))
    np.testing.assert_allclose(got, predicted(client, frame), rtol=1e-6, atol=1e-7)


@served
def test_batch_parquet_with_numbers_for_a_category_is_refused_naming_the_column(client: httpx.Client) -> None:
    frame = sample(5, seed=23)
    frame["plan"] = np.arange(5) / 2
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    resp = client.post("/batch/score", content=sink.getvalue(),
                       headers={"Content-Type": "application/vnd.apache.parquet"})
    assert resp.status_code == 422, resp.text
    error = "body: column 'plan' has type double, expected strings (a categorical feature)"
    assert resp.json() == {"error": error, "code": "wrong_type", "field": "plan", "errors": [error]}


def not_utf8(dictionary: bool = False) -> pa.Table:
    """A table whose ``plan`` holds bytes that are no UTF-8 in row 1 (a Parquet writer may store
    them: its string columns are not checked), ``\\xed\\xa0\\x80`` (CESU-8's surrogate) in row 2."""
    plan = pa.array([b"pro", b"\xff\xfe", b"\xed\xa0\x80"], pa.binary()).view(pa.string())
    return pa.table({"monthly": [1.0, 2.0, 3.0], "plan": plan.dictionary_encode() if dictionary else plan,
                     "tenure": [1.0, 2.0, 3.0], "region": ["eu", "us", None]})


@served
def test_batch_parquet_with_text_that_is_not_utf8_is_refused_naming_the_column(client: httpx.Client) -> None:
    sink = io.BytesIO()
    pq.write_table(not_utf8(), sink)
    resp = client.post("/batch/score", content=sink.getvalue(),
                       headers={"Content-Type": "application/vnd.apache.parquet"})
    assert resp.status_code == 422, resp.text
    error = "body: row 1, column 'plan': not UTF-8 text"
    assert resp.json() == {"error": error, "code": "wrong_type", "field": "plan", "errors": [error]}


@pytest.mark.parametrize("dictionary", [False, True])
def test_text_that_is_not_utf8_is_refused_by_the_batch_reader(model: tuple[Path, bytes], tmp_path: Path,
                                                              dictionary: bool) -> None:
    """As ``modelloop batch score`` reads a file (score_file) and as a chunk is checked."""
    with pytest.raises(BatchInputError) as info:
        features_of(not_utf8(dictionary), FEATURES, source="in.parquet", first_row=10, nan_policy="allow",
                    categorical=CATEGORIES)
    assert (info.value.code, info.value.column, str(info.value)) == (
        "wrong_type", "plan", "in.parquet: row 11, column 'plan': not UTF-8 text")
    source = tmp_path / "in.parquet"
    pq.write_table(not_utf8(dictionary), source)
    runtime = OnnxRuntime(Registry(model[0] / "registry").get(MODEL, "production"), provider="cpu").load()
    with pytest.raises(BatchInputError, match=r"row 1, column 'plan': not UTF-8 text$"):
        score_file(source, tmp_path / "out.parquet", runtime, chunk_rows=16)


def test_an_integer_column_of_a_category_is_read_as_its_decimal_text() -> None:
    """As training codes an integer column declared categorical (`--categorical`)."""
    table = pa.table({"monthly": [1.0, 2.0], "plan": pa.array([3, None], pa.int16()), "tenure": [1.0, 2.0],
                      "region": ["eu", "us"]})
    x = features_of(table, FEATURES, source="in.parquet", first_row=0, nan_policy="allow", categorical=CATEGORIES)
    assert x[:, 1].tolist() == ["3", None]


def test_score_file_reads_string_columns(model: tuple[Path, bytes], tmp_path: Path) -> None:
    """What ``modelloop batch`` runs: a file scored in chunks, strings read from the CSV."""
    frame = sample(50, seed=24)
    frame.loc[7, "plan"] = None
    source = tmp_path / "in.csv"
    frame.to_csv(source, index=False)
    runtime = OnnxRuntime(Registry(model[0] / "registry").get(MODEL, "production"), provider="cpu").load()
    report = score_file(source, tmp_path / "out.parquet", runtime, chunk_rows=16)
    assert (report.rows, report.chunks) == (50, 4)
    got = scored_probabilities(pq.read_table(tmp_path / "out.parquet"))
    np.testing.assert_allclose(got, run_graph(model[1], frame), rtol=1e-5, atol=1e-6)


@served
def test_explanations_refuse_a_categorical_model_naming_why(client: httpx.Client) -> None:
    resp = client.post("/explain", json={"instances": records(sample(1, seed=30))})
    assert resp.status_code == 422, resp.text
    assert resp.json()["code"] == "not_explainable"
    assert "takes categorical features (plan, region)" in resp.json()["error"]


# -- without a server ---------------------------------------------------------------------------------
def plans_meta() -> ModelMetadata:
    return ModelMetadata(
        name=MODEL, version=1, task=Task.classification, outputs=[TensorSpec(name=PROBABILITIES, shape=[None, 3])],
        inputs=[TensorSpec(name=INPUT_NAME, shape=[None, 2]),
                TensorSpec(name=CATEGORIES_INPUT, dtype="string", shape=[None, 2])],
        feature_names=FEATURES, categories=CATEGORIES)


def test_records_become_object_rows() -> None:
    x = parse_instances({"instances": [{"monthly": 1, "plan": "pro", "tenure": None, "region": None}]},
                        plans_meta(), nan_policy="allow", max_rows=10)
    assert x.dtype == object
    monthly, plan, tenure, region = x[0]
    assert (monthly, type(monthly), plan, region) == (1.0, float, "pro", None)
    assert np.isnan(tenure)  # a missing number: NaN, as in float rows


def test_a_null_category_is_refused_under_nan_policy_reject() -> None:
    with pytest.raises(RequestError) as info:
        parse_instances({"instances": [[1.0, "pro", 2.0, None]]}, plans_meta(), nan_policy="reject", max_rows=10)
    assert repr(info.value) == ("RequestError(422, 'missing_value', 'instances[0][3]', 'instances[0][3]: missing "
                                "value (null) is not allowed (nan_policy=reject)')")


def test_an_unknown_category_error_names_the_field_and_the_value() -> None:
    rows = np.array([[1.0, "pro", 2.0, "eu"], [1.0, "team", 2.0, "mars"]], dtype=object)
    err = unknown_category_error(plans_meta(), rows, "instances")
    assert (err.status, err.code, err.field) == (422, "unknown_category", "instances[1].region")
    assert err.message == ('instances[1].region: unknown value "mars"; the model knows 2 ("eu", "us") '
                           "(MODELLOOP_SERVING_UNKNOWN_CATEGORIES=reject)")


def test_a_graph_without_the_categories_input_does_not_load(model: tuple[Path, bytes]) -> None:
    registry = Registry(model[0] / "registry")
    numeric_only = helper.make_model(helper.make_graph(
        [helper.make_node("Softmax", [INPUT_NAME], [PROBABILITIES], axis=-1)], "numeric",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", 3])]),
        opset_imports=[helper.make_opsetid("", 17)])
    numeric_only.ir_version = 8
    meta = registry.register(plans_meta().model_copy(update={"name": "plans-broken"}),
                             numeric_only.SerializeToString())
    with pytest.raises(ModelLoadError, match=r"takes the inputs \['categories', 'input'\], the graph \['input'\]"):
        OnnxRuntime(registry.get("plans-broken", meta.version), provider="cpu").load()


@pytest.mark.parametrize(("value", "code", "message"), [
    # longer than an event may carry (modelloop.schemas.MAX_CATEGORY_CHARS)
    ("p" * 1025, "too_long", "a category of 1025 characters; at most 1024 are accepted"),
    # NUL, which no stored event holds
    ("pro\x00", "wrong_type", "a category must not contain NUL (\\u0000)"),
])
def test_categories_no_event_could_carry_are_refused(value: str, code: str, message: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_instances({"instances": [[1.0, "pro", 2.0, "eu"], [1.0, value, 2.0, "eu"]]}, plans_meta(),
                        nan_policy="allow", max_rows=10)
    assert (info.value.code, info.value.field, info.value.message) == (code, "instances[1][1]",
                                                                       f"instances[1][1]: {message}")
    table = pa.table({"monthly": [1.0, 2.0], "plan": ["pro", value], "tenure": [1.0, 2.0], "region": [None, None]})
    with pytest.raises(BatchInputError) as batch:
        features_of(table, FEATURES, source="in.parquet", first_row=10, nan_policy="allow", categorical=CATEGORIES)
    assert (batch.value.code, batch.value.column, str(batch.value)) == (
        code, "plan", f"in.parquet: row 11, column 'plan': {message}")


@pytest.mark.parametrize("setting", ["allow", "reject"])
def test_the_routes_count_or_refuse_unknown_categories(model: tuple[Path, bytes], tmp_path: Path,
                                                       setting: str) -> None:
    metrics = CollectorRegistry()
    state = ServingState(ServingSettings(home=tmp_path, unknown_categories=setting), metrics)
    state.jobs.close()
    routes = Routes(state)
    runtime = OnnxRuntime(Registry(model[0] / "registry").get(MODEL, "production"), provider="cpu").load()
    x = parse_instances({"instances": [[1.0, "gold", 2.0, "eu"], [1.0, "gold", 2.0, "moon"], [1.0, "pro", 2.0, None]]},
                        runtime.metadata, nan_policy="allow", max_rows=10)

    def counted(feature: str) -> float | None:
        return metrics.get_sample_value("modelloop_unknown_category_total", {"model": MODEL, "feature": feature})

    if setting == "reject":
        with pytest.raises(RequestError, match=r'^instances\[0\]\.plan: unknown value "gold"; the model knows 3'):
            routes.check_categories(runtime, x, "instances")
        assert counted("plan") is None
    else:
        routes.check_categories(runtime, x, "instances")
        assert (counted("plan"), counted("region")) == (2.0, 1.0)


def test_a_challenger_shadows_only_with_the_same_categorical_features() -> None:
    from serving.repository import _unfit

    production = plans_meta()
    wider = production.model_copy(update={"version": 2, "categories": {**CATEGORIES, "plan": ["basic", "pro", "gold"]}})
    assert _unfit(production, wider) is None  # another vocabulary: the same rows feed it
    numeric = production.model_copy(update={"version": 3, "categories": {"region": ["eu", "us"]}})
    assert _unfit(production, numeric) == ("challenger v3 takes other inputs or answers another task or classes "
                                           "than production v1")


@pytest.mark.parametrize("categories", [CATEGORIES, {}])
@pytest.mark.parametrize("name", [["input"], {"input": 1}])
def test_an_oip_input_name_that_is_not_a_string_is_refused_naming_it(categories: dict[str, list[str]],
                                                                     name: Any) -> None:
    """For a model with categorical features and for a numeric one (the same four features)."""
    meta = plans_meta().model_copy(update={"categories": categories})
    numbers = [1.0, 2.0] if categories else [1.0, 2.0, 3.0, 4.0]
    inputs: list[dict[str, Any]] = [{"name": name, "datatype": "FP32", "shape": [1, len(numbers)], "data": numbers}]
    if categories:
        inputs.append({"name": "categories", "datatype": "BYTES", "shape": [1, 2], "data": ["pro", "eu"]})
    with pytest.raises(RequestError) as info:
        oip.decode_request({"inputs": inputs}, meta, nan_policy="allow", max_rows=10)
    assert (info.value.status, info.value.field) == (400, "inputs[0].name")


class LimitedSidecar:
    """A real HTTP endpoint for POST /events that, as the sidecar does, refuses a body over
    ``limit`` bytes whole with a 413, and keeps the bodies it takes."""

    def __init__(self, limit: int) -> None:
        self.limit, self.refused, self.rows = limit, 0, 0
        self.sizes: list[int] = []
        self.bodies: list[dict[str, Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers["content-length"])
                body = self.rfile.read(size)
                if size > sink.limit:
                    sink.refused += 1
                else:
                    sink.sizes.append(size)
                    sink.bodies.append(orjson.loads(body))
                    sink.rows += sum(n for group in sink.bodies[-1]["columns"] for n in group["rows"])
                self.send_response(413 if size > sink.limit else 200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_flight_of_long_categories_is_cut_to_fit_the_sidecars_body_limit() -> None:
    """Rows of long categories write far more than a flight's rows suggest (1,000 rows of nine
    1,024-emoji categories: 37 MB, over the sidecar's 32 MiB); the emitter sends them in bodies
    under its byte limit, cutting model batches in halves, so none is refused and lost."""
    limit = 100_000
    sink = LimitedSidecar(limit)
    meta = plans_meta()

    def rows(n: int, tag: str) -> np.ndarray:
        x = np.empty((n, 4), dtype=object)
        x[:] = [1.5, tag + "\U0001f600" * 1020, None, "\U0001f30d" * 1024]  # 8 KiB of UTF-8 a row
        return x

    def preds(n: int) -> Predictions:
        return interpret(meta, {PROBABILITIES: np.full((n, 3), 1 / 3, np.float32)})

    async def main() -> EventEmitter:
        em = EventEmitter(sink.url, batch_size=1000, flush_interval_s=0.01, max_body_bytes=limit)
        await em.start()
        # one model batch of three requests (a segment of 140 rows), then one large request
        em.record_requests(MODEL, 1, ["a", "b", "c"], [60, 1, 79], rows(140, "abc"), preds(140), [0.1] * 3)
        em.record(model=MODEL, version=1, base_id="d", x=rows(300, "d"), preds=preds(300), latency_s=0.2)
        await until(lambda: sink.rows >= 440 or sink.refused, "440 events")
        await em.stop()
        return em

    try:
        em = asyncio.run(main())
    finally:
        sink.close()
    assert (sink.refused, em.dropped) == (0, dict.fromkeys(DROP_REASONS, 0))
    assert max(sink.sizes) <= limit and len(sink.bodies) > 40  # about 12 rows a body
    events = [e for b in sink.bodies for e in events_of(b)]
    assert [e["request_id"] for e in events] == ([f"a-{i}" for i in range(60)] + ["b-0"]
                                                 + [f"c-{i}" for i in range(79)] + [f"d-{i}" for i in range(300)])
    assert {e["features"][1][:3] for e in events} == {"abc", "d\U0001f600\U0001f600"}
    assert events[-1]["features"] == [1.5, "d" + "\U0001f600" * 1020, None, "\U0001f30d" * 1024]


def _binary_request(text_blob: bytes) -> tuple[bytes, str]:
    numbers = np.array([[1.0, 2.0]], np.float32).tobytes()
    header = orjson.dumps({"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": len(numbers)}},
        {"name": "categories", "datatype": "BYTES", "shape": [1, 2],
         "parameters": {"binary_data_size": len(text_blob)}}]})
    return header + numbers + text_blob, str(len(header))


def _elements(*values: bytes) -> bytes:
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


@pytest.mark.parametrize(("blob", "field", "message"), [
    # an element's length runs past the bytes sent
    (_elements(b"pro") + b"\x09\x00\x00\x00eu", "inputs[1].data",
     "inputs[1].data: element 1 at byte 7 runs past the 13 bytes sent"),
    # one element for two columns
    (_elements(b"pro"), "inputs[1].data", "inputs[1].data: 1 elements do not hold BYTES [1, 2] (2 values)"),
    # not UTF-8
    (_elements(b"pro", b"\xff"), "inputs[1].data[1]", "inputs[1].data[1]: not UTF-8 text"),
])
def test_bad_binary_categories_are_refused_naming_the_field(blob: bytes, field: str, message: str) -> None:
    body, length = _binary_request(blob)
    with pytest.raises(RequestError) as info:
        oip.decode_infer(body, length, plans_meta(), nan_policy="allow", max_rows=10)
    assert (info.value.status, info.value.field, info.value.message) == (400, field, message)


def test_binary_categories_become_object_rows() -> None:
    body, length = _binary_request(_elements("pró".encode(), b""))
    x = oip.decode_infer(body, length, plans_meta(), nan_policy="allow", max_rows=10).x
    assert x.tolist() == [[1.0, "pró", 2.0, ""]]


@served
def test_grpc_typed_contents_with_bytes_contents(server: Server, model: tuple[Path, bytes]) -> None:
    frame = sample(3, seed=31)
    req = pb.ModelInferRequest(model_name=MODEL, parameters={"binary_data_output": pb.InferParameter(bool_param=False)})
    text = req.inputs.add(name=CATEGORIES_INPUT, datatype="BYTES", shape=[3, 2])
    text.contents.bytes_contents.extend(v.encode() for v in frame[["plan", "region"]].to_numpy().reshape(-1))
    numbers = req.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[3, 2])
    numbers.contents.fp32_contents.extend(frame[["monthly", "tenure"]].to_numpy(np.float32).reshape(-1).tolist())
    with grpc.insecure_channel(server.env["GRPC"]) as channel:
        wait_until(lambda: grpc.channel_ready_future(channel).result(timeout=30) is None, 30, "the gRPC channel")
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=30)
    got = np.array(answer.outputs[0].contents.fp32_contents).reshape(3, 3)
    np.testing.assert_allclose(got, run_graph(model[1], frame), rtol=1e-5, atol=1e-6)


def test_one_numeric_and_one_categorical_feature() -> None:
    meta = plans_meta().model_copy(update={"feature_names": ["monthly", "plan"], "categories": {"plan": ["pro"]},
                                           "inputs": [TensorSpec(name=INPUT_NAME, shape=[None, 1]),
                                                      TensorSpec(name=CATEGORIES_INPUT, dtype="string",
                                                                 shape=[None, 1])]})
    x = parse_instances({"instances": [{"monthly": 2, "plan": "pro"}, {"plan": None, "monthly": 0.5}]}, meta,
                        nan_policy="allow", max_rows=10)
    assert x.tolist() == [[2.0, "pro"], [0.5, None]]
