"""`pip install modelloop[serving]` is enough to serve: in a clean venv holding only that extra
(no torch, no Evidently), `modelloop serve` serves a registered ONNX model and explains it."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import FEATURES, MODEL, start_server, stop_server
from tests.serving.venvs import fresh_venv, importable

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_the_serving_extra_serves_without_torch(main_home: Path, tmp_path: Path) -> None:
    # installed from a copy: building in the repository would leave a build/ folder behind
    src = tmp_path / "src"
    for package in ("modelloop", "serving", "monitoring", "training"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    bin_ = fresh_venv(tmp_path / "venv", f"{src}[serving]")
    assert not importable(bin_, "torch")
    assert not importable(bin_, "evidently")

    server = start_server(main_home, tmp_path / "serve.log", {}, "--workers", "1",
                          modelloop=str(bin_ / "modelloop"))
    try:
        resp = httpx.post(f"{server.url}/predict", json={"instances": [dict.fromkeys(FEATURES, 0.5)]},
                          timeout=10)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == MODEL
        # explanations too: shap comes with the extra (its process compiles its kernels first)
        resp = httpx.post(f"{server.url}/explain", json={"instances": [dict.fromkeys(FEATURES, 0.5)]},
                          timeout=180)
        assert resp.status_code == 200, resp.text
        assert resp.json()["explanations"][0]["additivity_error"] <= 1e-4
    except AssertionError:
        print(server.log_text())
        raise
    finally:
        stop_server(server)
