"""`modelloop retrain` on versions modelloop did not train: refused, exit 2, one line, before it
asks the sidecar for anything (the URL below answers nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelloop.registry import Registry
from tests.training import byo_nets
from tests.training.conftest import quiet_settings
from tests.training.test_byo import KWARGS, iris
from tests.training.test_byo_onnx import sklearn_iris
from training.byo import ExampleData, register_module, register_onnx

MODELLOOP = str(Path(sys.executable).with_name("modelloop"))


def _retrain(home: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([MODELLOOP, "retrain", "--name", "iris", "--sidecar-url",
                           "http://127.0.0.1:9"], env={**env, "MODELLOOP_HOME": str(home)},
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        # an ONNX file: no weights, no architecture
        ("onnx", "error: iris v1 cannot be retrained: it was registered from an ONNX file "
         "(modelloop models import): there are no weights or architecture to retrain"),
        # a module registered without its constructor arguments
        ("module", "error: iris v1 cannot be retrained: it was registered from a module without "
         "its constructor arguments"),
        # a module whose class the job cannot import (tests/ is not on its path)
        ("module+kwargs", "error: iris v1 cannot be retrained: architecture "
         "'tests.training.byo_nets:TinyClassifier' cannot be imported: ModuleNotFoundError"),
    ],
)
def test_retrain_refuses_what_it_cannot_rebuild(tmp_path: Path, source: str, message: str) -> None:
    settings = quiet_settings(tmp_path / "home")
    registry = Registry(settings.registry_dir)
    train, held = iris()
    data = ExampleData(train, holdout=held)
    if source == "onnx":
        register_onnx(sklearn_iris(tmp_path / "iris.onnx"), data, name="iris", registry=registry,
                      settings=settings, promote=True)
    else:
        register_module(byo_nets.TinyClassifier(**KWARGS), data, name="iris", preprocess="fit",
                        init_kwargs=KWARGS if source == "module+kwargs" else None,
                        registry=registry, settings=settings, promote=True)
    done = _retrain(settings.home, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
