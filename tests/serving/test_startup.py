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
