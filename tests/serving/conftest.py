"""Fixtures for the serving tests: real trained models, a real `modelloop serve`, a real sidecar stub.

Servers are started once per module (`modelloop serve` as a subprocess on a port the OS picked),
polled for readiness against a deadline, and their log is printed when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelloop.ports import free_port
from modelloop.registry import Registry
from modelloop.schemas import ColumnBatch
from tests.serving.onnx_models import register_mlp

MODELLOOP = str(Path(sys.executable).with_name("modelloop"))
MODEL = "churn"
FEATURES = [f"f{i:02d}" for i in range(20)]
KEY = "s3cret-token"
AUTH = {"Authorization": f"Bearer {KEY}"}


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check()`` until it returns a truthy value; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def model_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MODELLOOP_HOME whose registry has model `churn` v1 (trained, promoted to production)."""
    home = tmp_path_factory.mktemp("home")
    register_mlp(Registry(home / "registry"), MODEL, n_features=20, n_classes=3, seed=0)
    return home


@pytest.fixture(scope="package")
def main_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The home of the shared `server`: model `churn` v1 (its registry is not changed by tests)."""
    home = tmp_path_factory.mktemp("main-home")
    register_mlp(Registry(home / "registry"), MODEL, n_features=20, n_classes=3, seed=0)
    return home


def events_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-row events of a ``POST /events`` body, validated (serving sends columns)."""
    return [e.model_dump() for g in ColumnBatch.model_validate(body).columns for e in g.events()]


# -- a recording sidecar ---------------------------------------------------------------------
@dataclass
class Sidecar:
    url: str
    batches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for b in self.batches for e in events_of(b)]


@pytest.fixture(scope="package")
def sidecar() -> Iterator[Sidecar]:
    """A tiny real HTTP server that answers POST /events like the sidecar and records the bodies."""
    record = Sidecar(url="")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            doc = json.loads(body)
            with lock:
                record.batches.append(doc)
            out = json.dumps({"accepted": len(events_of(doc))}).encode()
            self.send_response(200 if self.path == "/events" else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    record.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield record
    server.shutdown()
    server.server_close()


# -- a real `modelloop serve` ----------------------------------------------------------------
@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    home: Path
    env: dict[str, str]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total


def start_server(home: Path, log: Path, env_extra: dict[str, str], *args: str,
                 timeout: float = 90, modelloop: str = MODELLOOP) -> Server:
    """``modelloop serve`` (from the test venv, or the ``modelloop`` given) on a free port, ready."""
    port = free_port()
    env = {**os.environ, "MODELLOOP_HOME": str(home), "BENTOML_HOME": str(home / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "True", **env_extra}
    out = open(log, "wb")  # noqa: SIM115 - the server writes to it for its whole life
    proc = subprocess.Popen([modelloop, "serve", "--port", str(port), "--host", "127.0.0.1", *args],
                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    server = Server(url, proc, log, home, env)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"modelloop serve exited with {proc.returncode}:\n{server.log_text()}")
        try:
            return httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, timeout, "modelloop serve to become ready", interval=0.2)
    except AssertionError:
        stop_server(server)
        print(server.log_text())
        raise
    return server


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)


@pytest.fixture
def show_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the module's server log when the test fails (set by the server fixtures)."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "server" in request.fixturenames:
        for server in [getattr(request.module, "_server", None) or (_servers[-1] if _servers else None)]:
            if server is not None:
                print(f"---- server log ({server.log}) ----\n{server.log_text()[-20000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


@pytest.fixture(scope="package")
def server(main_home: Path, sidecar: Sidecar, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `modelloop serve` shared by the modules that do not change its registry: 2 workers,
    bearer-token auth, nan_policy=reject, small limits, events to the recording sidecar."""
    env = {
        "MODELLOOP_SERVING_API_KEY": KEY,
        "MODELLOOP_SERVING_NAN_POLICY": "reject",
        "MODELLOOP_SERVING_SIDECAR_URL": sidecar.url,
        "MODELLOOP_SERVING_EVENT_FLUSH_INTERVAL_S": "0.1",
        "MODELLOOP_SERVING_MAX_ROWS_PER_REQUEST": "500",
        "MODELLOOP_SERVING_MAX_BODY_BYTES": "200000",
        "MODELLOOP_SERVING_CHUNK_ROWS": "1000",
        "MODELLOOP_SERVING_SYNC_BATCH_MAX_ROWS": "2000",
    }
    srv = start_server(main_home, tmp_path_factory.mktemp("log") / "server.log", env, "--workers", "2")
    _servers.append(srv)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="package")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


_servers: list[Server] = []


# -- load while something changes ----------------------------------------------------------------
class Hammer:
    """Client threads sending /predict without pause; every response is recorded (the version
    of each answer, in order, or why it failed). ``instances(n)`` is the body's rows of a
    thread's n-th request; with ``ids``, each request has its own X-Request-ID."""

    def __init__(self, url: str, threads: int = 4, *, ids: bool = False,
                 instances: Callable[[int], list[Any]] = lambda n: [[1.5] * 20] * 2) -> None:
        self.url = url
        self.ids = ids
        self.instances = instances
        self.stop = threading.Event()
        self.versions: list[int] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def _run(self, thread: int) -> None:
        n = 0
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop.is_set():
                n += 1
                headers = {"X-Request-ID": f"load-{thread}-{n}"} if self.ids else {}
                try:
                    resp = client.post("/predict", json={"instances": self.instances(n)}, headers=headers)
                    ok = resp.status_code == 200
                    detail = "" if ok else f"{resp.status_code} {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, detail = False, repr(exc)
                with self._lock:
                    if ok:
                        self.versions.append(resp.json()["version"])
                    else:
                        self.failures.append(detail)

    def __enter__(self) -> Hammer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(15)

    def count(self) -> int:
        with self._lock:
            return len(self.versions) + len(self.failures)
