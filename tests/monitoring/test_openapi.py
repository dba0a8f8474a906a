"""The sidecar's OpenAPI document: valid OpenAPI 3.1 naming every route, and honest about a real
`modelloop monitor` process on each store engine, which schemathesis drives with a bounded
budget: no 5xx, no status or body the document does not list."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from monitoring import openapi
from monitoring import sidecar as sidecar_answers
from monitoring.app import create_app
from monitoring.jobs import JobAnswer, Refusal
from monitoring.openapi import OPERATIONS, openapi_document
from monitoring.settings import MonitorSettings
from monitoring.sidecar import Sidecar
from monitoring.store import open_store
from tests.monitoring.conftest import PG_URL, _pg_available
from tests.monitoring.helpers import (
    SidecarProcess,
    TrainedModel,
    serve_in_thread,
    sidecar_process,
)

ADMIN = "admin-" + "a" * 20
OPEN = {"/live", "/ready", "/metrics", "/openapi.json"}
EXAMPLES = 20
"""Cases per operation and store engine, valid and invalid ones: this file took 40 s on two
cores with PostgreSQL running (the fitted model and two sidecars included)."""


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def served_document(app: Any) -> dict[str, Any]:
    """The document as the app serves it (the sidecar itself is never started)."""
    with serve_in_thread(app) as url:
        return httpx.get(f"{url}/openapi.json").json()


def test_the_document_is_valid_openapi_and_describes_every_route(home: Path) -> None:
    app = create_app(Sidecar(MonitorSettings(home=home, api_key=SecretStr(ADMIN))))
    doc = served_document(app)
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
            else:  # the key of the route's role, or the admin key; refusals documented
                assert {"adminKey": []} in op["security"], path
                assert {"401", "403"} <= set(op["responses"]), path


def test_export_parameters_carry_the_ranges_the_app_checks(home: Path) -> None:
    doc = served_document(create_app(Sidecar(MonitorSettings(home=home))))
    params = {p["name"]: p for p in doc["paths"]["/export/labelled"]["get"]["parameters"]}
    assert params["model"]["required"] is True
    assert params["since"]["schema"] == {"type": "number", "minimum": 0, "maximum": 1e11,
                                         "default": 0}
    assert params["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 1_000_000,
                                         "default": 100_000}


def test_a_job_answer_names_the_refusals_of_a_job_request(home: Path) -> None:
    doc = served_document(create_app(Sidecar(MonitorSettings(home=home))))
    refused = doc["components"]["schemas"]["JobAnswer"]["properties"]["refused"]["anyOf"]
    # an unknown or unwatched model is a 422, never a job answer
    assert refused[0]["enum"] == [Refusal.duplicate, Refusal.model_busy, Refusal.at_capacity]


@pytest.mark.parametrize(("answer", "described"), [
    (sidecar_answers.FeedbackResult, openapi.FeedbackResult),  # POST /feedback
    (sidecar_answers.AlertsResult, openapi.AlertsResult),      # POST /alertmanager
    (sidecar_answers.AlertJob, openapi.AlertJob),              # an alert's job
    (sidecar_answers.IgnoredAlert, openapi.IgnoredAlert),
    (JobAnswer, openapi.JobAnswer),                            # POST /retrain
    (JobAnswer, openapi.FiredJob),                             # a firing's job
    (sidecar_answers.SidecarStatus, openapi.Status),           # GET /status, POST /check
    (sidecar_answers.PolicyStatus, openapi.PolicyStatus),
    (sidecar_answers.WindowSizes, openapi.WindowSizes),
    (sidecar_answers.FiringEntry, openapi.FiringEntry),
])
def test_each_answers_type_and_its_description_name_the_same_keys(answer: Any,
                                                                   described: Any) -> None:
    # the sidecar builds its answers as these TypedDicts; the document describes them with the
    # models: a key added to one and not the other fails here (schemathesis checks the values)
    assert list(answer.__annotations__) == list(described.model_fields)
    assert answer.__required_keys__ == {name for name, f in described.model_fields.items()
                                        if f.is_required()}


@pytest.mark.parametrize(
    ("routes", "error"),
    [
        # a new route without a description
        ([("/new", "GET", None)], "GET /new has no description in monitoring/openapi.py"),
        # a description whose route is gone
        ([("/live", "GET", None)], "described but not routed"),
    ],
)
def test_a_route_and_its_description_go_together(routes: list[tuple[str, str, str | None]],
                                                 error: str) -> None:
    with pytest.raises(LookupError, match=error):
        openapi_document(routes)


# -- against a real process --------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def keyed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          trained: TrainedModel) -> Iterator[SidecarProcess]:
    """A sidecar on each store engine with an admin key, the model ``churn`` registered, and a
    retraining job that does nothing."""
    env = {"MODELLOOP_MONITOR_API_KEY": ADMIN, "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "3600",
           "MODELLOOP_MONITOR_RETRAIN_COMMAND": f"{sys.executable} -c pass"}
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    if request.param == "postgresql":
        if not _pg_available():
            pytest.fail(f"PostgreSQL is not running at {PG_URL}: scripts/ci_services.sh (run by make test) starts it")
        env |= {"MODELLOOP_MONITOR_STORE_URL": PG_URL, "MODELLOOP_MONITOR_STORE_TABLE_PREFIX": prefix}
    home = tmp_path_factory.mktemp("openapi")
    trained.register(home / "registry")
    try:
        with sidecar_process(home, home / "sidecar.log", **env) as proc:
            yield proc
    finally:
        if request.param == "postgresql":
            store = open_store(PG_URL, prefix)
            store.drop_schema()
            store.close()


@pytest.fixture(scope="module")
def served(keyed: SidecarProcess) -> Any:
    """The document as the process serves it, loaded (and checked) by schemathesis."""
    return schemathesis.openapi.from_url(f"{keyed.url}/openapi.json")


def known(case: Any, steer: bool) -> Any:
    """Half the cases name the registered model wherever they name one, so they get past the
    model lookup to the checks behind it (and to 200s, 202s and 409s)."""
    if steer:
        case.body = _name_churn(case.body)
        for params in (case.query, case.path_parameters):
            if params and isinstance(params.get("model"), str):
                params["model"] = "churn"
    return case


def _name_churn(value: Any) -> Any:
    if isinstance(value, list):
        return [_name_churn(v) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {k: "churn" if k == "model" and isinstance(v, str) else _name_churn(v)
                           for k, v in value.items()}
    if isinstance(out.get("labels"), dict):  # an alert's labels
        out["labels"]["model"] = "churn"
    return out


CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.mark.integration
@pytest.mark.parametrize(("method", "path"), sorted(OPERATIONS),
                         ids=[f"{m} {p}" for m, p in sorted(OPERATIONS)])
def test_no_answer_is_a_server_error_or_off_the_document(served: Any, method: str, path: str) -> None:
    operation = served[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                      operation.as_strategy(GenerationMode.NEGATIVE))

    @given(st.builds(known, cases, st.booleans()))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        case.call_and_validate(headers=bearer(ADMIN), timeout=30, checks=CHECKS)

    check()


def columns(**over: Any) -> dict[str, Any]:
    group = {"model": "churn", "version": 1, "request_ids": ["r"], "first_row": [0], "rows": [1],
             "timestamp": [time.time()], "latency_s": [0.0], "features": [[0.5] * 20],
             "prediction": [0]}
    return {"columns": [group | over]}


def alerts(**over: Any) -> dict[str, Any]:
    alert = {"status": "firing", "labels": {"model": "churn"}, "startsAt": "2026-01-01T00:00:00Z",
             "fingerprint": "fp"}
    return {"version": "4", "status": "firing", "alerts": [alert | over]}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("method", "path", "body", "error"),
    [
        # 2**63 packed rows of nothing: its length did not fit an index (503, retried by serving)
        ("POST", "/events", columns(rows=[2**63], features={"dtype": "float32", "shape": [2**63, 0],
                                                            "data": ""}),
         "columns[0].features: Value error, shape.0: Input should be less than or equal to 2147483647"),
        # NUL, which PostgreSQL cannot store: in a request id it refused the batch and every
        # batch committed with it (503)
        ("POST", "/events", columns(request_ids=["r\x00"]),
         "columns[0].request_ids[0]: Value error, must not contain NUL (\\u0000)"),
        # in the request id of a label, looked up (500 on PostgreSQL)
        ("POST", "/feedback", {"request_id": "r\x00", "label": "no"},
         "request_id: Value error, must not contain NUL (\\u0000)"),
        # in an alert's fingerprint, stored to act once per firing (500 on PostgreSQL)
        ("POST", "/alertmanager", alerts(fingerprint="f\x00"),
         "alerts[0].fingerprint: Value error, must not contain NUL (\\u0000)"),
        # in the reason stored with a job (500 on PostgreSQL)
        ("POST", "/retrain", {"model": "churn", "reason": "r\x00"},
         "reason: must be a string of at most 1000 characters (no NUL)"),
        # in the model a query asks the store about (500 on PostgreSQL; schemathesis found it)
        ("GET", "/jobs?model=c%00", None, "model: must not contain NUL (\\u0000)"),
        ("GET", "/export/labelled?model=c%00", None, "model: must not contain NUL (\\u0000)"),
    ],
)
def test_requests_that_broke_the_sidecar_are_refused_with_the_documented_error(
        keyed: SidecarProcess, method: str, path: str, body: Any, error: str) -> None:
    resp = httpx.request(method, f"{keyed.url}{path}", json=body, headers=bearer(ADMIN))
    assert (resp.status_code, resp.json()["error"]) == (422, error), resp.text
    doc = httpx.get(f"{keyed.url}/openapi.json").json()
    jsonschema_rs.validator_for(doc["components"]["schemas"]["Error"]).validate(resp.json())


@pytest.mark.integration
def test_without_a_key_every_guarded_route_answers_401(keyed: SidecarProcess) -> None:
    doc = httpx.get(f"{keyed.url}/openapi.json").json()  # the document itself is open
    error = jsonschema_rs.validator_for(doc["components"]["schemas"]["Error"])
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            resp = httpx.request(method, f"{keyed.url}{path.replace('{model}', 'churn')}",
                                 json={} if "requestBody" in op else None)
            if op["security"]:
                assert resp.status_code == 401, (method, path, resp.text)
                error.validate(resp.json())
            else:
                assert resp.status_code == 200, (method, path, resp.text)
