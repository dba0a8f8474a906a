"""Two `modelloop serve` processes on one host and one home keep their metrics apart.

BentoML keeps the Prometheus multiprocess files under BENTOML_HOME and empties that folder when a
server starts; each server start now has its own folder, so neither wipes nor reports the other's."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import MODEL, Server, start_server, stop_server, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROW = [0.5] * 20


def predictions(url: str, n: int) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(n):
            assert client.post("/predict", json={"instances": [ROW]}).status_code == 200


def counted(server: Server) -> float:
    return server.metric("modelloop_serving_requests_total", route="predict", code="200")


def test_two_servers_on_one_home_keep_their_own_counts(model_home: Path, tmp_path: Path) -> None:
    first = start_server(model_home, tmp_path / "first.log", {}, "--workers", "2")
    try:
        predictions(first.url, 7)
        wait_until(lambda: counted(first) == 7, 10, "the first server to count its 7 requests")
        second = start_server(model_home, tmp_path / "second.log", {}, "--workers", "1")
        try:
            predictions(second.url, 3)
            # workers flush their counts every 100 ms: wait for the second's, then compare both
            wait_until(lambda: counted(second) >= 3, 10, "the second server to count its requests")
            assert counted(second) == 3  # none of the first server's
            assert counted(first) == 7  # not wiped by the second start, nothing of the second's
            assert first.metric("modelloop_serving_rows_total", model=MODEL) == 7
        finally:
            stop_server(second)
    finally:
        stop_server(first)
