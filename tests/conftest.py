"""Shared fixtures: an isolated MODELLOOP_HOME per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh MODELLOOP_HOME for this test (also exported to child processes)."""
    root = tmp_path / "home"
    root.mkdir()
    monkeypatch.setenv("MODELLOOP_HOME", str(root))
    return root


# The sidecar's drift report computes each version's global importance in a child process
# (about 15 s of CPU); the tests that are not about it turn it off (tests/monitoring/
# test_importance.py turns it on), for time and so that no nice-10 child starves under a loaded
# run. The variable reaches the sidecars the tests start as processes too.
os.environ.setdefault("MODELLOOP_MONITOR_REPORT_IMPORTANCE", "false")
# The report's thread and the importance process run at nice 10 behind ingest; beside a second
# test process on two cores that left them a tenth of a core, and a report took minutes.
os.environ.setdefault("MODELLOOP_MONITOR_REPORT_NICE", "0")
# Serving's explanation process runs at nice 19 (it takes only what the workers leave): beside a
# second test process using both cores it would get almost no CPU, and the tests that wait for an
# explanation would wait for the other process's tests instead. The suite runs it at nice 0.
os.environ.setdefault("MODELLOOP_SERVING_EXPLAIN_NICE", "0")
