"""Clean virtual environments for the packaging tests: made with ``python -m venv`` (never with the
system's site-packages) and filled by pip from the machine's configured index, so they hold only
what the requirements given pull in. pip's wheel cache keeps a second run at about half a minute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

INSTALL_TIMEOUT_S = 600


def fresh_venv(path: Path, *pip_args: str) -> Path:
    """A new venv at ``path`` with ``pip install <pip_args>`` done; returns its ``bin`` folder."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    bin_ = path / "bin"
    done = subprocess.run([str(bin_ / "python"), "-m", "pip", "install", "-q", *pip_args],
                          capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    assert done.returncode == 0, f"pip install {' '.join(pip_args)} failed:\n{done.stdout}{done.stderr}"
    return bin_


def importable(bin_: Path, module: str) -> bool:
    """Whether the venv's python imports ``module`` (run from the venv's folder, so the
    repository's source is not on its path)."""
    return subprocess.run([str(bin_ / "python"), "-c", f"import {module}"], capture_output=True,
                          cwd=bin_.parent, timeout=120).returncode == 0
