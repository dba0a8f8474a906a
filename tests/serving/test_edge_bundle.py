"""Edge bundles (``modelloop models export``): a model trained here, exported as ONNX and as ORT
format, run by the bundle's ``predict.py`` in a fresh virtual environment holding only
onnxruntime and numpy, and compared with a real ``modelloop serve``'s ``/predict``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from modelloop.cli import app
from modelloop.registry import Registry
from tests.serving.conftest import start_server, stop_server
from tests.serving.venvs import fresh_venv

pytestmark = pytest.mark.slow


def _train(home: Path) -> Any:
    from training.config import TrainingConfig
    from training.pipeline import TrainOptions, train_and_register
    from training.settings import TrainingSettings

    settings = TrainingSettings(home=home, progress=False)
    config = TrainingConfig.from_settings(settings, epochs=5)
    registry = Registry(settings.registry_dir)
    meta = train_and_register("digits", name="digits", registry=registry, promote=True,
                              options=TrainOptions(config=config, settings=settings))
    return registry.get("digits", meta.version)


def _bare_env() -> dict[str, str]:
    """The environment without PYTHONPATH: the venv sees only what it installed."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _importable(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True,
                          cwd=python.parent.parent, env=_bare_env(), timeout=120).returncode == 0


def _run_bundle(python: Path, bundle: Path, rows: list[list[float | None]]) -> list[dict[str, Any]]:
    # from the bundle's folder, as a user would run it: the repository is not on its path
    done = subprocess.run([str(python), "predict.py"], input=json.dumps(rows), cwd=bundle,
                          env=_bare_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answers: list[dict[str, Any]] = json.loads(done.stdout)
    return answers


def _same_answers(edge: list[dict[str, Any]], served: list[dict[str, Any]]) -> None:
    assert len(edge) == len(served)
    for mine, theirs in zip(edge, served, strict=True):
        assert mine["prediction"] == theirs["prediction"]
        assert mine["label"] == theirs["label"]
        assert mine["probabilities"].keys() == theirs["probabilities"].keys()
        assert np.allclose(list(mine["probabilities"].values()),
                           list(theirs["probabilities"].values()), rtol=0, atol=1e-6)


def test_the_edge_bundle_answers_as_the_server_in_a_clean_environment(tmp_path: Path) -> None:
    home = tmp_path / "home"
    version = _train(home)
    meta = version.metadata
    runner, env = CliRunner(), {"MODELLOOP_HOME": str(home)}
    bundles = {fmt: tmp_path / f"bundle-{fmt}" for fmt in ("onnx", "ort")}
    for fmt, out in bundles.items():
        result = runner.invoke(app, ["models", "export", f"digits@{version.version}",
                                     "--format", fmt, "--out", str(out)], env=env)
        assert result.exit_code == 0, result.output

    # what each bundle holds
    assert sorted(p.name for p in bundles["onnx"].iterdir()) == [
        "model.onnx", "predict.py", "reference_stats.json", "requirements.txt", "schema.json"]
    assert sorted(p.name for p in bundles["ort"].iterdir()) == [
        "model.ort", "model.required_operators.config", "predict.py", "reference_stats.json",
        "requirements.txt", "schema.json"]
    assert (bundles["onnx"] / "model.onnx").read_bytes() == version.onnx_path.read_bytes()
    operators = (bundles["ort"] / "model.required_operators.config").read_text()
    assert "ai.onnx;" in operators and "Softmax" in operators
    schema = json.loads((bundles["ort"] / "schema.json").read_text())
    assert (schema["name"], schema["version"], schema["task"], schema["graph"]) == (
        "digits", version.version, "classification", "model.ort")
    assert schema["feature_names"] == meta.feature_names
    assert schema["class_labels"] == meta.class_labels
    assert schema["inputs"][0]["shape"] == [None, 64]
    stats = json.loads((bundles["onnx"] / "reference_stats.json").read_text())
    reference = version.reference()
    train_rows = reference[reference["_ml_split"] == "train"]
    assert stats["rows"] == len(train_rows)
    first = meta.feature_names[10]
    assert stats["features"][first]["mean"] == pytest.approx(float(train_rows[first].mean()))
    assert stats["features"][first]["max"] == float(train_rows[first].max())

    # a fresh venv with only the two packages the bundle needs
    venv = fresh_venv(tmp_path / "venv", "numpy", "onnxruntime")
    python = venv / "python"
    assert not _importable(python, "modelloop") and not _importable(python, "torch")
    assert _importable(python, "onnxruntime")

    rows: list[list[float | None]] = reference[meta.feature_names].head(40).to_numpy().tolist()
    rows[0][5] = None  # a missing value: imputed inside the graph, here and there
    server = start_server(home, tmp_path / "server.log", {})
    try:
        response = httpx.post(f"{server.url}/predict", json={"instances": rows}, timeout=30)
    finally:
        stop_server(server)
    assert response.status_code == 200, response.text
    served = response.json()
    assert served["version"] == version.version
    for out in bundles.values():
        _same_answers(_run_bundle(python, out, rows), served["predictions"])

    # the same through the Python API with rows as dicts by feature name
    as_dicts = [dict(zip(meta.feature_names, row, strict=True)) for row in rows[:3]]
    script = ("import json, sys; from predict import Predictor; "
              "print(json.dumps(Predictor('.').predict(json.load(sys.stdin))))")
    done = subprocess.run([str(python), "-c", script], input=json.dumps(as_dicts),
                          cwd=bundles["ort"], env=_bare_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    _same_answers(json.loads(done.stdout), served["predictions"][:3])


def test_export_refuses_a_folder_in_use_and_an_unknown_version(tmp_path: Path) -> None:
    home, out = tmp_path / "home", tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    env = {"MODELLOOP_HOME": str(home)}
    result = CliRunner().invoke(app, ["models", "export", "nothing", "--out", str(out)], env=env)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    _train(home)
    result = CliRunner().invoke(app, ["models", "export", "digits", "--out", str(out)], env=env)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {out} exists and is not an empty folder; choose a new one"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
