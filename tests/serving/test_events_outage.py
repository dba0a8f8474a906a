"""Prediction events through a sidecar outage, between real processes: a `modelloop serve` under
steady one-row load sends its events to a `modelloop monitor` that is killed, stays down for
several times the old 1.4 s of retries, and comes back on the same port and store; the events of
every answered request arrive and none is dropped. And the ingest key: a wrong one is refused
(401), counted as dropped and logged once, not sent again."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelloop.synthetic import SyntheticTask
from monitoring.store import open_store
from tests.monitoring.helpers import ServingProcess, SidecarProcess, TrainedModel, free_port
from tests.serving.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ADMIN, INGEST = "admin-" + "a" * 20, "ingest-" + "i" * 20
KEYS = {"MODELLOOP_MONITOR_API_KEY": ADMIN, "MODELLOOP_MONITOR_INGEST_KEY": INGEST,
        "MODELLOOP_MONITOR_CHECK_INTERVAL_S": "3600"}
OUTAGE_S = 4.0  # the sidecar is down this long, and then its start-up (the old retries gave up after 1.4 s)
MAX_REQUESTS = 50_000  # the load stops here whatever happens


@pytest.fixture(scope="module")
def trained() -> TrainedModel:
    return TrainedModel.fit(SyntheticTask(seed=0))


@pytest.fixture
def home(tmp_path: Path, trained: TrainedModel) -> Path:
    home = tmp_path / "home"
    trained.register(home / "registry")
    return home


class Load:
    """One client sending one-row /predict requests back to back (request ids ``load-<i>``)
    until stopped or MAX_REQUESTS; keeps the ids of the answered ones."""

    def __init__(self, url: str, row: list[float]) -> None:
        self.url, self.row = url, row
        self.answered: list[str] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for i in range(MAX_REQUESTS):
                if self.stop.is_set():
                    return
                resp = client.post("/predict", json={"instances": [self.row]}, headers={"X-Request-ID": f"load-{i}"})
                if resp.status_code == 200:
                    self.answered.append(resp.json()["predictions"][0]["request_id"])
                else:
                    self.failures.append(f"{resp.status_code} {resp.text[:200]}")

    @property
    def count(self) -> int:
        return len(self.answered)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` on ``url``/metrics whose labels include ``labels``."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def show(paths: list[Path]) -> None:
    for path in paths:
        if path.exists():
            print(f"--- {path.name} ---\n{path.read_text(errors='replace')[-20000:]}")


def test_every_answered_request_s_event_survives_a_sidecar_outage(home: Path, tmp_path: Path,
                                                                 trained: TrainedModel) -> None:
    port = free_port()
    sidecar = SidecarProcess(home, tmp_path / "sidecar-1.log", KEYS, port)
    serving = ServingProcess(home, tmp_path / "serving.log", sidecar.url)
    serving.env["MODELLOOP_SERVING_SIDECAR_KEY"] = INGEST
    back: SidecarProcess | None = None
    row = trained.task.sample(1, seed=3)[trained.task.feature_names].to_numpy()[0].tolist()
    try:
        sidecar.start()
        serving.start()
        with Load(serving.url, row) as load:
            wait_until(lambda: metric(sidecar.url, "modelloop_events_ingested_total") >= 100, 60,
                       "the first events in the sidecar")
            sidecar.kill()
            killed, during = time.monotonic(), load.count
            wait_until(lambda: time.monotonic() - killed >= OUTAGE_S and load.count >= during + 200, 120,
                       f"{OUTAGE_S} s of load with the sidecar down")
            back = SidecarProcess(home, tmp_path / "sidecar-2.log", KEYS, port).start()  # same port, same store
            outage_s, during, after = time.monotonic() - killed, load.count - during, load.count
            wait_until(lambda: load.count >= after + 200, 60, "load after the sidecar is back")
        answered = load.answered
        assert load.failures == [] and len(set(answered)) == len(answered)
        wait_until(lambda: metric(serving.url, "modelloop_serving_events_sent_total") >= len(answered), 60,
                   "serving to have every event acknowledged")
        assert metric(serving.url, "modelloop_serving_events_dropped_total") == 0
        assert metric(serving.url, "modelloop_serving_events_sent_total") == len(answered)
        assert "keeping prediction events" in serving.log() and "answers again after" in serving.log()
        back.kill()  # (what it acknowledged is committed)
        store = open_store(f"sqlite:///{home / 'monitor' / 'events.db'}")
        try:
            stored = store.label_targets(answered)
            total = store.count_events()
        finally:
            store.close()
        missing = [rid for rid in answered if rid not in stored]
        assert not missing, f"{len(missing)} of {len(answered)} events missing, e.g. {missing[:5]}"
        assert total == len(answered)  # and nothing else, nothing twice
        print(f"{len(answered)} requests, {during} of them in {outage_s:.1f} s with the sidecar down: all stored")
    except BaseException:
        show([sidecar.log_path, serving.log_path, *([back.log_path] if back else [])])
        raise
    finally:
        serving.close()
        sidecar.close()
        if back is not None:
            back.close()


def test_a_wrong_ingest_key_is_refused_counted_and_logged_once(home: Path, tmp_path: Path,
                                                              trained: TrainedModel) -> None:
    sidecar = SidecarProcess(home, tmp_path / "sidecar.log", KEYS)
    serving = ServingProcess(home, tmp_path / "serving.log", sidecar.url)
    serving.env["MODELLOOP_SERVING_SIDECAR_KEY"] = "not-the-ingest-key-0000"
    rows = trained.task.sample(5, seed=4)[trained.task.feature_names]
    try:
        sidecar.start()
        serving.start()
        serving.predict(rows.iloc[:2], rows_per_request=1)
        wait_until(lambda: metric(serving.url, "modelloop_serving_events_dropped_total", reason="rejected") == 2,
                   30, "the refused events to be counted")
        serving.predict(rows.iloc[2:], rows_per_request=1)
        wait_until(lambda: metric(serving.url, "modelloop_serving_events_dropped_total", reason="rejected") == 5,
                   30, "the refused events to be counted")
        assert metric(serving.url, "modelloop_serving_events_sent_total") == 0
        assert metric(sidecar.url, "modelloop_events_ingested_total") == 0
        refusals = [line for line in serving.log().splitlines() if "refused" in line]
        assert len(refusals) == 1, refusals
        assert "with HTTP 401: Authorization: a valid key is required" in refusals[0]
        assert "not-the-ingest-key" not in serving.log()
    except BaseException:
        show([sidecar.log_path, serving.log_path])
        raise
    finally:
        serving.close()
        sidecar.close()
