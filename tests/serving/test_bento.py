"""`bentoml build` packages the service offline, and the built Bento serves (with the fast path
off, so this also covers our routes mounted inside BentoML's app and middleware)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serving.conftest import FEATURES, MODEL, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BENTOML = str(Path(sys.executable).with_name("bentoml"))


def test_bentoml_build_then_serve_the_bento(main_home: Path, tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "MODELLOOP_HOME": str(main_home)}
    built = subprocess.run([BENTOML, "build", str(ROOT), "--output", "tag"], env=env, capture_output=True,
                           text=True, timeout=180)
    assert built.returncode == 0, built.stdout + built.stderr
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = tmp_path / "bentoml" / "bentos" / name / version
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["service"] == "serving.service:ModelService"
    assert (bento / "src" / "serving" / "service.py").exists()
    assert (bento / "src" / "modelloop" / "registry.py").exists()
    assert not (bento / "src" / "training").exists() and not (bento / "src" / "tests").exists()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime" in requirements and "torch" not in requirements

    port = free_port()
    log = tmp_path / "bento.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([BENTOML, "serve", tag, "--port", str(port), "--host", "127.0.0.1"],
                                env={**env, "MODELLOOP_SERVING_FAST_PATH": "false"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 90, "the Bento to serve", interval=0.2)
        resp = httpx.post(f"{url}/predict", json={"instances": [dict.fromkeys(FEATURES, 0.5)]})
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == MODEL
        assert httpx.post(f"{url}/predict", json={"instances": [[1.0]]}).json()["code"] == "wrong_shape"
        # with the fast path off our routes pass through BentoML's middleware: its metrics count them
        metrics = httpx.get(f"{url}/metrics").text
        assert any(line.startswith("bentoml_service_request_total{") and 'endpoint="/predict"' in line
                   for line in metrics.splitlines())
    except AssertionError:
        print(log.read_text())
        raise
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
