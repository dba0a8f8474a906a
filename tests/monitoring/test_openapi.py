"""The sidecar's OpenAPI document: valid OpenAPI 3.1, naming every route of the app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from pydantic import SecretStr

from monitoring.app import create_app
from monitoring.openapi import openapi_document
from monitoring.settings import MonitorSettings
from monitoring.sidecar import Sidecar
from tests.monitoring.helpers import serve_in_thread

ADMIN = "admin-" + "a" * 20
OPEN = {"/live", "/ready", "/metrics", "/openapi.json"}


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
