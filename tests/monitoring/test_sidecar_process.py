"""A real `modelloop monitor --port P` process: an acknowledged event survives SIGKILL, and
SIGTERM commits everything in flight before the process exits."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelloop.synthetic import SyntheticTask
from monitoring.store import open_store
from tests.monitoring.helpers import TrainedModel, sidecar_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def batch(trained: TrainedModel, task: SyntheticTask, tag: str, n: int = 200) -> list[dict[str, Any]]:
    x = task.sample(n, seed=hash(tag) % 10_000)[task.feature_names].to_numpy()
    proba = trained.predict_proba(x)
    return [{"request_id": f"{tag}-{i}", "timestamp": time.time(), "model": "churn", "version": 1,
             "features": row.tolist(), "prediction": int(p.argmax()), "probabilities": p.tolist(),
             "latency_s": 0.003} for i, (row, p) in enumerate(zip(x, proba, strict=True))]


class Poster:
    """Threads posting batches as fast as they can; records which request ids were acknowledged."""

    def __init__(self, url: str, batches: list[list[dict[str, Any]]], threads: int = 4) -> None:
        self.url = url
        self.batches = batches
        self.acked: list[str] = []
        self.failed = 0
        self.lock = threading.Lock()
        self.first_ack = threading.Event()
        self._next = 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> Poster:
        for t in self.threads:
            t.start()
        return self

    def join(self) -> None:
        for t in self.threads:
            t.join(60)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while True:
                with self.lock:
                    if self._next >= len(self.batches):
                        return
                    events = self.batches[self._next]
                    self._next += 1
                try:
                    resp = client.post("/events", json={"events": events})
                except httpx.HTTPError:
                    with self.lock:
                        self.failed += 1
                    continue
                if resp.status_code == 200:
                    with self.lock:
                        self.acked += [e["request_id"] for e in events]
                    self.first_ack.set()
                else:
                    with self.lock:
                        self.failed += 1


def stored_ids(home: Path) -> set[str]:
    """Request ids in the sidecar's SQLite file, read by a fresh connection after the process."""
    store = open_store(f"sqlite:///{home / 'monitor' / 'events.db'}")
    try:
        with store._read() as cur:
            cur.execute(store._sql("SELECT request_id FROM {p}events"))
            return {r[0] for r in cur.fetchall()}
    finally:
        store.close()


def test_sigkill_right_after_an_ack_loses_nothing(home: Path, registered: TrainedModel,
                                                  task: SyntheticTask, tmp_path: Path) -> None:
    batches = [batch(registered, task, f"k{j}") for j in range(60)]
    with sidecar_process(home, tmp_path / "sidecar.log") as proc:
        poster = Poster(proc.url, batches).start()
        assert poster.first_ack.wait(60), proc.log()
        time.sleep(0.2)  # let more batches be in flight, some acknowledged and some not
        with poster.lock:  # SIGKILL right after these acks: nothing may be missing afterwards
            acked = list(poster.acked)
            proc.kill()
        poster.join()
    assert acked, "no batch was acknowledged before the kill"
    stored = stored_ids(home)
    assert not set(acked) - stored, f"{len(set(acked) - stored)} acknowledged events were lost"
    assert not set(poster.acked) - stored
    # and the sidecar comes back on the same store
    with sidecar_process(home, tmp_path / "sidecar2.log") as proc:
        resp = httpx.post(f"{proc.url}/events", json={"events": batch(registered, task, "after", 5)})
        assert resp.json() == {"accepted": 5, "new": 5, "ambiguous": 0}


def test_sigterm_flushes_in_flight_events_and_exits_cleanly(home: Path, registered: TrainedModel,
                                                           task: SyntheticTask, tmp_path: Path) -> None:
    batches = [batch(registered, task, f"t{j}") for j in range(40)]
    with sidecar_process(home, tmp_path / "sidecar.log") as proc:
        poster = Poster(proc.url, batches).start()
        assert poster.first_ack.wait(60), proc.log()
        code = proc.terminate()
        poster.join()
        log = proc.log()
    # uvicorn finishes the shutdown, then re-raises SIGTERM so the exit status tells why it ended
    assert code in (0, -15), log
    assert "every acknowledged event is committed" in log
    stored = stored_ids(home)
    assert poster.acked and not set(poster.acked) - stored
    # the WAL was checkpointed into the database file on the clean shutdown
    assert not (home / "monitor" / "events.db-wal").exists() or \
        (home / "monitor" / "events.db-wal").stat().st_size == 0


@pytest.mark.parametrize(
    ("command", "env", "error"),
    [
        # a policy rule with a bad field stops start-up, naming the rule and the field
        (["monitor", "--port", "0"], {"MODELLOOP_MONITOR_POLICY_FILE": "{bad_policy}"},
         "error: {bad_policy}: rule 'x' (rules[0]): field 'threshold': must be between 0 and 1 "
         "for metric accuracy (got 2)"),
        # a setting that does not parse names the variable (`monitor run` is the same command)
        (["monitor", "run", "--port", "0"], {"MODELLOOP_MONITOR_WINDOW_EVENTS": "lots"},
         "error: setting window_events (MODELLOOP_MONITOR_WINDOW_EVENTS): Input should be a valid "
         "integer, unable to parse string as an integer"),
    ],
)
def test_bad_configuration_stops_start_up_with_one_line(home: Path, tmp_path: Path, command: list[str],
                                                        env: dict[str, str], error: str) -> None:
    import os
    import subprocess
    import sys

    bad_policy = tmp_path / "policy.yaml"
    bad_policy.write_text("rules:\n  - {name: x, metric: accuracy, threshold: 2}\n")
    env = {k: v.format(bad_policy=bad_policy) for k, v in env.items()}
    exe = Path(sys.executable).with_name("modelloop")
    result = subprocess.run([str(exe), *command], capture_output=True, text=True,
                            env={**os.environ, "MODELLOOP_HOME": str(home), **env}, timeout=60)
    assert result.returncode == 2
    assert " ".join(result.stderr.split()) == error.format(bad_policy=bad_policy)
