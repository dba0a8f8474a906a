"""``modelloop train`` as a user runs it: end to end in a subprocess, errors, user files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelloop.cli import app
from modelloop.registry import Registry
from modelloop.synthetic import SyntheticTask

MODELLOOP = str(Path(sys.executable).with_name("modelloop"))


def _run(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODELLOOP_HOME": str(home), "COLUMNS": "120"}
    return subprocess.run([MODELLOOP, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_train_then_show_end_to_end(tmp_path: Path) -> None:
    trained = _run(["train", "--dataset", "wine", "--name", "wine-cli", "--promote", "--epochs", "60",
                    "--json"], tmp_path)
    assert trained.returncode == 0, trained.stderr
    out = json.loads(trained.stdout)  # stdout holds only the JSON; table and progress on stderr
    assert (out["name"], out["version"], out["promoted"]) == ("wine-cli", 1, True)
    assert out["metrics"]["accuracy"] >= 0.85 and out["parity"]["passed"]
    assert "accuracy" in trained.stderr and "training" in trained.stderr

    shown = _run(["models", "show", "wine-cli", "--json"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    meta = json.loads(shown.stdout)
    assert meta["onnx_path"] == out["onnx_path"] and Path(meta["onnx_path"]).is_file()
    assert Path(meta["onnx_path"]).is_relative_to(tmp_path)
    assert meta["metrics"] == out["metrics"] and meta["aliases"] == ["production"]
    assert meta["config"]["epochs"] == 60 and meta["lineage"]["trigger"] == "cli"


@pytest.mark.slow
def test_bad_csv_is_one_line_on_stderr_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,color,target\n1,2,x\n2,red,y\n")
    result = _run(["train", "--data", str(bad), "--target", "target"], tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"error: {bad}: column 'color' is not numeric (value 'red' in row 2)\n"
    assert result.stdout == ""


runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # neither source
        (["--epochs", "3"], "give exactly one of --dataset NAME or --data FILE"),
        # both sources
        (["--dataset", "wine", "--data", "x.csv"], "give exactly one of --dataset NAME or --data FILE"),
        # a file without its target column
        (["--data", "x.csv"], "--data needs --target COLUMN"),
        # built-ins know their target
        (["--dataset", "wine", "--target", "y"], "--target is for --data"),
        # architectures come from the registry
        (["--dataset", "wine", "--model", "transformer"], "unknown architecture 'transformer'"),
        # widths are integers
        (["--dataset", "wine", "--hidden", "64,wide"], "not a comma-separated list of widths"),
        # a file is used whole
        (["--data", "x.csv", "--target", "y", "--rows", "100"], "--rows is for --dataset"),
        # built-ins know their task too
        (["--dataset", "diabetes", "--task", "classification"], "--task is for --data"),
        # not a built-in
        (["--dataset", "iris"], "'iris' is not one of"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str, home: Path) -> None:
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())
    assert not (home / "registry").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # the config's constraints, named
        (["--learning-rate", "0"], "invalid option learning_rate: Input should be greater than 0"),
        # the architecture's parameters, named
        (["--hidden", "64,0"], "invalid option hidden.1: Input should be greater than 0"),
    ],
)
def test_invalid_hyperparameters_are_one_line(args: list[str], message: str, home: Path) -> None:
    result = runner.invoke(app, ["train", "--dataset", "wine", *args])
    assert result.exit_code == 2
    assert result.stderr == f"error: {message}\n"


def test_invalid_model_name_fails_before_training(home: Path) -> None:
    result = runner.invoke(app, ["train", "--dataset", "wine", "--name", "no spaces"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: invalid model name 'no spaces'")


@pytest.mark.slow
def test_train_on_a_user_csv_names_the_model_after_the_file(tmp_path: Path, home: Path) -> None:
    frame = SyntheticTask(seed=3).sample(400, missing=0.05)
    frame["target"] = frame["target"].map({0: "stay", 1: "churn"})
    path = tmp_path / "churn data.csv"
    frame.to_csv(path, index=False)
    result = runner.invoke(app, ["train", "--data", str(path), "--target", "target", "--epochs",
                                 "5", "--no-progress", "--seed", "1"])
    assert result.exit_code == 0, result.stderr
    meta = Registry(home / "registry").get("churn_data", 1).metadata
    assert meta.class_labels == ["churn", "stay"] and meta.dataset == str(path)
    assert meta.config["seed"] == 1 and meta.config["epochs"] == 5
    assert "registered churn_data v1" in result.stdout


def test_retrain_help_names_the_key_it_sends() -> None:
    result = runner.invoke(app, ["retrain", "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    assert ("the job sends MODELLOOP_TRAINING_SIDECAR_KEY (the sidecar's MODELLOOP_MONITOR_API_KEY) "
            "as its bearer key") in " ".join(result.output.split())
