"""Shared fixtures: an isolated MODELLOOP_HOME per test."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh MODELLOOP_HOME for this test (also exported to child processes)."""
    root = tmp_path / "home"
    root.mkdir()
    monkeypatch.setenv("MODELLOOP_HOME", str(root))
    return root
