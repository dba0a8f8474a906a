"""The closed loop as a user runs it: ``modelloop demo`` end to end (short windows), and a
rollback through ``modelloop models rollback`` under continuous load."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from modelloop.registry import Registry
from tests.serving.conftest import MODEL, start_server, stop_server, wait_until
from tests.serving.onnx_models import register_mlp
from tests.serving.test_swap import Hammer, _served_versions

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODELLOOP = str(Path(sys.executable).with_name("modelloop"))


def test_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    proc = subprocess.run([MODELLOOP, "demo", "--home", str(home), "--timeout-s", "300"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    # drift on exactly the two shifted features, then a retraining job fired by the policy
    assert "drift detected drifted ['f03', 'f07']" in out
    assert re.search(r"retraining fired job retrain-demo-\S+ by policy", out)
    # v2 beat v1 on the recent holdout and was named the challenger: serving shadowed it
    won = re.search(r"v2 named challenger, shadowing v1 holdout accuracy: v2 ([\d.]+) vs v1 ([\d.]+) "
                    r"\(won by \+([\d.]+)\)", out)
    assert won, out
    assert float(won[1]) > float(won[2]) + 0.01
    # the live gate promoted it on the same labelled live requests; no request failed meanwhile
    live = re.search(r"live gate promoted v2, swapped in live accuracy v2 ([\d.]+) vs v1 ([\d.]+) on the "
                     r"same (\d+) labelled requests \(McNemar p ([\d.e+-]+)\)", out)
    assert live, out
    assert float(live[1]) > float(live[2]) and int(live[3]) >= 250 and float(live[4]) < 0.025
    load = re.search(r"load during the swap (\d+) single-row requests, (\d+) failed, "
                     r"versions served \[1, 2\]", out)
    assert load and int(load[1]) > 50 and load[2] == "0", out
    # accuracy on the shifted traffic recovered after the swap
    acc = dict(re.findall(r"(shifted v\d)\s*│\s*\d+\s*│\s*([\d.]+)", out))
    assert float(acc["shifted v2"]) > float(acc["shifted v1"]) + 0.15, acc
    registry = Registry(home / "registry")
    v2 = registry.get("demo", "production").metadata
    assert v2.version == 2 and v2.parent_version == 1 and v2.lineage["trigger"] == "policy"
    assert v2.lineage["gate"]["promoted"] is True and v2.lineage["gate"]["live_gate"] is True
    promoted = [e for e in registry.history("demo") if e["op"] == "promote" and e["version"] == 2]
    assert promoted and promoted[0]["live_gate"]["action"] == "promote"


def test_rollback_under_load_fails_no_request(tmp_path: Path) -> None:
    home = tmp_path / "home"
    registry = Registry(home / "registry")
    register_mlp(registry, MODEL, n_features=20, n_classes=3, seed=0)  # v1, production
    server = start_server(home, tmp_path / "server.log",
                          {"MODELLOOP_SERVING_ALIAS_POLL_INTERVAL_S": "0.1"}, "--workers", "2")
    try:
        v2 = register_mlp(registry, MODEL, n_features=20, n_classes=3, seed=1, promote=False)
        registry.promote(MODEL, v2.version)
        wait_until(lambda: _served_versions(server) == {2}, 30, "both workers to serve v2")
        with Hammer(server.url) as hammer:
            wait_until(lambda: hammer.count() >= 200, 30, "load before the rollback")
            cli = subprocess.run([MODELLOOP, "models", "rollback", MODEL], capture_output=True,
                                 text=True, env={**os.environ, "MODELLOOP_HOME": str(home)})
            assert cli.returncode == 0, cli.stdout + cli.stderr
            assert "production -> v1" in cli.stdout
            wait_until(lambda: _served_versions(server) == {1}, 30, "both workers to serve v1")
            seen = hammer.count()
            wait_until(lambda: hammer.count() >= seen + 200, 30, "load after the rollback")
        assert hammer.failures == []
        counts = Counter(hammer.versions)
        assert set(counts) == {1, 2} and counts[1] > 100 and counts[2] > 100, counts
        assert set(hammer.versions[-100:]) == {1}
    except BaseException:
        print(server.log_text())
        raise
    finally:
        stop_server(server)
