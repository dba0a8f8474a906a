"""`bentoml build` packages the service offline, and the built Bento serves: from the development
venv (with the fast path off, so this also covers our routes mounted inside BentoML's app and
middleware), and from a clean venv holding only the Bento's own requirements (so a package the
service imports but the Bento does not list fails here, not in `bentoml containerize`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serving.conftest import FEATURES, MODEL, free_port, wait_until
from tests.serving.venvs import fresh_venv, importable

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BENTOML = str(Path(sys.executable).with_name("bentoml"))


@dataclass
class Bento:
    tag: str
    path: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def bento(main_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Bento:
    home = tmp_path_factory.mktemp("bentoml")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
           "MODELLOOP_HOME": str(main_home)}
    built = subprocess.run([BENTOML, "build", str(ROOT), "--output", "tag"], env=env, capture_output=True,
                           text=True, timeout=180)
    assert built.returncode == 0, built.stdout + built.stderr
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    return Bento(tag, home / "bentos" / name / version, env)


@contextlib.contextmanager
def serve(bento: Bento, bentoml: str, log: Path, env: dict[str, str], cwd: Path | None = None) -> Iterator[str]:
    """``bentoml serve`` the Bento for the ``with`` block; its URL once ready (its log is
    printed when the block fails)."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([bentoml, "serve", bento.tag, "--port", str(port), "--host", "127.0.0.1"],
                                env={**bento.env, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 90, "the Bento to serve", interval=0.2)
        yield url
    except AssertionError:
        print(log.read_text())
        raise
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_bentoml_build_then_serve_the_bento(bento: Bento, tmp_path: Path) -> None:
    info = yaml.safe_load((bento.path / "bento.yaml").read_text())
    assert info["service"] == "serving.service:ModelService"
    assert (bento.path / "src" / "serving" / "service.py").exists()
    assert (bento.path / "src" / "modelloop" / "registry.py").exists()
    assert not (bento.path / "src" / "training").exists() and not (bento.path / "src" / "tests").exists()

    with serve(bento, BENTOML, tmp_path / "bento.log", {"MODELLOOP_SERVING_FAST_PATH": "false"}) as url:
        resp = httpx.post(f"{url}/predict", json={"instances": [dict.fromkeys(FEATURES, 0.5)]})
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == MODEL
        assert httpx.post(f"{url}/predict", json={"instances": [[1.0]]}).json()["code"] == "wrong_shape"
        # with the fast path off our routes pass through BentoML's middleware: its metrics count them
        metrics = httpx.get(f"{url}/metrics").text
        assert any(line.startswith("bentoml_service_request_total{") and 'endpoint="/predict"' in line
                   for line in metrics.splitlines())


def test_the_bento_serves_from_a_venv_of_its_own_requirements(bento: Bento, tmp_path: Path) -> None:
    requirements = bento.path / "env" / "python" / "requirements.txt"
    ours = (ROOT / "serving" / "requirements.txt").read_text()
    text = requirements.read_text()  # ours, then BentoML pins its own version
    assert text.startswith(ours) and text[len(ours):].strip().startswith("bentoml==")
    bin_ = fresh_venv(tmp_path / "venv", "-r", str(requirements))
    assert not importable(bin_, "torch")
    assert not importable(bin_, "modelloop")  # the Bento's src/ is the only copy of the code

    # run from an empty folder with the venv first on PATH: nothing of the repo or the dev venv
    with serve(bento, str(bin_ / "bentoml"), tmp_path / "bento.log",
               {"PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(bin_.parent)},
               cwd=tmp_path) as url:
        resp = httpx.post(f"{url}/predict", json={"instances": [dict.fromkeys(FEATURES, 0.5)]})
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == MODEL
