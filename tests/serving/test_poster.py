"""The sidecar POST client against a real socket server that answers in each way HTTP allows."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from serving.poster import Answer, BrokenAnswer, StreamPoster, poster, retry_after

Reply = Callable[[asyncio.StreamWriter, int], Awaitable[bool]]  # (writer, request no.) -> keep open?


async def length(writer: asyncio.StreamWriter, i: int) -> bool:
    body = b'{"accepted": %d}' % i
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (len(body), body))
    return True


async def chunked(writer: asyncio.StreamWriter, i: int) -> bool:
    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nbusy \r\n7;ext=1\r\nretry l\r\n5\r\nater!\r\n0\r\nx-trailer: 1\r\n\r\n")
    return True


async def http10(writer: asyncio.StreamWriter, i: int) -> bool:
    writer.write(b"HTTP/1.0 422 Unprocessable Entity\r\n\r\nno such model")
    return False  # the body ends with the connection


async def interim_then_empty(writer: asyncio.StreamWriter, i: int) -> bool:
    writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                 b"HTTP/1.1 204 No Content\r\n\r\n")
    return True


async def cut_after_head(writer: asyncio.StreamWriter, i: int) -> bool:
    if i == 1:
        return await length(writer, i)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{\"acc")
    return False  # the body stops early: the request may have been stored


async def close_after(writer: asyncio.StreamWriter, i: int) -> bool:
    await length(writer, i)
    return False  # answers, then closes without saying so (as an idle timeout would)


async def busy(writer: asyncio.StreamWriter, i: int) -> bool:
    body = b'{"error": "the ingest queue is full"}'
    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\ncontent-length: %d\r\n\r\n%s"
                 % (len(body), body))
    return True


class Server:
    """Reads each request whole (head, then Content-Length bytes) and answers with ``reply``."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests: list[tuple[str, bytes]] = []
        self.heads: list[str] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                size = int(next(line.split(":")[1] for line in head.split("\r\n")
                                if line.lower().startswith("content-length")))
                self.heads.append(head)
                self.requests.append((head.split("\r\n")[0], await reader.readexactly(size)))
                keep = await self.reply(writer, len(self.requests))
                await writer.drain()
                if not keep:
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/events?x=1"

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()


def run(reply: Reply, bodies: list[bytes], headers: dict[str, str] | None = None) -> tuple[list[Answer], Server]:
    server = Server(reply)

    async def main() -> list[Answer]:
        async with server as url:
            client = poster(url, timeout_s=5, headers=headers)
            answers = [await client.post(b) for b in bodies]
            await client.aclose()
            return answers

    return asyncio.run(main()), server


def test_a_kept_alive_connection_carries_every_post() -> None:
    answers, server = run(length, [b'{"a": 1}', b"x" * 300_000, b"{}"])
    assert answers == [Answer(200, '{"accepted": 1}'), Answer(200, '{"accepted": 2}'),
                       Answer(200, '{"accepted": 3}')]
    assert server.connections == 1
    assert [r[0] for r in server.requests] == ["POST /events?x=1 HTTP/1.1"] * 3
    assert server.requests[1][1] == b"x" * 300_000


def test_a_chunked_answer_is_read_whole() -> None:
    answers, _ = run(chunked, [b"{}", b"{}"])
    assert answers == [Answer(503, "busy retry later!")] * 2


def test_an_http10_answer_ends_with_the_connection() -> None:
    answers, server = run(http10, [b"{}", b"{}"])
    assert answers == [Answer(422, "no such model")] * 2 and server.connections == 2


def test_interim_answers_are_skipped_and_a_204_has_no_body() -> None:
    answers, server = run(interim_then_empty, [b"{}", b"{}"])
    assert answers == [Answer(204, "")] * 2 and server.connections == 1


def test_an_answer_cut_after_its_head_is_an_error_and_not_sent_again() -> None:
    server = Server(cut_after_head)

    async def main() -> None:
        async with server as url:
            client = poster(url, timeout_s=5)
            assert await client.post(b"{}") == Answer(200, '{"accepted": 1}')
            with pytest.raises(BrokenAnswer, match=r"the answer \(200\) ended early"):
                await client.post(b"{}")
            await client.aclose()

    asyncio.run(main())
    assert len(server.requests) == 2  # the second request was not re-sent on a new connection


def test_retry_after_comes_with_the_answer() -> None:
    answers, _ = run(busy, [b"{}"])
    assert answers == [Answer(503, '{"error": "the ingest queue is full"}', 2.0)]
    assert run(length, [b"{}"])[0] == [Answer(200, '{"accepted": 1}', None)]


@pytest.mark.parametrize(("value", "seconds"), [
    ("2", 2.0),  # delay-seconds
    ("0.5", 0.5),  # not in the RFC, but plain enough to honour
    ("fri, 01 jan 2010 00:00:00 gmt", 0.0),  # a date in the past (lower case: as the client reads it)
    ("-3", 0.0),  # never a negative wait
    ("inf", None),  # no endless wait
    ("soon", None),  # unreadable: as if absent
    (None, None),  # absent
])
def test_retry_after_values(value: str | None, seconds: float | None) -> None:
    assert retry_after(value) == seconds


def test_a_retry_after_date_is_a_wait_from_now() -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    wait = retry_after(format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True))
    assert wait is not None and 100 < wait <= 120


def test_extra_headers_are_in_every_request() -> None:
    key = {"Authorization": "Bearer ingest-key-0123456789"}
    _, server = run(length, [b"{}", b"{}"], headers=key)
    assert [h.split("\r\n")[2] for h in server.heads] == ["Authorization: Bearer ingest-key-0123456789"] * 2


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer k\r\nX-Injected: 1"},  # a value of two lines
    {"Bad Name": "x"},  # a name that is not a token
])
def test_a_header_that_would_break_the_request_head_is_refused(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="a name must be a token and a value one line"):
        StreamPoster("http://sidecar:8001/events", 1.0, headers)
    with pytest.raises(ValueError, match="a name must be a token and a value one line"):
        poster("https://sidecar:8001/events", 1.0, headers)


def test_the_host_header_holds_no_credentials() -> None:
    client = StreamPoster("http://user:secret@sidecar.local:8001/events", 1.0)
    assert client._head.startswith(b"POST /events HTTP/1.1\r\nHost: sidecar.local:8001\r\n")
    assert b"secret" not in client._head


def test_a_connection_the_server_closed_is_reopened() -> None:
    answers, server = run(close_after, [b"{}", b"{}", b"{}"])
    assert [a.status for a in answers] == [200, 200, 200]
    assert server.connections == 3 and len(server.requests) == 3  # each sent once


def test_a_silent_server_times_out_and_the_next_post_reconnects() -> None:
    async def hang_first(writer: asyncio.StreamWriter, i: int) -> bool:
        if i == 1:
            await asyncio.sleep(30)
        return await length(writer, i)

    server = Server(hang_first)

    async def main() -> Answer:
        async with server as url:
            client = StreamPoster(url, timeout_s=0.2)
            with pytest.raises(TimeoutError):
                await client.post(b"{}")
            answer = await client.post(b"{}")
            await client.aclose()
            return answer

    assert asyncio.run(main()) == Answer(200, '{"accepted": 2}') and server.connections == 2


def test_a_closed_port_raises() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> None:
        with pytest.raises(OSError):
            await poster(f"http://127.0.0.1:{port}/events", timeout_s=2).post(b"{}")

    asyncio.run(main())


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="expected an http:// URL"):
        StreamPoster("ftp://example/events", 1.0)
