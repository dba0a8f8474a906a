"""Zero-downtime swap and a sidecar that is down: a real `modelloop serve` with 2 workers.

The sidecar URL points at a closed port, so every event send fails: callers must not notice.
A version that fails its check is never swapped in, even when ``aliases.json`` is written by hand
(the registry refuses to point an alias at it).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from modelloop.registry import Registry, atomic_write_bytes
from modelloop.schemas import ModelMetadata
from tests.serving.conftest import (
    MODEL,
    Hammer,
    Server,
    free_port,
    start_server,
    stop_server,
    wait_until,
)
from tests.serving.onnx_models import register_mlp

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("show_log_on_failure")]
ROW = [1.5] * 20


@pytest.fixture(scope="module")
def server(model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("log") / "server.log"
    env = {
        "MODELLOOP_SERVING_SIDECAR_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "MODELLOOP_SERVING_EVENT_FLUSH_INTERVAL_S": "0.05",
        "MODELLOOP_SERVING_EVENT_RETRY_BACKOFF_S": "0.02",
        "MODELLOOP_SERVING_EVENT_MAX_AGE_S": "0.5",  # kept and retried, then expired
        "MODELLOOP_SERVING_ALIAS_POLL_INTERVAL_S": "0.1",
    }
    srv = start_server(model_home, log, env, "--workers", "2")
    sys.modules[__name__]._server = srv  # type: ignore[attr-defined]
    yield srv
    stop_server(srv)


def _served_versions(server: Server) -> set[int]:
    """The version each worker reports (several requests reach both workers)."""
    return {httpx.get(f"{server.url}/admin/model").json()["version"] for _ in range(12)}


def test_swap_under_continuous_load_fails_no_request(server: Server, model_home: Path) -> None:
    registry = Registry(model_home / "registry")
    with Hammer(server.url) as hammer:
        wait_until(lambda: hammer.count() >= 200, 30, "load before the swap")
        new: ModelMetadata = register_mlp(registry, MODEL, seed=1, promote=False)
        registry.promote(MODEL, new.version)
        wait_until(lambda: _served_versions(server) == {2}, 30, "both workers to serve v2")
        seen_after = hammer.count()
        wait_until(lambda: hammer.count() >= seen_after + 200, 30, "load after the swap")
    assert hammer.failures == []
    counts = Counter(hammer.versions)
    assert set(counts) == {1, 2} and counts[1] > 100 and counts[2] > 100, counts
    # once a worker serves v2 it never answers with v1 again: the last answers are all v2
    assert set(hammer.versions[-100:]) == {2}
    assert server.metric("modelloop_serving_reloads_total", model=MODEL, result="success") == 2
    assert server.metric("modelloop_serving_model_info", model=MODEL, version="2") == 1
    assert server.metric("modelloop_serving_model_info", model=MODEL, version="1") == 0


def _point_production_at(registry: Registry, version: int, previous: int) -> None:
    """Write aliases.json by hand, as the registry would not: production at ``version``."""
    atomic_write_bytes(registry.root / MODEL / "aliases.json",
                       json.dumps({"production": version, "previous": previous}).encode())


@pytest.mark.parametrize(("broken", "error"), [
    # a valid graph whose preprocessing divides by a scale of zero: it loads, and answers NaN
    ("nan", "{label} is broken: {path}: output 'probabilities' is not finite (NaN or infinity) in "
            "200 of 200 reference rows"),
    # bytes ONNX Runtime cannot load
    ("corrupt", "{label}: ONNX Runtime cannot load {path}: "),
])
def test_version_that_fails_its_check_is_never_swapped_in(server: Server, model_home: Path,
                                                          broken: str, error: str) -> None:
    registry = Registry(model_home / "registry")
    current = registry.get(MODEL, "production").metadata
    if broken == "nan":
        bad = register_mlp(registry, MODEL, seed=0, promote=False, zero_scale=True)
    else:
        bad = registry.register(current.model_copy(), b"this is not an ONNX model",
                                reference=registry.get(MODEL, current.version).reference())
    failures = server.metric("modelloop_serving_reloads_total", model=MODEL, result="failure")
    with Hammer(server.url, threads=2) as hammer:
        wait_until(lambda: hammer.count() >= 50, 30, "load before the alias moves")
        _point_production_at(registry, bad.version, current.version)
        wait_until(lambda: server.metric("modelloop_serving_reloads_total", model=MODEL,
                                         result="failure") == failures + 2, 30,
                   "both workers to try the new version")
        before = hammer.count()
        wait_until(lambda: hammer.count() >= before + 50, 30, "load after the refused swap")
    assert hammer.failures == []
    assert set(hammer.versions) == {current.version}
    status = httpx.get(f"{server.url}/admin/model").json()
    assert status["version"] == current.version
    assert status["last_reload"]["result"] == "failure"
    assert status["last_reload"]["error"].startswith(error.format(
        label=f"{MODEL} v{bad.version}", path=registry.get(MODEL, bad.version).onnx_path))
    assert server.metric("modelloop_serving_model_info", model=MODEL, version=str(bad.version)) == 0
    # production points at a good version again; the broken one does not become previous
    assert registry.rollback(MODEL) == {"production": current.version}


def test_an_alias_pointing_at_no_version_is_a_counted_failure(server: Server,
                                                               model_home: Path) -> None:
    registry = Registry(model_home / "registry")
    current, previous = registry.resolve(MODEL), registry.aliases(MODEL).get("previous", 1)
    missing = max(registry.version_numbers(MODEL)) + 40
    failures = server.metric("modelloop_serving_reloads_total", model=MODEL, result="failure",
                             reason="missing_version")
    # production moved by hand to a version that was never registered
    _point_production_at(registry, missing, current)
    wait_until(lambda: server.metric("modelloop_serving_reloads_total", model=MODEL,
                                     result="failure", reason="missing_version") == failures + 2,
               30, "both workers to count the missing version")
    status = httpx.get(f"{server.url}/admin/model").json()
    assert (status["version"], status["last_reload"]["result"], status["last_reload"]["error"]) == (
        current, "failure", f"alias 'production' of {MODEL} points at v{missing}, which is not "
                            f"registered")
    assert httpx.post(f"{server.url}/predict", json={"instances": [ROW]}).json()["version"] == current
    _point_production_at(registry, current, previous)  # as it was


def test_sidecar_down_changes_nothing_for_callers(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(50):
            resp = client.post("/predict", json={"instances": [ROW]})
            assert resp.status_code == 200
    # the events were kept and retried off the request path, then dropped once too old, and counted
    wait_until(lambda: server.metric("modelloop_serving_events_dropped_total", model=MODEL,
                                     reason="expired") >= 50, 30, "expired events to be counted")
    assert server.metric("modelloop_serving_events_sent_total", model=MODEL) == 0
    assert server.metric("modelloop_serving_errors_total", model=MODEL) == 0
