"""A real `modelloop serve` (2 BentoML workers, auth on, events to a recording sidecar):
predictions, the Open Inference Protocol, bad input, auth, events, metrics."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from modelloop.registry import Registry
from modelloop.schemas import ColumnBatch
from modelloop.synthetic import SyntheticTask
from serving.runtime import OnnxRuntime
from tests.serving.conftest import AUTH, FEATURES, KEY, MODEL, Server, Sidecar, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("show_log_on_failure")]


@pytest.fixture(scope="module")
def runtime(main_home: Path) -> OnnxRuntime:
    """The same ONNX file, run in-process: the reference the server must equal."""
    return OnnxRuntime(Registry(main_home / "registry").get(MODEL), provider="cpu").load()


def rows(n: int, seed: int = 7) -> np.ndarray:
    df = SyntheticTask(n_features=20, n_classes=3).sample(n, seed=seed)
    return df[FEATURES].to_numpy(np.float32)


def test_predict_equals_onnxruntime_in_process(client: httpx.Client, runtime: OnnxRuntime) -> None:
    x = rows(50)
    expected = runtime.predict(x)["probabilities"]
    records = [dict(zip(FEATURES, map(float, r), strict=True)) for r in x]
    for body in ({"instances": records}, {"instances": x.tolist()}):
        resp = client.post("/predict", json=body)
        assert resp.status_code == 200, resp.text
        doc = resp.json()
        assert (doc["model"], doc["version"]) == (MODEL, 1)
        got = np.array([[p["probabilities"][f"class_{k}"] for k in range(3)] for p in doc["predictions"]],
                       dtype=np.float32)
        np.testing.assert_array_equal(got, expected)
        assert [p["prediction"] for p in doc["predictions"]] == expected.argmax(1).tolist()
        assert [p["label"] for p in doc["predictions"]] == [f"class_{k}" for k in expected.argmax(1)]
        base = doc["request_id"]
        assert [p["request_id"] for p in doc["predictions"]] == [f"{base}-{i}" for i in range(50)]


def test_client_request_id_is_used(client: httpx.Client) -> None:
    resp = client.post("/predict", json={"instances": rows(2).tolist()}, headers={"X-Request-ID": "order-42"})
    assert resp.status_code == 200
    assert [p["request_id"] for p in resp.json()["predictions"]] == ["order-42-0", "order-42-1"]


def test_oip_round_trip_with_tritonclient(server: Server, runtime: OnnxRuntime) -> None:
    import tritonclient.http as triton

    x = rows(8)
    expected = runtime.predict(x)["probabilities"]
    tc = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert tc.is_server_live()
    assert tc.is_server_ready()
    assert tc.is_model_ready(MODEL, headers=dict(AUTH))
    meta = tc.get_model_metadata(MODEL, headers=dict(AUTH))
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 20]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    for binary in (True, False):
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = triton.InferRequestedOutput("probabilities", binary_data=binary)
        result = tc.infer(MODEL, [inp], outputs=[out], headers=dict(AUTH), request_id=f"oip-{binary}")
        np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)
        assert result.get_response()["id"] == f"oip-{binary}"
    # no outputs named: tritonclient asks for all of them in binary (it also writes into the
    # headers dict it is given, hence a fresh copy per call)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(tc.infer(MODEL, [inp], headers=dict(AUTH)).as_numpy("probabilities"), expected)
    with pytest.raises(triton.InferenceServerException, match="not served here"):
        tc.infer("other", [inp], headers=dict(AUTH))
    tc.close()


def _record(**changes: Any) -> dict[str, Any]:
    rec: dict[str, Any] = dict.fromkeys(FEATURES, 1.5)
    rec.update(changes)
    return {k: v for k, v in rec.items() if v is not _DROP}


_DROP = object()
_ROW = [1.5] * 20
_DEEP = b"[" * 1000 + b"1" + b"]" * 1000  # orjson reads up to 1024 levels

BAD_INPUTS = [
    # (case, body bytes or JSON, extra headers, status, code, field, message part)
    ("malformed JSON", b'{"instances": [', {}, 400, "malformed_json", "body", "not valid JSON"),
    ("body not an object", [1, 2], {}, 422, "wrong_type", "body", "expected an object"),
    ("no instances field", {"rows": []}, {}, 422, "missing_field", "instances", "missing"),
    ("unknown top-level field", {"instances": [_ROW], "extra": 1}, {}, 422, "unknown_field", "extra", "unknown field"),
    ("instances not a list", {"instances": {"f00": 1}}, {}, 422, "wrong_type", "instances", "expected an array"),
    ("empty instances", {"instances": []}, {}, 422, "empty", "instances", "at least one row"),
    ("missing feature", {"instances": [_record(f07=_DROP)]}, {}, 422, "missing_feature", "instances[0].f07", "missing feature"),
    ("extra feature", {"instances": [_record(f20=1.0)]}, {}, 422, "unknown_feature", "instances[0].f20", "unknown feature"),
    ("misnamed feature", {"instances": [_record(f03=_DROP, f3=1.0)]}, {}, 422, "unknown_feature", "instances[0].f3", "did you mean 'f03'"),
    ("string value", {"instances": [_record(f05="1.0")]}, {}, 422, "wrong_type", "instances[0].f05", "got string"),
    ("boolean value", {"instances": [_record(f05=True)]}, {}, 422, "wrong_type", "instances[0].f05", "got boolean"),
    ("nested value", {"instances": [_record(f05=[1])]}, {}, 422, "wrong_type", "instances[0].f05", "got array"),
    ("row of wrong type", {"instances": [_record(), 3]}, {}, 422, "wrong_type", "instances[1]", "expected an object"),
    # array rows of numbers only skip the per-value type check (serving.validation.only_numbers):
    # what that check would have caught must still be named
    ("nested value in an array row", {"instances": [_ROW, [*_ROW[:19], [1]]]}, {}, 422, "wrong_type", "instances[1][19]", "got array"),
    ("every value an array", {"instances": [[[v] for v in _ROW]]}, {}, 422, "wrong_type", "instances[0][0]", "got array"),
    ("object in an array row", {"instances": [[*_ROW[:3], {}, *_ROW[4:]]]}, {}, 422, "wrong_type", "instances[0][3]", "got object"),
    ("null in an array row under reject", {"instances": [[*_ROW[:19], None]]}, {}, 422, "missing_value", "instances[0][19]", "nan_policy=reject"),
    ("array row too short", {"instances": [_ROW, _ROW[:19]]}, {}, 422, "wrong_shape", "instances[1]", "expected 20 values, got 19"),
    ("array row too long", {"instances": [[*_ROW, 1.0]]}, {}, 422, "wrong_shape", "instances[0]", "got 21"),
    ("null under nan_policy=reject", {"instances": [_record(f11=None)]}, {}, 422, "missing_value", "instances[0].f11", "nan_policy=reject"),
    ("NaN literal", b'{"instances": [[' + b"1.5," * 19 + b"NaN]]}", {}, 422, "missing_value", "instances[0][19]", "missing value"),
    ("Infinity literal", b'{"instances": [[Infinity' + b",1.5" * 19 + b"]]}", {}, 422, "not_finite", "instances[0][0]", "not a finite"),
    ("overflows float32", {"instances": [_record(f02=1e39)]}, {}, 422, "not_finite", "instances[0].f02", "not a finite float32"),
    ("too many rows", {"instances": [_ROW] * 501}, {}, 413, "too_many_rows", "instances", "limit of 500"),
    ("body too large", b'{"instances": [' + b" " * 200_001 + b"]}", {}, 413, "body_too_large", "body", "limit of 200000"),
    ("bad request id", {"instances": [_ROW]}, {"X-Request-ID": "no spaces please"}, 422, "wrong_type", "X-Request-ID", "1-100 characters"),
    # a value nested 1,000 deep: its error was written with json.dumps, which recursed (500)
    ("value nested 1,000 deep", b'{"instances": [[' + _DEEP + b",1.5" * 19 + b"]]}", {}, 422, "wrong_type", "instances[0][0]", "got array [[[["),
    ("record value nested 1,000 deep", b'{"instances": [{"f00": ' + _DEEP + "".join(f',"f{i:02d}": 1' for i in range(1, 20)).encode() + b"}]}", {}, 422, "wrong_type", "instances[0].f00", "got array [[[["),
    ("nested beyond the parser's depth", b'{"instances": [[' + b"[" * 5000 + b"]" * 5000 + b"]]}", {}, 400, "malformed_json", "body", "not valid JSON"),
    # bodies are read as sent: a compressed one is refused, not inflated
    ("gzip body", gzip.compress(json.dumps({"instances": [_ROW]}).encode()), {"Content-Encoding": "gzip"}, 415, "unsupported_encoding", "Content-Encoding", "send the body uncompressed"),
]


@pytest.mark.parametrize(("case", "body", "headers", "status", "code", "field", "message"), BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_4xx_naming_the_field(client: httpx.Client, case: str, body: Any, headers: dict[str, str],
                                             status: int, code: str, field: str, message: str) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    resp = client.post("/predict", headers=headers, **kwargs)  # type: ignore[arg-type]
    assert resp.status_code == status, resp.text
    doc = resp.json()
    assert (doc["code"], doc["field"]) == (code, field)
    assert message in doc["error"] and field in doc["error"]
    assert doc["errors"] == [doc["error"]]  # the shape both apps answer (modelloop/http.py)


def _tensor(**changes: Any) -> dict[str, Any]:
    return {"name": "input", "shape": [1, 20], "datatype": "FP32", "data": _ROW, **changes}


_OUT = {"name": "probabilities"}
_DEEP_LIST = "<1,000 deep>"
"""Stands for :data:`_DEEP` in a body (json.dumps cannot write it: it recurses too)."""

OIP_BAD = [
    # (case, body, status, field, message part)
    ("wrong input name", {"inputs": [_tensor(name="x")]}, 400, "inputs[0].name", "unknown input"),
    ("wrong datatype", {"inputs": [_tensor(datatype="BYTES")]}, 400, "inputs[0].datatype", "send FP32"),
    ("wrong feature count", {"inputs": [_tensor(shape=[1, 19], data=_ROW[:19])]}, 400, "inputs[0].shape", "expected 20 features"),
    ("negative shape", {"inputs": [_tensor(shape=[-1, 20])]}, 400, "inputs[0].shape", "got [-1, 20]"),
    ("data does not fill shape", {"inputs": [_tensor(shape=[2, 20])]}, 400, "inputs[0].data", "do not fill shape"),
    ("data longer than shape", {"inputs": [_tensor(data=_ROW * 2)]}, 400, "inputs[0].data", "40 values do not fill"),
    ("string in data", {"inputs": [_tensor(data=["a", *_ROW[1:]])]}, 422, "inputs[0].data[0][0]", "got string"),
    ("NaN as a string", {"inputs": [_tensor(data=["NaN", *_ROW[1:]])]}, 422, "inputs[0].data[0][0]", 'got string "NaN"'),
    ("unknown output", {"inputs": [_tensor()], "outputs": [{"name": "logits"}]}, 400, "outputs[0].name", "unknown output"),
    # parameters and datatype of the wrong JSON type were read as if right (500)
    ("parameters an array", {"inputs": [_tensor()], "parameters": [1]}, 400, "parameters", "expected an object of parameters, got array"),
    ("parameters a string", {"inputs": [_tensor()], "parameters": "x"}, 400, "parameters", "got string"),
    ("parameters a number", {"inputs": [_tensor()], "parameters": 5}, 400, "parameters", "got int"),
    ("output parameters an array", {"inputs": [_tensor()], "outputs": [{**_OUT, "parameters": [1]}]}, 400, "outputs[0].parameters", "got array"),
    ("output parameters a string", {"inputs": [_tensor()], "outputs": [{**_OUT, "parameters": "x"}]}, 400, "outputs[0].parameters", "got string"),
    ("input parameters an array", {"inputs": [_tensor(parameters=[1])]}, 400, "inputs[0].parameters", "got array"),
    ("binary_data_output not a boolean", {"inputs": [_tensor()], "parameters": {"binary_data_output": "yes"}}, 400, "parameters.binary_data_output", "expected true or false"),
    ("binary_data not a boolean", {"inputs": [_tensor()], "outputs": [{**_OUT, "parameters": {"binary_data": 1}}]}, 400, "outputs[0].parameters.binary_data", "expected true or false"),
    ("datatype an array", {"inputs": [_tensor(datatype=["FP32"])]}, 400, "inputs[0].datatype", 'expected a string such as "FP32", got array'),
    ("datatype an object", {"inputs": [_tensor(datatype={"a": 1})]}, 400, "inputs[0].datatype", "got object"),
    # values 1,000 deep in a field that is echoed in the error (repr recursed: 500)
    ("shape nested 1,000 deep", {"inputs": [_tensor(shape=_DEEP_LIST)]}, 400, "inputs[0].shape", "got [[[["),
    ("name nested 1,000 deep", {"inputs": [_tensor(name=_DEEP_LIST)]}, 400, "inputs[0].name", "unknown input [[[["),
    ("output name nested 1,000 deep", {"inputs": [_tensor()], "outputs": [{"name": _DEEP_LIST}]}, 400, "outputs[0].name", "[[[["),
    ("data nested 1,000 deep", {"inputs": [_tensor(data=[[_DEEP_LIST, *_ROW[1:]]])]}, 422, "inputs[0].data[0][0]", "got array [[[["),
]


@pytest.mark.parametrize(("case", "body", "status", "field", "message"), OIP_BAD, ids=[c[0] for c in OIP_BAD])
def test_bad_oip_request_names_the_field(client: httpx.Client, case: str, body: Any, status: int, field: str,
                                         message: str) -> None:
    content = json.dumps(body).encode().replace(json.dumps(_DEEP_LIST).encode(), _DEEP)
    resp = client.post(f"/v2/models/{MODEL}/infer", content=content)
    assert resp.status_code == status, resp.text
    assert resp.json()["field"] == field and field in resp.json()["error"]
    assert message in resp.json()["error"]


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/predict"), ("POST", f"/v2/models/{MODEL}/infer"), ("GET", f"/v2/models/{MODEL}"),
    ("POST", "/batch/score"), ("POST", "/batch/jobs"), ("GET", "/admin/model"), ("POST", "/admin/reload"),
])
@pytest.mark.parametrize("token", [None, "Bearer wrong", KEY, f"Basic {KEY}", f"Bearer{KEY}", f"Bearer {KEY.upper()}"])
def test_auth_is_enforced(server: Server, method: str, path: str, token: str | None) -> None:
    headers = {"Authorization": token} if token else {}
    resp = httpx.request(method, server.url + path, headers=headers, json={"instances": [_ROW]})
    assert resp.status_code == 401
    assert resp.json()["field"] == "Authorization"
    assert resp.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path", "status", "code", "field"), [
    ("GET", f"/v2/models/{MODEL}/nothing", 404, "not_found", "path"),   # no such route
    ("GET", "/nothing", 404, "not_found", "path"),   # no route of ours or of BentoML's: ours answers
    ("POST", "/static_contentx/a", 404, "not_found", "path"),
    ("GET", "/predict", 405, "method_not_allowed", "method"),
])
def test_refusals_of_no_route_have_the_shared_error_shape(server: Server, method: str, path: str, status: int,
                                                          code: str, field: str) -> None:
    resp = httpx.request(method, server.url + path, headers=AUTH)
    assert resp.status_code == status, resp.text
    doc = resp.json()
    assert (doc["code"], doc["field"], doc["errors"]) == (code, field, [doc["error"]])


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR", "Bearer "])
def test_the_bearer_scheme_is_case_insensitive(server: Server, scheme: str) -> None:
    """RFC 7235: the scheme is case-insensitive (the token is not); spaces before the token."""
    resp = httpx.post(server.url + "/predict", headers={"Authorization": f"{scheme} {KEY}"}, json={"instances": [_ROW]})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/healthz", "/livez", "/readyz", "/metrics", "/v2",
                                  "/docs.json", "/"])  # the last two: BentoML's, through the front door
def test_health_and_metrics_stay_open(server: Server, path: str) -> None:
    assert httpx.get(server.url + path).status_code == 200


def test_bentomls_routes_keep_their_trailing_slash_redirect(server: Server) -> None:
    resp = httpx.get(server.url + "/healthz/")
    assert resp.status_code == 307 and resp.headers["location"].endswith("/healthz")


def test_events_reach_the_sidecar_with_joinable_ids(client: httpx.Client, server: Server, sidecar: Sidecar) -> None:
    resp = client.post("/predict", json={"instances": rows(3, seed=11).tolist()}, headers={"X-Request-ID": "evt-1"})
    assert resp.status_code == 200
    wait_until(lambda: {"evt-1-0", "evt-1-1", "evt-1-2"} <= {e["request_id"] for e in sidecar.events}, 10,
               "the sidecar to receive the events")
    for batch in sidecar.batches:
        ColumnBatch.model_validate(batch)  # the contract
    by_id = {e["request_id"]: e for e in sidecar.events}
    preds = resp.json()["predictions"]
    for i, p in enumerate(preds):
        event = by_id[f"evt-1-{i}"]
        assert (event["model"], event["version"], event["mode"]) == (MODEL, 1, "realtime")
        assert event["prediction"] == p["prediction"]
        assert event["probabilities"] == pytest.approx(list(p["probabilities"].values()))
        assert event["features"] == pytest.approx(rows(3, seed=11)[i].tolist())
    wait_until(lambda: server.metric("modelloop_serving_events_sent_total", model=MODEL) >= 3, 10, "events_sent")


def test_metrics_catalog_is_exposed(client: httpx.Client, server: Server) -> None:
    client.post("/predict", json={"instances": [_ROW]})
    assert httpx.post(f"{server.url}/predict", json={"instances": [_ROW]}).status_code == 401
    assert client.post("/predict", json={"instances": []}).status_code == 422
    text = server.metrics()
    for name in ["modelloop_serving_model_info", "modelloop_serving_requests_total",
                 "modelloop_serving_request_duration_seconds", "modelloop_serving_inference_duration_seconds",
                 "modelloop_serving_queue_wait_seconds", "modelloop_serving_batch_size_rows",
                 "modelloop_serving_rows_total", "modelloop_serving_errors_total",
                 "modelloop_serving_events_sent_total", "bentoml_service_request_total"]:
        assert f"\n{name}" in text, name
    assert server.metric("modelloop_serving_model_info", model=MODEL, version="1", provider="cpu") == 1
    assert server.metric("modelloop_serving_requests_total", model=MODEL, route="predict", code="200") >= 1
    assert server.metric("modelloop_serving_errors_total", model=MODEL, reason="auth") >= 1
    assert server.metric("modelloop_serving_errors_total", model=MODEL, reason="validation") >= 1


def test_admin_reports_the_served_model(client: httpx.Client) -> None:
    doc = client.get("/admin/model").json()
    assert (doc["model"], doc["version"], doc["provider"], doc["ready"]) == (MODEL, 1, "cpu", True)



def test_a_body_without_content_length_is_refused_once_past_the_limit(client: httpx.Client) -> None:
    """A chunked body (no Content-Length) is counted as it arrives, and refused when it passes
    MODELLOOP_SERVING_MAX_BODY_BYTES (the shared server's is 200,000), in the same shape."""
    def chunks() -> Any:
        yield b'{"instances": ['
        for _ in range(30):
            yield b" " * 10_000
        yield b"]}"

    resp = client.post("/predict", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status_code == 413, resp.text
    assert resp.json() == {"error": "body: the body is more than the limit of 200000 (MODELLOOP_SERVING_MAX_BODY_BYTES)",
                           "code": "body_too_large", "field": "body",
                           "errors": ["body: the body is more than the limit of 200000 "
                                      "(MODELLOOP_SERVING_MAX_BODY_BYTES)"]}


def test_an_unexpected_failure_answers_500_with_the_id_its_log_line_names(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a route (here a handler that raises) is logged with its traceback under an error
    id, counted, and answered 500 naming that id, in the shape every refusal has."""
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from serving.app import Routes
    from serving.settings import ServingSettings
    from serving.state import ServingState

    metrics = CollectorRegistry()
    state = ServingState(ServingSettings(home=tmp_path), metrics)
    state.jobs.close()

    async def broken(request: Any, state: ServingState) -> Any:
        raise RuntimeError("a bug")

    app = Starlette(routes=[Route("/x", Routes(state).guarded("x", broken, auth=False), methods=["GET"])])
    with caplog.at_level("ERROR", logger="serving.app"):
        resp = TestClient(app).get("/x")
    assert resp.status_code == 500
    body = resp.json()
    error_id = body["error_id"]
    assert body["error"] == f"internal error {error_id}: the server's log has its traceback"
    assert (body["code"], body["field"]) == ("internal", None)
    (record,) = [r for r in caplog.records if error_id in r.getMessage()]
    assert record.exc_info is not None and "a bug" in str(record.exc_info[1])
    assert metrics.get_sample_value("modelloop_serving_errors_total", {"model": "", "reason": "internal"}) == 1.0
