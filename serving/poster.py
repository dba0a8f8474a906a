"""A small keep-alive HTTP/1.1 client that POSTs event batches to the sidecar.

httpx's ``AsyncClient`` spent about 610 us of CPU per POST on this machine (its transport, h11
and anyio layers), aiohttp 160 us; this client writes each request with one call and reads the
answer from asyncio streams: 50 us. At 1000 one-row events per send that is 0.6 us of a worker's
CPU per request saved, and 0.6 ms per 1024-row request, whose events take about one send each.

What it reads of an answer: the status (after any 1xx interim answers), ``Retry-After``, and the
body by Content-Length, chunked, up to the connection's close (an HTTP/1.0 server), or none (204,
304). Extra headers (the sidecar's ingest key) are given once and written into the request head
with the rest, so they cost a request nothing.
A kept-alive connection that the server closed while it was idle is reopened once, and only when
not a byte of the answer had come; after a failure the connection is aborted, so nothing it
buffered stays. ``https`` URLs go through httpx (no TLS of our own).

Example (inside a running event loop)::

    client = poster("http://127.0.0.1:8001/events", timeout_s=2.0, headers={"Authorization": "Bearer k"})
    answer = await client.post(b'{"columns": [...]}')   # Answer(status=200, text='{"accepted": 3}', ...)
    await client.aclose()
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # what a header name may be (RFC 9110)


class Answer(NamedTuple):
    status: int
    text: str
    retry_after: float | None = None
    """Seconds the server asked to wait (``Retry-After``), None when it did not say."""


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, delay-seconds or an HTTP date (None when
    absent or unreadable; a date in the past is 0)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def header_lines(headers: Mapping[str, str] | None) -> str:
    """``Name: value\r\n`` lines, refusing a name or value that would break the request head."""
    lines = ""
    for name, value in (headers or {}).items():
        if not _TOKEN.fullmatch(name) or any(c in value for c in "\r\n\0"):
            raise ValueError(f"header {name!r}: a name must be a token and a value one line")
        lines += f"{name}: {value}\r\n"
    return lines


class BrokenAnswer(Exception):
    """The answer stopped after its head: the request may have been processed, so it is not
    sent again on a new connection here (the emitter's retries decide)."""


class Poster(Protocol):
    async def post(self, body: bytes) -> Answer: ...

    async def aclose(self) -> None: ...


def poster(url: str, timeout_s: float, headers: Mapping[str, str] | None = None) -> Poster:
    """The client for ``url``: ours for ``http``, httpx's for ``https``; ``headers`` go with
    every request."""
    if urlsplit(url).scheme == "https":
        return _HttpxPoster(url, timeout_s, headers)
    return StreamPoster(url, timeout_s, headers)


class StreamPoster:
    """POSTs JSON bodies to one ``http://`` URL over one kept-alive connection."""

    def __init__(self, url: str, timeout_s: float, headers: Mapping[str, str] | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url!r}: expected an http:// URL")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout_s = timeout_s
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = f"[{self.host}]" if ":" in self.host else self.host  # (no user:password@ in Host)
        host += f":{parts.port}" if parts.port else ""
        self._head = (f"POST {target} HTTP/1.1\r\nHost: {host}\r\n{header_lines(headers)}"
                      "Content-Type: application/json\r\nContent-Length: ").encode("latin-1")
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> Answer:
        """Send ``body``; the answer, or an exception (connection refused, timeout, a broken
        answer), after which the next call opens a new connection."""
        try:
            return await asyncio.wait_for(self._exchange(body), self.timeout_s)
        except BaseException:
            self._close(abort=True)  # its state is unknown: never reuse it, drop what it buffers
            raise

    async def _exchange(self, body: bytes) -> Answer:
        if self._writer is not None:
            try:
                return await self._once(body)
            except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
                if getattr(exc, "partial", b""):
                    raise  # the server answered in part: sending again could store twice
                self._close(abort=True)  # closed while idle, before it read this request: reopen once
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return await self._once(body)

    async def _once(self, body: bytes) -> Answer:
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        writer.writelines((self._head, str(len(body)).encode(), b"\r\n\r\n", body))
        await writer.drain()
        version, status, headers = await self._head_of(reader)
        while 100 <= status < 200:  # interim answers (100 Continue, 103 Early Hints): the next
            version, status, headers = await self._head_of(reader)
        try:
            if status in (204, 304):
                content = b""
            elif "chunked" in headers.get("transfer-encoding", ""):
                content = await self._chunks(reader)
            elif "content-length" in headers:
                content = await reader.readexactly(int(headers["content-length"]))
            else:  # the body ends with the connection
                content = await reader.read()
                self._close()
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise BrokenAnswer(f"the answer ({status}) ended early: {exc!r}") from exc
        connection = headers.get("connection", "")
        if connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive"):
            self._close()
        return Answer(status, content.decode("utf-8", "replace"), retry_after(headers.get("retry-after")))

    @staticmethod
    async def _head_of(reader: asyncio.StreamReader) -> tuple[str, int, dict[str, str]]:
        """(HTTP version, status, headers with lower-case names and values) of the next answer."""
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head[:-4].split("\r\n")
        version, status = status_line.split(" ", 2)[:2]
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        return version, int(status), headers

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then an empty line
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    def _close(self, abort: bool = False) -> None:
        """Close the connection; ``abort``: at once, dropping whatever is still unsent."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                if abort:
                    self._writer.transport.abort()
                else:
                    self._writer.close()
        self._reader = self._writer = None

    async def aclose(self) -> None:
        writer = self._writer
        self._close()
        if writer is not None:
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _HttpxPoster:
    """The same interface over httpx, for https sidecars."""

    def __init__(self, url: str, timeout_s: float, headers: Mapping[str, str] | None = None) -> None:
        import httpx

        header_lines(headers)  # the same check as ours
        self.url = url
        self._client: Any = httpx.AsyncClient(
            timeout=timeout_s, headers={**(headers or {}), "content-type": "application/json"})

    async def post(self, body: bytes) -> Answer:
        resp = await self._client.post(self.url, content=body)
        return Answer(resp.status_code, resp.text, retry_after(resp.headers.get("retry-after")))

    async def aclose(self) -> None:
        await self._client.aclose()


class AiohttpPoster:
    """The same interface over aiohttp (the candidate measured by bench_serving's events-client)."""

    def __init__(self, url: str, timeout_s: float, headers: Mapping[str, str] | None = None) -> None:
        import aiohttp

        self.url = url
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1),
            headers={**(headers or {}), "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def post(self, body: bytes) -> Answer:
        async with self._session.post(self.url, data=body) as resp:
            text = await resp.text(errors="replace")
            return Answer(resp.status, text, retry_after(resp.headers.get("Retry-After")))

    async def aclose(self) -> None:
        await self._session.close()
