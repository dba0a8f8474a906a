"""Serving's OpenAPI document: valid OpenAPI 3.1 naming every route of the app, merged into
BentoML's ``/docs.json``, and honest about a real ``modelloop serve``: known requests are
answered as it says (and what the validators accept, its request schemas accept), and
schemathesis drives every operation with a bounded budget: no 5xx, no status, media type or
body the document does not list, every request that breaks its schema refused."""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from modelloop.registry import Registry
from serving.app import build_app
from serving.openapi import OPERATIONS, openapi_document
from serving.settings import ServingSettings
from serving.state import ServingState
from tests.serving.conftest import (
    AUTH,
    FEATURES,
    KEY,
    MODEL,
    Server,
    Sidecar,
    start_server,
    stop_server,
    wait_until,
)
from tests.serving.onnx_models import register_mlp

OPEN = {"/v2", "/v2/health/live", "/v2/health/ready"}
EXAMPLES = 40
"""Cases per operation, valid and invalid ones: this file takes ~45 s on two cores, the server's
start included."""
PARQUET = "application/vnd.apache.parquet"
MAX_ROWS = 50


def test_the_document_is_valid_openapi_and_describes_every_route(tmp_path: Path) -> None:
    state = ServingState(ServingSettings(home=tmp_path, api_key=SecretStr(KEY)), CollectorRegistry())
    app = build_app(state)
    state.jobs.close()
    doc = app.state.openapi
    schemathesis.openapi.from_dict(doc).validate()  # the OpenAPI 3.1 meta-schema
    for name, schema in doc["components"]["schemas"].items():  # each a JSON Schema 2020-12
        assert jsonschema_rs.meta.is_valid(schema), name
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert described == {(m, r.path) for r in app.routes  # type: ignore[attr-defined]
                         for m in r.methods if m != "HEAD"}  # type: ignore[attr-defined]
    for path, ops in doc["paths"].items():
        for op in ops.values():
            if path in OPEN:
                assert op["security"] == [], path
            else:
                assert op["security"] == [{"apiKey": []}], path
                assert "401" in op["responses"], path


@pytest.mark.parametrize(
    ("routes", "error"),
    [
        # a new route without a description
        ([("/new", "GET", True)], "GET /new has no description in serving/openapi.py"),
        # a description whose route is gone
        ([("/v2", "GET", False)], "described but not routed"),
    ],
)
def test_a_route_and_its_description_go_together(routes: list[tuple[str, str, bool]], error: str) -> None:
    with pytest.raises(LookupError, match=error):
        openapi_document(routes)


