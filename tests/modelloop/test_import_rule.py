"""The import rule of DESIGN.md, enforced with import-linter: checked on the real tree, and
shown to fail on a tree that breaks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--config", str(cwd / "pyproject.toml")],
        cwd=cwd, capture_output=True, text=True, env={"PYTHONPATH": str(cwd), "PATH": ""},
    )


def test_import_rule_holds_on_the_project() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        # serving reaching into training
        ("serving/bad.py", "import training\n", "independent of each other"),
        # monitoring importing torch
        ("monitoring/bad.py", "import torch\n", "never import torch"),
        # the core importing a package (only cli.py may)
        ("modelloop/bad.py", "import monitoring\n", "shared core imports none"),
    ],
)
def test_import_rule_fails_when_broken(tmp_path: Path, module: str, source: str, broken: str) -> None:
    for pkg in ("modelloop", "training", "serving", "monitoring"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / module).write_text(source)
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and broken in result.stdout
