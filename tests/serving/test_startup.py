"""A server whose `production` is broken says which file and why in one line and exits non-zero:
at start, and when a worker is respawned after the alias was moved behind the registry's back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from modelloop.registry import Registry, atomic_write_bytes
from tests.serving.conftest import (
    MODEL,
    MODELLOOP,
    free_port,
    start_server,
    stop_server,
    wait_until,
)
from tests.serving.onnx_models import register_mlp

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NAN = "output 'probabilities' is not finite (NaN or infinity) in 200 of 200 reference rows, first row 0"


def _home_with_broken_version(home: Path) -> tuple[Registry, int]:
    """v1 serves; v2 is a valid graph whose preprocessing divides by zero (NaN outputs)."""
    registry = Registry(home / "registry")
    register_mlp(registry, MODEL, seed=0)
    broken = register_mlp(registry, MODEL, seed=0, promote=False, zero_scale=True)
    return registry, broken.version


def _point_production_at(registry: Registry, version: int) -> None:
    """What `modelloop models promote` refuses to do, done by hand."""
    atomic_write_bytes(registry.root / MODEL / "aliases.json",
                       json.dumps({"production": version, "previous": 1}).encode())


def test_serve_with_a_broken_production_exits_with_one_line(tmp_path: Path) -> None:
    registry, broken = _home_with_broken_version(tmp_path / "home")
    _point_production_at(registry, broken)
    env = {**os.environ, "MODELLOOP_HOME": str(tmp_path / "home"),
           "BENTOML_HOME": str(tmp_path / "home" / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.Popen([MODELLOOP, "serve", "--port", str(free_port()), "--host", "127.0.0.1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # it served: the check did not stop it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 1, text
    assert text.splitlines() == [
        f"error: {MODEL} v{broken} is broken: {registry.get(MODEL, broken).onnx_path}: {NAN}"]


def test_a_respawned_worker_that_cannot_serve_stops_the_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry, broken = _home_with_broken_version(tmp_path / "home")
    monkeypatch.delenv("BENTOML_CONTAINERIZED", raising=False)  # BentoML respawns workers then
    server = start_server(tmp_path / "home", tmp_path / "server.log",
                          {"MODELLOOP_SERVING_ALIAS_POLL_INTERVAL_S": "0.1"}, "--workers", "1")
    try:
        _point_production_at(registry, broken)
        wait_until(lambda: server.metric("modelloop_serving_reloads_total", model=MODEL,
                                         result="failure") == 1, 30, "the worker to refuse v2")
        (worker,) = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                     if "_bentoml_impl.worker.service" in " ".join(p.cmdline())]
        worker.kill()  # the arbiter respawns it, and the new worker loads production: v2
        server.proc.wait(120)
    finally:
        stop_server(server)
    log = server.log_text()
    assert server.proc.returncode == 1, log
    why = f"{MODEL} v{broken} is broken: {registry.get(MODEL, broken).onnx_path}: {NAN}"
    assert log.splitlines()[-1] == f"error: {why}"
    assert f"{why}; stopping the server" in log
    assert "Traceback" not in log and "Application startup failed" not in log


@pytest.mark.parametrize(
    ("args", "key", "warned"),
    [
        # the default host, 0.0.0.0, and no key: anyone who reaches the host may predict
        ([], None, True),
        # a key guards the routes
        ([], "k" * 20, False),
        # loopback only
        (["--host", "127.0.0.1"], None, False),
    ],
)
def test_serving_beyond_loopback_without_a_key_is_warned(tmp_path: Path, args: list[str],
                                                         key: str | None, warned: bool) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MODELLOOP_SERVING_API_KEY"}
    env["MODELLOOP_HOME"] = str(tmp_path)
    if key is not None:
        env["MODELLOOP_SERVING_API_KEY"] = key
    # an empty registry stops it after the settings are read, before it listens
    result = subprocess.run([MODELLOOP, "serve", "--port", str(port), *args], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    warnings = [line.partition(" WARNING ")[2] for line in result.stderr.splitlines()
                if "MODELLOOP_SERVING_API_KEY" in line]
    assert warnings == ([
        f"serving.cli: no MODELLOOP_SERVING_API_KEY: the prediction, batch and admin routes are "
        f"open to anyone who reaches 0.0.0.0:{port}; set it unless a gateway in front "
        f"authenticates (or listen on 127.0.0.1 with --host)"] if warned else []), result.stderr


def test_serve_help_names_its_keys() -> None:
    result = subprocess.run([MODELLOOP, "serve", "--help"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "COLUMNS": "100"})
    text = " ".join(result.stdout.split())
    assert "MODELLOOP_SERVING_API_KEY is the bearer key clients send" in text
    assert ("MODELLOOP_SERVING_SIDECAR_KEY is sent with the prediction events to the sidecar (its "
            "MODELLOOP_MONITOR_INGEST_KEY)") in text
