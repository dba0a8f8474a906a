"""The HTTP core both apps share (modelloop/http.py): the error type and its one JSON shape, the
body reader's limits, on a real Starlette app called through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import doctest
import pickle
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import modelloop.http as http_module
from modelloop.http import (
    EXCEPTION_HANDLERS,
    MAX_MESSAGES,
    ApiError,
    json_response,
    read_body,
)

LIMIT = 100


def test_the_docstring_example_runs() -> None:
    result = doctest.testmod(http_module)
    assert result.attempted > 0 and result.failed == 0


class Refused(ApiError):
    """A package's own error type, as a package adopts the core's (its own constructor)."""

    def __init__(self, status: int, reason: str, errors: list[str], rejected: int = 1) -> None:
        super().__init__(status, reason, None, errors, extra={"rejected": rejected})


@pytest.mark.parametrize(
    ("error", "body"),
    [
        # one message naming its field
        (ApiError(422, "invalid_query", "since", "since: not a number"),
         {"error": "since: not a number", "code": "invalid_query", "field": "since",
          "errors": ["since: not a number"]}),
        # no field (the request as a whole); extras follow the shape's keys
        (ApiError(500, "internal", None, "internal error 1f", extra={"error_id": "1f"}),
         {"error": "internal error 1f", "code": "internal", "field": None,
          "errors": ["internal error 1f"], "error_id": "1f"}),
        # a subclass with a constructor of its own adds its keys
        (Refused(422, "invalid_event", ["events[0].x: bad", "events[1].x: bad"], 2),
         {"error": "events[0].x: bad", "code": "invalid_event", "field": None,
          "errors": ["events[0].x: bad", "events[1].x: bad"], "rejected": 2}),
        # no message: the code stands for it
        (ApiError(409, "busy", None, []),
         {"error": "busy", "code": "busy", "field": None, "errors": []}),
        # a lone surrogate a client sent is written as its escape (the JSON writer fails on it)
        (ApiError(422, "invalid_category", "plan\ud800", "plan\ud800: unknown"),
         {"error": "plan\\ud800: unknown", "code": "invalid_category", "field": "plan\\ud800",
          "errors": ["plan\\ud800: unknown"]}),
    ],
)
def test_every_error_has_the_one_shape(error: ApiError, body: dict[str, object]) -> None:
    assert error.body() == body
    assert str(error) == error.message  # the body escapes what UTF-8 cannot hold


def test_an_error_lists_its_first_messages_only() -> None:
    error = ApiError(422, "invalid_event", None, [f"events[{i}].x: bad" for i in range(50)])
    assert error.body()["errors"] == [f"events[{i}].x: bad" for i in range(MAX_MESSAGES)]


def test_an_error_of_a_subclass_pickles() -> None:
    error = Refused(422, "invalid_event", ["events[0].x: bad"], 3)
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), again.body()) == (Refused, error.body())


async def echo(request: Request) -> Response:
    body = await read_body(request, LIMIT)
    if body == b"refuse":
        raise ApiError(429, "slow_down", None, "slow down", {"Retry-After": "1"})
    return json_response({"bytes": len(body)})


APP = Starlette(routes=[Route("/echo", echo, methods=["POST"])],
                exception_handlers=EXCEPTION_HANDLERS)


def call(method: str, path: str, content: bytes | AsyncIterator[bytes] = b"",
         headers: dict[str, str] | None = None) -> httpx.Response:
    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP),
                                     base_url="http://test") as client:
            return await client.request(method, path, content=content, headers=headers)
    return asyncio.run(send())


async def chunks(n: int) -> AsyncIterator[bytes]:
    """``n`` bytes in pieces of 10, sent without a Content-Length."""
    for _ in range(n // 10):
        yield b"x" * 10


@pytest.mark.parametrize(
    ("content", "headers", "status", "answer"),
    [
        # at the limit
        (b"x" * LIMIT, {}, 200, {"bytes": LIMIT}),
        (chunks(LIMIT), {}, 200, {"bytes": LIMIT}),
        # a declared length over the limit: refused before a byte is read
        (b"x" * (LIMIT + 1), {}, 413,
         {"error": "body: 101 bytes is over the 100 byte limit", "code": "too_large",
          "field": "body", "errors": ["body: 101 bytes is over the 100 byte limit"]}),
        # no declared length: refused once the bytes read pass the limit
        (chunks(LIMIT + 10), {}, 413,
         {"error": "body: over the 100 byte limit", "code": "too_large", "field": "body",
          "errors": ["body: over the 100 byte limit"]}),
        # a content coding: bodies are read as sent
        (b"\x1f\x8b", {"Content-Encoding": "gzip"}, 415,
         {"error": "Content-Encoding: 'gzip' is not accepted; send the body uncompressed",
          "code": "unsupported_encoding", "field": "Content-Encoding",
          "errors": ["Content-Encoding: 'gzip' is not accepted; send the body uncompressed"]}),
        # identity is no coding
        (b"{}", {"Content-Encoding": "identity"}, 200, {"bytes": 2}),
        # a Content-Length that is not a number
        (b"{}", {"Content-Length": "2x"}, 400,
         {"error": "Content-Length: not a number", "code": "malformed_body",
          "field": "Content-Length", "errors": ["Content-Length: not a number"]}),
    ],
)
def test_the_body_reader_holds_its_limits(content: bytes | AsyncIterator[bytes],
                                          headers: dict[str, str], status: int,
                                          answer: dict[str, object]) -> None:
    resp = call("POST", "/echo", content, headers)
    assert (resp.status_code, resp.json()) == (status, answer)


def test_a_raised_error_is_answered_with_its_headers() -> None:
    resp = call("POST", "/echo", b"refuse")
    assert (resp.status_code, resp.headers["retry-after"]) == (429, "1")
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"error": "slow down", "code": "slow_down", "field": None,
                           "errors": ["slow down"]}


@pytest.mark.parametrize(
    ("method", "path", "status", "code", "message", "headers"),
    [
        # no such route
        ("GET", "/nowhere", 404, "not_found", "GET /nowhere: Not Found", {}),
        # a method the route does not take
        ("GET", "/echo", 405, "method_not_allowed", "GET /echo: Method Not Allowed",
         {"allow": "POST"}),
    ],
)
def test_starlette_s_own_refusals_have_the_one_shape_too(
        method: str, path: str, status: int, code: str, message: str,
        headers: dict[str, str]) -> None:
    resp = call(method, path)
    assert resp.status_code == status
    assert resp.json() == {"error": message, "code": code, "field": None, "errors": [message]}
    assert {k: resp.headers[k] for k in headers} == headers
