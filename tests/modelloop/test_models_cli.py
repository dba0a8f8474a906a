"""`modelloop models`: broken versions are refused, or listed as broken, in one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelloop.cli import app
from modelloop.registry import Registry
from tests.modelloop.onnx_graphs import tiny

runner = CliRunner()
NAN = "output 'probabilities' is not finite (NaN or infinity) in 64 of 64 reference rows, first row 0"


@pytest.fixture
def reg(home: Path) -> Registry:
    """v1 in production; v2 outputs NaN (a valid graph whose scale is zero); v3 is not ONNX."""
    reg = Registry(home / "registry")
    tiny().register(reg)
    reg.promote("m", 1)
    tiny(scale=0.0).register(reg)
    reg.register(tiny().metadata, b"\x08\x07 not an onnx model", reference=tiny().reference)
    return reg


def _models(*args: str) -> tuple[int, list[str]]:
    result = runner.invoke(app, ["models", *args])
    return result.exit_code, result.output.splitlines()


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_promote_refuses_nan_outputs_force_or_not(reg: Registry, force: list[str]) -> None:
    code, lines = _models("promote", "m", "2", *force)
    assert (code, lines) == (1, [f"error: not promoted: m v2 is broken: {reg.get('m', 2).onnx_path}: {NAN}"])
    assert reg.aliases("m") == {"production": 1}


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_promote_refuses_a_file_onnx_runtime_cannot_load(reg: Registry, force: list[str]) -> None:
    code, lines = _models("promote", "m", "3", *force)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith(f"error: not promoted: m v3 is broken: {reg.get('m', 3).onnx_path}: "
                               "ONNX Runtime cannot load it: ")
    assert reg.aliases("m") == {"production": 1}


def test_rollback_refuses_a_broken_previous_version(reg: Registry) -> None:
    (reg.root / "m" / "aliases.json").write_text(json.dumps({"production": 1, "previous": 2}))
    code, lines = _models("rollback", "m")
    assert (code, lines) == (1, [f"error: not rolled back: m v2 is broken: {reg.get('m', 2).onnx_path}: {NAN}"])
    assert reg.aliases("m") == {"production": 1, "previous": 2}


def test_rollback_away_from_a_broken_production_says_there_is_no_previous(reg: Registry) -> None:
    (reg.root / "m" / "aliases.json").write_text(json.dumps({"production": 2, "previous": 1}))
    code, lines = _models("rollback", "m")
    assert (code, lines) == (0, ["m: rolled back, production -> v1 (no previous version: the one "
                                 "replaced failed its check)"])


def test_a_good_version_is_promoted(reg: Registry) -> None:
    tiny(seed=1).register(reg)
    assert _models("promote", "m", "4") == (0, ["m: production -> v4 (previous v1)"])


def test_corrupt_metadata_is_listed_as_broken_and_refused_in_one_line(reg: Registry) -> None:
    file = reg.root / "m" / "versions" / "2" / "metadata.json"
    file.write_text('{"name": "m", "task": "classification"')
    why = (f"m v2 is broken: {file}: not valid metadata: Invalid JSON: EOF while parsing an object "
           "at line 1 column 38")
    code, lines = _models("list", "--json")
    rows = json.loads("\n".join(lines))
    assert code == 0 and [r["version"] for r in rows] == [1, 2, 3]
    assert rows[1] == {"name": "m", "version": 2, "aliases": [], "error": why}
    assert rows[0]["aliases"] == ["production"] and "error" not in rows[0]
    code, lines = _models("list")
    assert code == 0 and lines[-1] == f"broken: {why}"
    assert any(" 2 " in line and "broken" in line for line in lines[:-1])
    for args in (["promote", "m", "2"], ["show", "m", "2"]):
        code, lines = _models(*args)
        assert code == 1 and lines[0].endswith(why) and len(lines) == 1, (args, lines)
