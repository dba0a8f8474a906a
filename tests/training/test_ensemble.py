"""Ensembles: three real digits MLPs trained here (same split, different widths), combined into one
ONNX graph by ``modelloop ensemble``, checked against the members run separately, measured on
their common test split, gated by the margin, refused for members that do not fit, taken by
``modelloop retrain``, and served by a real ``modelloop serve``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from modelloop.cli import app
from modelloop.registry import ModelVersion, Registry
from modelloop.schemas import PROBABILITIES
from tests.serving.conftest import MODELLOOP, start_server, stop_server
from tests.training.conftest import quiet_settings
from training.config import TrainingConfig
from training.data import load_data, split_dataset
from training.ensemble import combine
from training.pipeline import TrainOptions, train_and_register
from training.settings import TrainingSettings

pytestmark = pytest.mark.slow
runner = CliRunner()
# three weak (3 epochs), differently shaped members: where an ensemble helps
WIDTHS = ([64, 32], [128], [96, 48])


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> TrainingSettings:
    return quiet_settings(tmp_path_factory.mktemp("ensemble-home"))


def _train(settings: TrainingSettings, dataset: str = "digits", **overrides: object) -> ModelVersion:
    registry = Registry(settings.registry_dir)
    config = TrainingConfig.from_settings(settings, **overrides)
    meta = train_and_register(dataset, name="digits", registry=registry, promote=False,
                              options=TrainOptions(config=config, settings=settings))
    return registry.get("digits", meta.version)


@pytest.fixture(scope="module")
def members(settings: TrainingSettings) -> list[ModelVersion]:
    return [_train(settings, epochs=3, model={"hidden": h}) for h in WIDTHS]


def _env(settings: TrainingSettings, **extra: str) -> dict[str, str]:
    return {"MODELLOOP_HOME": str(settings.home), **extra}


def _ensemble(settings: TrainingSettings, members: list[ModelVersion], *args: str,
              **env: str) -> dict[str, object]:
    result = runner.invoke(app, ["ensemble", "digits", "--members",
                                 ",".join(str(m.version) for m in members), *args, "--json"],
                           env=_env(settings, **env))
    assert result.exit_code == 0, result.output
    out: dict[str, object] = json.loads(result.stdout)
    return out


def _test_rows(version: ModelVersion) -> tuple[np.ndarray, np.ndarray]:
    config = TrainingConfig.model_validate(version.metadata.config)
    ds = load_data("digits", "target", rows=None, seed=config.seed, clean=config.clean)
    split = split_dataset(ds, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                          seed=config.seed)
    return ds.features[split.test], ds.target[split.test]


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run([PROBABILITIES], {"input": x})[0]
    return out


@pytest.mark.parametrize("method", ["mean", "vote", "weighted"])
def test_the_ensemble_is_one_graph_at_parity_with_its_members_and_ties_or_beats_the_best(
        settings: TrainingSettings, members: list[ModelVersion], method: str) -> None:
    out = _ensemble(settings, members, "--method", method)
    report = out["ensemble"]
    assert isinstance(report, dict)
    registry = Registry(settings.registry_dir)
    version = registry.get("digits", int(out["version"]))  # type: ignore[call-overload]
    meta = version.metadata
    print(method, report["member_metrics"], "->", report["ensemble_metric"])

    # one graph, the conventions' input and output, members in its lineage
    assert meta.architecture == "ensemble" and meta.parent_version == report["best_member"]
    assert meta.lineage["ensemble"]["members"] == [m.version for m in members]
    assert meta.parity is not None and meta.parity.passed
    assert meta.parity.max_abs_diff <= settings.parity_tolerance
    # the members' registered test accuracy is what the ensemble is compared with
    assert report["member_metrics"] == {str(m.version): pytest.approx(m.metadata.metrics["accuracy"])
                                        for m in members}
    assert report["ensemble_metric"] >= max(m.metadata.metrics["accuracy"] for m in members)
    assert report["promotable"] is True

    # the stored file, run here, is the members run separately and combined
    x, _ = _test_rows(members[0])
    expected = combine([_run(m.onnx_path, x) for m in members], method, report["weights"])
    np.testing.assert_allclose(_run(version.onnx_path, x), expected, rtol=0, atol=1e-5)


def test_the_margin_gates_promotion(settings: TrainingSettings, members: list[ModelVersion]) -> None:
    # an ensemble must beat its best member by 50 points here: never
    out = _ensemble(settings, members, "--promote", MODELLOOP_TRAINING_ENSEMBLE_MARGIN="0.5")
    assert out["promoted"] is False
    assert str(out["reason"]).startswith("not promoted: accuracy ")
    result = runner.invoke(app, ["models", "promote", "digits", str(out["version"])],
                           env=_env(settings))
    assert result.exit_code != 0
    assert "not promoted: it is an ensemble whose accuracy is" in result.output
    shown = runner.invoke(app, ["models", "show", "digits", str(out["version"])], env=_env(settings))
    assert shown.exit_code == 0, shown.output
    members_text = ", ".join(f"v{m.version}" for m in members)
    assert f"ensemble:  mean of {members_text}, accuracy " in shown.output
    assert "not promotable" in shown.output and "vs its members run separately" in shown.output


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # another dataset registered under the same name: other features
        ("features", "has other features than digits v1; members share features, classes and data"),
        # another split seed: a member would have trained on the ensemble's test rows
        ("split", "was split otherwise"),
    ],
)
def test_members_that_do_not_fit_are_refused_in_one_line(
        settings: TrainingSettings, members: list[ModelVersion], make: str, message: str) -> None:
    odd = (_train(settings, "breast_cancer", epochs=1) if make == "features"
           else _train(settings, epochs=1, seed=7))
    result = runner.invoke(app, ["ensemble", "digits", "--members",
                                 f"{members[0].version},{odd.version}"], env=_env(settings))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("building")  # the progress line, then the error
    assert lines[1].startswith(f"error: digits v{odd.version} ") and message in lines[1]


def test_the_promoted_ensemble_serves_and_retrain_takes_it(
        settings: TrainingSettings, members: list[ModelVersion], tmp_path: Path) -> None:
    out = _ensemble(settings, members, "--promote")
    assert out["promoted"] is True
    registry = Registry(settings.registry_dir)
    version = registry.get("digits", "production")
    assert version.version == out["version"]
    meta = version.metadata

    x, _ = _test_rows(members[0])
    x = x[:32]
    server = start_server(settings.home, tmp_path / "serve.log", {}, "--workers", "1")
    try:
        records = [dict(zip(meta.feature_names, map(float, r), strict=True)) for r in x]
        resp = httpx.post(f"{server.url}/predict", json={"instances": records}, timeout=30)
        assert resp.status_code == 200, resp.text
        doc = resp.json()
    finally:
        stop_server(server)
    assert (doc["model"], doc["version"]) == ("digits", version.version)
    labels = meta.class_labels or []
    got = np.array([[p["probabilities"][c] for c in labels] for p in doc["predictions"]], np.float32)
    np.testing.assert_allclose(got, _run(version.onnx_path, x), rtol=0, atol=1e-6)

    done = subprocess.run([MODELLOOP, "retrain", "--name", "digits", "--sidecar-url",
                           "http://127.0.0.1:9"], env={**os.environ, **_env(settings)},
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    # retrain takes the ensemble (it retrains each member: test_retrain_ensemble.py) and asks
    # the sidecar for labelled rows, which is not there
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: cannot reach the sidecar at ")


def test_train_ensemble_trains_k_members_on_one_split_then_their_ensemble(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = runner.invoke(app, ["train", "--dataset", "digits", "--epochs", "3", "--ensemble", "3",
                                 "--promote", "--no-progress", "--json"],
                           env={"MODELLOOP_HOME": str(home)})
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    registry = Registry(home / "registry")
    meta = registry.get("digits", out["version"]).metadata
    report = meta.lineage["ensemble"]
    assert out["version"] == 4 and report["members"] == [1, 2, 3] and report["method"] == "mean"
    configs = [registry.get("digits", v).metadata.config for v in (1, 2, 3)]
    # one split (seed 0), three initialisations
    assert [(c["seed"], c["init_seed"]) for c in configs] == [(0, None), (0, 1), (0, 2)]
    assert len({registry.get("digits", v).onnx_path.read_bytes() for v in (1, 2, 3)}) == 3
    accuracies = [registry.get("digits", v).metadata.metrics["accuracy"] for v in (1, 2, 3)]
    print("train --ensemble 3:", accuracies, "->", report["ensemble_metric"])
    assert report["member_metrics"] == {str(v): pytest.approx(a)
                                        for v, a in zip((1, 2, 3), accuracies, strict=True)}
    # promoted exactly when it ties or beats the best member (the margin's default, 0.0)
    assert out["promoted"] is report["promotable"] is (report["ensemble_metric"] >= max(accuracies))
    assert registry.aliases("digits").get("production") == (4 if out["promoted"] else None)
