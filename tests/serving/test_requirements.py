"""pyproject.toml is the one list of dependencies: each part's extra covers what the part
imports, and the Bento's requirements file is generated from it, never edited by hand."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"modelloop", "training", "serving", "monitoring"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(d for e in extras for d in project["optional-dependencies"][e])]
    return {canonical(Requirement(s).name) for s in specs}


def imported_distributions(package: str) -> dict[str, str]:
    """Third-party distribution -> a file of ``package`` that imports it (top-level or lazily)."""
    dists = packages_distributions()
    found: dict[str, str] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in FIRST_PARTY or top in sys.stdlib_module_names:
                    continue
                assert top in dists, f"{path.relative_to(ROOT)} imports {top!r}, which no installed distribution provides"
                for dist in dists[top]:
                    found.setdefault(canonical(dist), str(path.relative_to(ROOT)))
    return found


def test_the_bento_requirements_are_generated_from_pyproject() -> None:
    check = subprocess.run([sys.executable, "scripts/serving_requirements.py", "--check"], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(("package", "extras"), [
    ("modelloop", ()),             # the core: the base dependencies alone
    ("serving", ("serving",)),
    ("monitoring", ("monitoring",)),
    ("training", ("training",)),
])
def test_each_part_declares_what_it_imports(package: str, extras: tuple[str, ...]) -> None:
    missing = {d: f for d, f in imported_distributions(package).items() if d not in declared(*extras)}
    assert not missing, f"imported but not in pyproject's {extras or 'base'}: {missing}"


def test_serving_and_the_core_never_need_torch() -> None:
    assert "torch" not in declared("serving")
    assert "torch" not in declared("monitoring")


@pytest.mark.parametrize("command", ["serve", "batch", "monitor", "models"])
def test_the_commands_of_serving_monitoring_and_the_core_load_no_torch(command: str) -> None:
    """What `modelloop <command> --help` imports (the CLI loads the command's module): neither
    torch nor the training package, so the serving and monitoring extras are enough for them."""
    code = ("import sys; from modelloop.cli import LazyGroup; "
            f"LazyGroup.get_command(None, None, {command!r}); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'training'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