# -- against a real process --------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, sidecar: Sidecar) -> Iterator[Server]:
    """`modelloop serve` (one worker) with an API key, small limits, events to the recording
    sidecar, and `churn` v1 (20 features, 3 classes) in production."""
    home = tmp_path_factory.mktemp("openapi")
    register_mlp(Registry(home / "registry"), MODEL, n_features=20, n_classes=3, seed=0)
    env = {"MODELLOOP_SERVING_API_KEY": KEY, "MODELLOOP_SERVING_SIDECAR_URL": sidecar.url,
           "MODELLOOP_SERVING_MAX_ROWS_PER_REQUEST": str(MAX_ROWS),
           "MODELLOOP_SERVING_MAX_BODY_BYTES": "100000", "MODELLOOP_SERVING_SYNC_BATCH_MAX_ROWS": "200",
           "MODELLOOP_SERVING_MAX_ACTIVE_JOBS": "2"}
    server = start_server(home, home / "server.log", env, "--workers", "1")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def docs(keyed: Server) -> dict[str, Any]:
    resp = httpx.get(f"{keyed.url}/docs.json", timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


@pytest.mark.integration
def test_docs_json_is_bentoml_s_document_with_ours_merged_in(docs: dict[str, Any], tmp_path: Path) -> None:
    schemathesis.openapi.from_dict(docs).validate()
    for name, schema in docs["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    assert {"/healthz", "/livez", "/readyz", "/metrics"} <= set(docs["paths"])  # BentoML's
    ours = openapi_document([(p, m, p not in OPEN) for m, p in OPERATIONS])
    assert {p: docs["paths"][p] for p in ours["paths"]} == ours["paths"]
    assert docs["components"]["securitySchemes"] == ours["components"]["securitySchemes"]


def csv_text(rows: int = 3) -> str:
    return "\n".join([",".join(FEATURES), *[",".join(f"{(r + j) / 10}" for j in range(20))
                                             for r in range(rows)]]) + "\n"


def parquet_bytes(rows: int = 3) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({f: [0.5 + r for r in range(rows)] for f in FEATURES}), sink)
    return sink.getvalue()


def binary_infer() -> tuple[bytes, dict[str, str], dict[str, Any]]:
    """A request as tritonclient sends it: a JSON header, then the tensor's bytes."""
    header = {"inputs": [{"name": "input", "shape": [2, 20], "datatype": "FP32",
                          "parameters": {"binary_data_size": 160}}],
              "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}
    head = json.dumps(header).encode()
    return (head + struct.pack("<40f", *([0.25] * 40)),
            {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
            header)


def succeeded(url: str, job: str) -> str:
    """``job``, once it has succeeded."""
    wait_until(lambda: httpx.get(f"{url}/batch/jobs/{job}", headers=AUTH).json()["state"] == "succeeded",
               30, f"job {job} to succeed")
    return job


def finished_job(url: str) -> str:
    """The id of a job of three rows, once it has succeeded."""
    return succeeded(url, httpx.post(f"{url}/batch/jobs", content=csv_text(),
                                     headers={**AUTH, "Content-Type": "text/csv"}, timeout=30).json()["job_id"])


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> Any:
    return jsonschema_rs.validator_for({**schema, "components": doc["components"]})


ROW = [0.5] * 20
RECORD = dict(zip(FEATURES, ROW, strict=True))
INFER = {"inputs": [{"name": "input", "shape": [1, 20], "datatype": "FP32", "data": ROW}]}
V1 = f"/v2/models/{MODEL}/versions/1"

KNOWN: list[tuple[str, str, dict[str, Any], int]] = [
    # (method, path, httpx arguments, status)
    ("POST", "/predict", {"json": {"instances": [RECORD, RECORD]}}, 200),
    ("POST", "/predict", {"json": {"instances": [ROW, [None, *ROW[1:]]]}}, 200),
    ("POST", "/predict", {"json": {"instances": [ROW]}, "headers": {"X-Request-ID": "order-42"}}, 200),
    ("POST", "/predict", {"json": {"instances": [ROW[:3]]}}, 422),
    ("POST", "/predict", {"json": {"instances": [ROW] * (MAX_ROWS + 1)}}, 413),
    ("POST", "/predict", {"content": b"{not json"}, 400),
    ("POST", "/predict", {"json": {"instances": [ROW]}, "headers": {"Authorization": "Bearer nope"}}, 401),
    ("POST", "/predict", {"json": {"instances": [ROW]}, "headers": {"X-Request-ID": "a b"}}, 422),
    ("GET", "/v2", {}, 200),
    ("GET", "/v2/health/live", {}, 200),
    ("GET", "/v2/health/ready", {}, 200),
    ("GET", f"/v2/models/{MODEL}", {}, 200),
    ("GET", V1, {}, 200),
    ("GET", f"/v2/models/{MODEL}/versions/2", {}, 404),
    ("GET", "/v2/models/other", {}, 404),
    ("GET", f"/v2/models/{MODEL}/ready", {}, 200),
    ("GET", f"{V1}/ready", {}, 200),
    ("POST", f"/v2/models/{MODEL}/infer", {"json": INFER}, 200),
    ("POST", f"{V1}/infer", {"json": {**INFER, "id": "batch-7"}}, 200),
    ("POST", f"/v2/models/{MODEL}/infer",  # nested, one output, binary
     {"json": {"inputs": [{**INFER["inputs"][0], "shape": [2, 20], "data": [ROW, ROW]}],
               "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}}, 200),
    ("POST", f"/v2/models/{MODEL}/infer", {"json": {"inputs": [{**INFER["inputs"][0], "datatype": "BOOL"}]}}, 400),
    ("POST", f"/v2/models/{MODEL}/infer", {"json": {**INFER, "id": "a b"}}, 422),
    ("POST", "/batch/score", {"content": csv_text(), "headers": {"Content-Type": "text/csv"}}, 200),
    ("POST", "/batch/score", {"content": parquet_bytes(), "headers": {"Content-Type": PARQUET}}, 200),
    ("POST", "/batch/score", {"content": csv_text(), "params": {"format": "parquet"}}, 400),
    ("POST", "/batch/score", {"content": csv_text(), "headers": {"Content-Type": "text/plain"}}, 415),
    ("POST", "/batch/score", {"content": csv_text(201), "headers": {"Content-Type": "text/csv"}}, 413),
    ("GET", "/batch/jobs/0123456789abcdef01234567", {}, 404),
    ("GET", "/batch/jobs/0123456789abcdef01234567/result", {}, 404),
    ("DELETE", "/batch/jobs/0123456789abcdef01234567", {}, 404),
    ("GET", "/admin/model", {}, 200),
    ("POST", "/admin/reload", {}, 200),
]


def _template(path: str) -> str:
    """The documented path ``path`` is an instance of."""
    return next(known for _, known in OPERATIONS if re.fullmatch(re.sub(r"\{\w+\}", "[^/]+", known), path))


def answered_as_documented(docs: dict[str, Any], method: str, path: str, resp: httpx.Response,
                           request: Any = None) -> None:
    """The answer's status and media type are the operation's, and its body fits the schema
    listed for them; a request the server accepted fits the operation's request schema."""
    op = docs["paths"][_template(path)][method.lower()]
    answer = op["responses"].get(str(resp.status_code))
    assert answer is not None, (method, path, resp.status_code, resp.text[:300])
    media = resp.headers["content-type"].split(";")[0]
    assert media in answer["content"], (method, path, media)
    if media == "application/json":
        validator(docs, answer["content"][media]["schema"]).validate(resp.json())
    if resp.is_success and request is not None:
        validator(docs, op["requestBody"]["content"]["application/json"]["schema"]).validate(request)


@pytest.mark.integration
@pytest.mark.parametrize(("method", "path", "kwargs", "status"), KNOWN,
                         ids=[f"{m} {p} {s}" for m, p, _, s in KNOWN])
def test_known_requests_are_answered_as_documented(keyed: Server, docs: dict[str, Any], method: str,
                                                   path: str, kwargs: dict[str, Any], status: int) -> None:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    resp = httpx.request(method, f"{keyed.url}{path}", headers=headers, timeout=30, **kwargs)
    assert resp.status_code == status, resp.text[:500]
    answered_as_documented(docs, method, path, resp, kwargs.get("json"))


@pytest.mark.integration
def test_the_job_routes_and_binary_inference_are_answered_as_documented(keyed: Server,
                                                                        docs: dict[str, Any]) -> None:
    url = keyed.url
    body, headers, header = binary_infer()
    resp = httpx.post(f"{url}/v2/models/{MODEL}/infer", content=body, headers={**AUTH, **headers})
    assert resp.status_code == 200, resp.text
    answered_as_documented(docs, "POST", f"/v2/models/{MODEL}/infer", resp, header)
    for fmt, content in (("text/csv", csv_text()), (PARQUET, parquet_bytes())):
        resp = httpx.post(f"{url}/batch/jobs", content=content, headers={**AUTH, "Content-Type": fmt})
        assert resp.status_code == 202, resp.text
        answered_as_documented(docs, "POST", "/batch/jobs", resp)
        job = succeeded(url, resp.json()["job_id"])
        for method, path, status in [("GET", f"/batch/jobs/{job}", 200),
                                     ("GET", f"/batch/jobs/{job}/result", 200),
                                     ("DELETE", f"/batch/jobs/{job}", 200),
                                     ("GET", f"/batch/jobs/{job}", 404)]:
            resp = httpx.request(method, f"{url}{path}", headers=AUTH)
            assert resp.status_code == status, (method, path, resp.text)
            answered_as_documented(docs, method, path, resp)


BODY = json.dumps(INFER).encode()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "error"),
    [
        # a digit int() does not read ("²" passes str.isdigit): a 500
        (f"/v2/models/{MODEL}/infer", BODY, {"Inference-Header-Content-Length": b"\xb2"}, 400,
         f"Inference-Header-Content-Length: '\xb2' does not fit a body of {len(BODY)} bytes"),
        # a lone surrogate in a feature's name (Python's JSON parser reads it): the error naming it
        # could not be written (a 500)
        ("/predict", b'{"instances": [{"\\ud800": 1}]}', {}, 422,
         "instances[0].\\ud800: unknown feature; the model takes 20 features: f00, f01, f02, f03, "
         "f04, f05, f06, f07, ..."),
        # ... or in an unknown top-level field
        ("/predict", b'{"instances": [[1]], "\\udfff": 1}', {}, 422,
         "\\udfff: unknown field; only 'instances' is read"),
        # an unknown field's name was shown whole, however long
        ("/predict", json.dumps({"instances": [[1]], "x" * 5000: 1}).encode(), {}, 422,
         "x" * 100 + "...: unknown field; only 'instances' is read"),
        # an inference request's id that is refused was named as X-Request-ID; one ending in a
        # newline was taken
        (f"/v2/models/{MODEL}/infer", json.dumps({**INFER, "id": "a b"}).encode(), {}, 422,
         "id: 1-100 characters of letters, digits, '.', '_', ':' or '-'"),
        (f"/v2/models/{MODEL}/infer", json.dumps({**INFER, "id": "a\n"}).encode(), {}, 422,
         "id: 1-100 characters of letters, digits, '.', '_', ':' or '-'"),
    ],
)
def test_requests_that_broke_serving_are_refused_with_the_documented_error(
        keyed: Server, docs: dict[str, Any], path: str, body: bytes, headers: dict[str, Any], status: int,
        error: str) -> None:
    resp = httpx.post(f"{keyed.url}{path}", content=body, headers={**AUTH, **headers})
    assert (resp.status_code, resp.json()["error"]) == (status, error), resp.text
    answered_as_documented(docs, "POST", path, resp)


# -- schemathesis --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(keyed: Server, docs: dict[str, Any]) -> Any:
    """The document as the process serves it, loaded (and checked) by schemathesis; files are
    sent as they are generated (text as text/csv, bytes as Parquet)."""
    schemathesis.serializer.alias("text/csv", "text/plain")
    schemathesis.serializer.alias(PARQUET, "application/octet-stream")
    return schemathesis.openapi.from_url(f"{keyed.url}/docs.json")


def steer(case: Any, job: str, on: bool) -> Any:
    """Half the cases are moved towards what the model takes (the served model's name and
    version, a real job, rows of 20 features, real files), so they get past the first checks
    to the ones behind them and to 200s; the values generated stay, and a part generated to
    break the schema is left as it is."""
    if on and _valid(case, "path"):
        params = case.path_parameters or {}
        for name, value in (("name", MODEL), ("version", "1"), ("job_id", job)):
            if name in params:
                params[name] = value
    if not (on and _valid(case, "body")):
        return case
    body = case.body
    if case.path == "/predict" and isinstance(body, dict) and isinstance(body.get("instances"), list):
        body["instances"] = [_row(x) for x in body["instances"]]
    elif case.path.endswith("/infer") and isinstance(body, dict) and isinstance(body.get("inputs"), list):
        for tensor in body["inputs"]:
            if isinstance(tensor, dict):  # one row of JSON data
                tensor.update(shape=[1, 20], data=_row(tensor.get("data") or []))
                if isinstance(tensor.get("parameters"), dict):
                    tensor["parameters"].pop("binary_data_size", None)
        if _valid(case, "header") and case.headers:
            case.headers.pop("Inference-Header-Content-Length", None)
        for out in body.get("outputs") or []:
            if isinstance(out, dict):
                out["name"] = "probabilities"
    elif case.path.startswith("/batch/") and case.method == "POST" and _valid(case, "query"):
        case.body = csv_text() if case.media_type == "text/csv" else parquet_bytes()
        case.query = {k: v for k, v in (case.query or {}).items() if k != "format"}
    return case


def _valid(case: Any, part: str) -> bool:
    """Whether a part of the case (path, query, body) was generated to fit the schema."""
    info = case.meta.components.get(part) if case.meta is not None else None
    return info is None or not info.mode.is_negative


def _row(value: Any) -> Any:
    """Rows and records of numbers cut or filled to the 20 features; anything else as it is."""
    if isinstance(value, list) and all(v is None or type(v) in (int, float) for v in value):
        return (value + ROW)[:20]
    if isinstance(value, dict) and all(v is None or type(v) in (int, float) for v in value.values()):
        return dict(zip(FEATURES, [*value.values(), *ROW], strict=False))
    return value


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
JSON_CHECKS = [*CHECKS, negative_data_rejection]
"""A file's body is any bytes (its schema says so): a body "generated to break it" is just
another file, which ``POST /batch/jobs`` accepts and scores later, so only a JSON body is held
to being refused when it breaks its schema."""


@pytest.mark.integration
@pytest.mark.parametrize(("method", "path"), sorted(OPERATIONS), ids=[f"{m} {p}" for m, p in sorted(OPERATIONS)])
def test_no_answer_is_a_server_error_or_off_the_document(served: Any, keyed: Server, method: str,
                                                         path: str) -> None:
    job = finished_job(keyed.url) if "{job_id}" in path else ""
    operation = served[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                      operation.as_strategy(GenerationMode.NEGATIVE))

    @given(st.builds(steer, cases, st.just(job), st.booleans()))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        json_body = case.media_type in (None, "application/json")
        case.call_and_validate(headers=AUTH, timeout=30, checks=JSON_CHECKS if json_body else CHECKS)

    check()
