"""Two real `modelloop monitor` replicas on one PostgreSQL (issue #21, item 4): events sent to
both, some batches to both at once (the same request ids), one replica killed with SIGKILL in
the middle and its batches sent to the other; then nothing is lost, nothing is stored twice, and
each window of the periodic check was checked by one replica only."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from modelloop.synthetic import SyntheticTask
from monitoring.store import open_store
from tests.monitoring.conftest import PG_URL, _pg_available
from tests.monitoring.helpers import SidecarProcess, TrainedModel
from tests.monitoring.test_app import events_for
from tests.serving.conftest import wait_until
from tests.serving.test_events_outage import metric, show

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BATCHES, BATCH = 40, 100


def post(url: str, events: list[dict[str, object]]) -> int:
    """POST one batch; the status (0: the replica is gone)."""
    try:
        return httpx.post(f"{url}/events", content=orjson.dumps({"events": events}),
                          headers={"Content-Type": "application/json"}, timeout=30).status_code
    except httpx.TransportError:
        return 0


def test_two_replicas_on_one_postgresql_lose_and_duplicate_nothing_across_a_kill_9(tmp_path: Path) -> None:
    if not _pg_available():
        pytest.fail(f"PostgreSQL is not running at {PG_URL}: scripts/ci_services.sh (run by make test) starts it")
    trained = TrainedModel.fit(SyntheticTask(seed=0))
    home = tmp_path / "home"
    trained.register(home / "registry")
    prefix = f"r{uuid.uuid4().hex[:10]}_"
    env = {"MODELLOOP_MONITOR_STORE_URL": PG_URL, "MODELLOOP_MONITOR_STORE_TABLE_PREFIX": prefix,
           "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "1", "MODELLOOP_MONITOR_TRIGGER": "none"}
    a = SidecarProcess(home, tmp_path / "replica-a.log", env)
    b = SidecarProcess(home, tmp_path / "replica-b.log", env)
    events, _ = events_for(trained, trained.task.sample(BATCHES * BATCH, seed=7), "r")
    batches = [events[i:i + BATCH] for i in range(0, len(events), BATCH)]
    try:
        a.start()
        b.start()
        assert a.proc is not None and b.proc is not None
        with ThreadPoolExecutor(4) as pool:
            # the first half: even batches to a, odd ones to b, every third to both at once
            for i, batch in enumerate(batches[:BATCHES // 2]):
                targets = [a.url, b.url] if i % 3 == 0 else [a.url if i % 2 == 0 else b.url]
                assert list(pool.map(post, targets, [batch] * len(targets))) == [200] * len(targets)
            wait_until(lambda: metric(a.url, "modelloop_window_checks_total", result="skipped")
                       + metric(b.url, "modelloop_window_checks_total", result="skipped") >= 2, 60,
                       "a window that one replica checked and the other skipped")
            # a SIGKILL while both take batches; what a acknowledged is committed, the rest goes to b
            half = batches[BATCHES // 2:]
            sent = [pool.submit(post, a.url if i % 2 == 0 else b.url, batch) for i, batch in enumerate(half)]
            checked_a = metric(a.url, "modelloop_window_checks_total", result="checked")
            a.kill()
            killed = time.time()
            for i, future in enumerate(sent):
                if future.result() != 200:
                    assert post(b.url, half[i]) == 200
        before = metric(b.url, "modelloop_window_checks_total", result="checked")
        wait_until(lambda: metric(b.url, "modelloop_window_checks_total", result="checked") >= before + 3, 60,
                   "the surviving replica to check the next windows")
        checked_b = metric(b.url, "modelloop_window_checks_total", result="checked")
        b.terminate()
        store = open_store(PG_URL, prefix)
        try:
            ids = [e["request_id"] for e in events]
            stored = store.label_targets(ids)
            assert [rid for rid in ids if rid not in stored] == []  # nothing lost
            assert store.count_events() == len(ids)  # nothing twice (dedup by request id across replicas)
            checks = store.evaluations("churn")
        finally:
            store.drop_schema()
            store.close()
        # (one row per window is the table's key: that each row is one check, and each check
        # left one row, is what the counters below show)
        rows = {pid: [c for c in checks if c[1].endswith(f":{pid}")] for pid in (a.proc.pid, b.proc.pid)}
        assert sum(map(len, rows.values())) == len(checks)  # no other checker
        # a window's row is one check: as many as each replica counted (one more may have begun
        # between reading its counter and the kill or the stop)
        assert len(rows[a.proc.pid]) - checked_a in (0, 1) and len(rows[b.proc.pid]) - checked_b in (0, 1)
        after = [c for c in checks if c[2] > killed + 1]
        assert after and all(c in rows[b.proc.pid] for c in after)  # b took over a's windows
        print(f"{len(ids)} events stored once each; {len(checks)} windows checked once each "
              f"({len(rows[a.proc.pid])} by a, {len(rows[b.proc.pid])} by b)")
    except BaseException:
        show([a.log_path, b.log_path])
        raise
    finally:
        a.close()
        b.close()
