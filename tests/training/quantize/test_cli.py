"""`modelloop quantize` end to end: registered, printed as JSON, bad input in one line with exit
2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelloop.cli import app
from modelloop.registry import ModelVersion, Registry
from tests.training.quantize._support import Quantized
from training.settings import TrainingSettings

pytestmark = pytest.mark.slow


# -- the command -------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_quantizes_registers_and_prints_json(cancer: ModelVersion, settings: TrainingSettings) -> None:
    registry = Registry(settings.registry_dir)
    before = {m.version for m in registry.versions("cancer")}
    result = runner.invoke(app, ["quantize", "cancer", "--version", "1", "--method", "dynamic",
                                 "--promote", "--json"], env={"MODELLOOP_HOME": str(settings.home)})
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)  # stdout holds only the JSON; the table is on stderr
    assert out["version"] not in before and out["source_version"] == 1 and out["promoted"]
    assert out["quantization"]["method"] == "dynamic" and out["quantization"]["promotable"]
    assert Path(out["onnx_path"]) == registry.get("cancer", out["version"]).onnx_path.resolve()
    assert "rows/s, batch 256" in result.stderr and f"int8 v{out['version']}" in result.stderr
    assert registry.aliases("cancer")["production"] == out["version"]
    shown = runner.invoke(app, ["models", "show", "cancer"], env={"MODELLOOP_HOME": str(settings.home)})
    assert "int8:      dynamic from v1" in shown.stdout and "int8 vs fp32 v1" in shown.stdout
    registry.promote("cancer", cancer.version)  # as it was, for the other tests


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # no such model
        (["nope"], "error: model 'nope' is not registered under "),
        # no such version
        (["cancer", "--version", "99"], "error: model 'cancer' has no version 99\n"),
        # no such method
        (["cancer", "--method", "int4"], "'int4' is not one of"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str], message: str, cancer: ModelVersion,
                                              settings: TrainingSettings) -> None:
    result = runner.invoke(app, ["quantize", *args], env={"MODELLOOP_HOME": str(settings.home)})
    assert result.exit_code == 2
    assert message in result.stderr and result.stdout == ""


def test_cli_refuses_an_int8_version_with_exit_2(mlp_dynamic: Quantized, settings: TrainingSettings) -> None:
    v = mlp_dynamic.int8.version
    result = runner.invoke(app, ["quantize", "cancer", "--version", str(v)],
                           env={"MODELLOOP_HOME": str(settings.home)})
    assert result.exit_code == 2
    assert result.stderr.endswith(f"error: cancer v{v} is an int8 quantization already (of v1); "
                                  "quantize the fp32 version\n")
