"""Fixtures of the deployment tests: a registry with a really trained model, made once through
the image's `bootstrap` entrypoint role (the same path docker-compose takes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.deploy._support import entrypoint_env, run_entrypoint

MODEL = "demo"
# small and quick: these tests check the deployment, not the model
TRAIN_ARGS = ["--dataset", "synthetic", "--rows", "2000", "--epochs", "5", "--seed", "0",
              "--no-progress"]


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MODELLOOP_HOME whose registry holds `demo` v1 as production (read-only: copy it)."""
    run_dir = tmp_path_factory.mktemp("bootstrap")
    home = run_dir / "home"
    result = run_entrypoint(["bootstrap", MODEL, *TRAIN_ARGS], entrypoint_env(run_dir, home),
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return home


@pytest.fixture
def model_home(trained_home: Path, tmp_path: Path) -> Path:
    """A private copy of the trained home for one test."""
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    return home
