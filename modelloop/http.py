"""What both HTTP apps (serving's and the sidecar's) share: one error type, its one JSON shape, the
JSON response builder and the request body reader with a byte limit.

A refused request is an :class:`ApiError`, raised where the problem is found; each app maps it to
its response in one place (:data:`EXCEPTION_HANDLERS`, Starlette exception handlers, which answer
Starlette's own refusals, an unknown route's 404 and a wrong method's 405, alike), so every
refusal has the same body::

    {"error": "<first message>", "code": "<code>", "field": "<field>" | null,
     "errors": ["<message>", ...]}

``error``, ``code`` and ``field`` are what serving answered before, ``error`` and ``errors`` what
the sidecar did; a package's own keys follow (``ApiError(extra=...)``: the sidecar's
``error_count`` and ``rejected``, a 500's ``error_id``). Each message starts with the field it
names (``events[3].version: ...``). Example::

    >>> err = ApiError(422, "invalid_query", "since", "since: expected a number, got 'x'")
    >>> err.body()["error"], err.body()["field"], err.body()["errors"]
    ("since: expected a number, got 'x'", 'since', ["since: expected a number, got 'x'"])

How a package adopts it (the sidecar's :class:`monitoring.ingest.InputError` is one)::

    class RequestError(ApiError):   # the package's own name; ApiError(status, code, field, message)
        ...
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
    body = await read_body(request, limit)   # refuses 413, 415, 400 as ApiError

and a handler raises its errors instead of building responses. Needs starlette and orjson (the
serving and monitoring extras): the base install never imports this module.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ExceptionHandler

JSON = "application/json"
MAX_MESSAGES = 20
"""Messages an error body lists at most (a batch of a thousand bad events names the first 20)."""


class ApiError(Exception):
    """A refused request: HTTP status, a short ``code`` (metrics count by it), the ``field``
    concerned (None: the request as a whole), its messages (the first is ``message``) and extra
    response ``headers`` (``Retry-After``, ``WWW-Authenticate``). ``extra`` adds keys of the
    package's own to the body."""

    def __init__(self, status: int, code: str, field: str | None, message: str | Sequence[str],
                 headers: Mapping[str, str] | None = None, *,
                 extra: Mapping[str, Any] | None = None) -> None:
        # Exception.__init__ is not called: ``args`` keeps the arguments as given, so an error of
        # any subclass pickles (a future, a child process) whatever its own constructor is
        self.status = status
        self.code = code
        self.field = field
        self.messages = [message] if isinstance(message, str) else list(message)
        self.message = self.messages[0] if self.messages else code
        self.headers = dict(headers) if headers else None
        self.extra = dict(extra) if extra else {}

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.field!r}, {self.messages!r})"

    def body(self) -> dict[str, Any]:
        """The response's JSON body (module docstring)."""
        return {"error": _utf8(self.message), "code": self.code,
                "field": None if self.field is None else _utf8(self.field),
                "errors": [_utf8(m) for m in self.messages[:MAX_MESSAGES]], **self.extra}


def _utf8(text: str) -> str:
    """``text`` as UTF-8 can hold it: a lone surrogate a client sent (JSON's ``"\\ud800"``,
    which Python's parser reads) becomes its escape; the JSON writer fails on it."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode()


def _item(obj: Any) -> Any:
    """NumPy scalars orjson does not take by itself (``np.float32(1).item()``)."""
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def dumps(content: Any) -> bytes:
    """``content`` as JSON bytes: NumPy arrays and scalars as numbers, non-string keys as text."""
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS,
                        default=_item)


def json_response(content: Any, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> Response:
    return Response(dumps(content), status, headers, JSON)


def error_response(exc: ApiError) -> Response:
    return json_response(exc.body(), exc.status, exc.headers)


async def api_error_handler(request: Request, exc: Exception) -> Response:
    """The app's one mapping of a refusal to its response."""
    if not isinstance(exc, ApiError):  # registered for ApiError only
        raise exc
    return error_response(exc)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route: 404; a method the route does not take: 405,
    with ``Allow``) as an :class:`ApiError`."""
    if not isinstance(exc, HTTPException):  # registered for HTTPException only
        raise exc
    if exc.status_code in (204, 304):  # answers without a body
        return Response(status_code=exc.status_code, headers=exc.headers)
    try:
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        code = "http_error"
    return error_response(ApiError(exc.status_code, code, None,
                                   f"{request.method} {request.url.path}: {exc.detail}",
                                   exc.headers))


EXCEPTION_HANDLERS: Mapping[Any, ExceptionHandler] = {
    ApiError: api_error_handler, HTTPException: http_error_handler}
"""``Starlette(exception_handlers=EXCEPTION_HANDLERS)``: every refusal in the one shape."""


def internal_error(log: logging.Logger, request: Request | str, exc: BaseException,
                   where: str) -> ApiError:
    """The 500 for ``exc``, an error nobody expected: logged on ``log`` with its traceback under
    a new error id, which the answer names, so the sender's answer finds the log line
    (``where``: the log, e.g. ``"the sidecar's log"``). ``request``: the HTTP request that
    failed, or what names one outside HTTP (``"gRPC ModelInferRequest"``)."""
    error_id = uuid.uuid4().hex[:16]
    what = request if isinstance(request, str) else f"{request.method} {request.url.path}"
    log.error("error %s: %s failed", error_id, what, exc_info=exc)
    return ApiError(500, "internal", None, f"internal error {error_id}: {where} has its traceback",
                    extra={"error_id": error_id})


def content_length(request: Request) -> int | None:
    """The body's declared length (Content-Length), None when not given. A body in a content
    coding (gzip, ...) is refused (415): bodies are read as sent, and inflating one is a way to
    make a small request large; a Content-Length that is not a number is refused (400)."""
    coding = request.headers.get("content-encoding")
    if coding is not None and coding.strip().lower() not in ("", "identity"):
        raise ApiError(415, "unsupported_encoding", "Content-Encoding",
                       f"Content-Encoding: {coding[:40]!r} is not accepted; send the body uncompressed")
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isascii() or not declared.isdigit():
        raise ApiError(400, "malformed_body", "Content-Length", "Content-Length: not a number")
    return int(declared)


TooLarge = Callable[[int | None, int], ApiError]
"""The error for a body over ``limit`` bytes: ``(size, limit)``, ``size`` the declared length, or
None when the body passed the limit while it was read (no Content-Length, or a longer body)."""


def body_too_large(size: int | None, limit: int) -> ApiError:
    said = "over" if size is None else f"{size} bytes is over"
    return ApiError(413, "too_large", "body", f"body: {said} the {limit} byte limit")


async def read_body(request: Request, limit: int, too_large: TooLarge = body_too_large) -> bytes:
    """The request body, at most ``limit`` bytes: a declared length over it is refused before a
    byte is read, and the bytes are counted as they arrive (a body longer than it said is
    refused too). Refusals are :func:`content_length`'s and ``too_large``'s."""
    declared = content_length(request)
    if declared is not None and declared > limit:
        raise too_large(declared, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(None, limit)
        chunks.append(chunk)
    return b"".join(chunks)
