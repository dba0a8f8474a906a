"""The sidecar's role keys outside a running sidecar: what a real `modelloop monitor` refuses at
start-up, and what its client commands need (the one key they send, nothing else)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from modelloop.synthetic import SyntheticTask
from tests.monitoring.helpers import TrainedModel, free_port, sidecar_process
from tests.monitoring.test_app import events_for
from tests.monitoring.test_trust import ADMIN, ALERTS, FEEDBACK, INGEST

pytestmark = [pytest.mark.integration]

MODELLOOP = str(Path(sys.executable).with_name("modelloop"))
KEYS = {"MODELLOOP_MONITOR_API_KEY": ADMIN, "MODELLOOP_MONITOR_INGEST_KEY": INGEST,
        "MODELLOOP_MONITOR_FEEDBACK_KEY": FEEDBACK, "MODELLOOP_MONITOR_ALERTMANAGER_KEY": ALERTS}


def modelloop(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``modelloop ARGS`` with no MODELLOOP_MONITOR_* setting but ``env``'s."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MODELLOOP_MONITOR_")}
    return subprocess.run([MODELLOOP, *args], capture_output=True, text=True, timeout=60,
                          env={**clean, "MODELLOOP_HOME": str(home), **env})


@pytest.mark.parametrize(
    ("env", "error"),
    [
        # a label provider's key that is also the admin key: it could retrain and read features
        ({**KEYS, "MODELLOOP_MONITOR_FEEDBACK_KEY": ADMIN},
         "error: settings: MODELLOOP_MONITOR_FEEDBACK_KEY is the same key as "
         "MODELLOOP_MONITOR_API_KEY; give each role its own key (e.g. `openssl rand -hex 32`)"),
        # two role keys alike: the key would open both routes
        ({**KEYS, "MODELLOOP_MONITOR_ALERTMANAGER_KEY": INGEST},
         "error: settings: MODELLOOP_MONITOR_ALERTMANAGER_KEY is the same key as "
         "MODELLOOP_MONITOR_INGEST_KEY; give each role its own key (e.g. `openssl rand -hex 32`)"),
    ],
)
def test_one_key_for_two_roles_stops_start_up(home: Path, env: dict[str, str], error: str) -> None:
    result = modelloop(home, "monitor", "--port", str(free_port()), **env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert " ".join(" ".join(lines).split()) == error, result.stderr


def test_a_label_provider_needs_only_the_feedback_key(
        home: Path, registered: TrainedModel, task: SyntheticTask, tmp_path: Path) -> None:
    with sidecar_process(home, home / "sidecar.log", **KEYS,
                         MODELLOOP_MONITOR_CHECK_INTERVAL_S="3600") as sidecar:
        events, _ = events_for(registered, task.sample(20, seed=5), "fb")
        httpx.post(f"{sidecar.url}/events", json={"events": events},
                   headers={"Authorization": f"Bearer {INGEST}"}).raise_for_status()
        labels = tmp_path / "labels.csv"
        labels.write_text("request_id,label,timestamp\n"
                          + "".join(f"fb-{i},yes,{time.time():.3f}\n" for i in range(20)))
        # the provider's environment holds its own key only (the server's rule that a role key
        # needs the admin key is not the client's)
        result = modelloop(home, "monitor", "feedback", str(labels), "--url", sidecar.url,
                           MODELLOOP_MONITOR_FEEDBACK_KEY=FEEDBACK)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == f"{labels}: 20 labels joined, 0 unknown ids, 0 duplicates"
        # and that key opens nothing else: status, an admin route, is refused
        status = modelloop(home, "monitor", "status", "--url", sidecar.url,
                           MODELLOOP_MONITOR_FEEDBACK_KEY=FEEDBACK)
        assert status.returncode == 1 and "401 Unauthorized" in status.stderr, status.stderr
