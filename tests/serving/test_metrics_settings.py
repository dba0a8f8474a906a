"""The metric catalog matches docs/metrics.md; the settings read their env names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from serving.metrics import LATENCY_BUCKETS, ServingMetrics
from serving.settings import ServingSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def documented() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, labels) from the Serving table of docs/metrics.md."""
    text = DOC.read_text().split("## Serving", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`modelloop_"):
            kind = cells[1].split()[0]
            rows[cells[0].strip("`")] = (kind, {c.strip() for c in cells[2].split(",") if c.strip()})
    return rows


def test_every_documented_serving_metric_exists_with_its_type_and_labels() -> None:
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)
    found = {}
    for attr in vars(metrics).values():
        if hasattr(attr, "_labelnames"):
            name = attr._name + ("_total" if attr._type == "counter" else "")
            found[name] = (attr._type, set(attr._labelnames))
    docs = documented()
    assert len(docs) >= 11  # the table was read (the equality below checks every row)
    assert found == docs


def test_latency_buckets_hold_the_slo_boundaries() -> None:
    assert {0.025, 0.1, 0.25} <= set(LATENCY_BUCKETS)


def test_fresh_registries_do_not_clash() -> None:
    ServingMetrics(CollectorRegistry())
    ServingMetrics(CollectorRegistry())  # no global state: a second catalog is fine


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELLOOP_HOME", "/srv/ml")
    monkeypatch.setenv("MODELLOOP_SERVING_MODEL", "churn")
    monkeypatch.setenv("MODELLOOP_SERVING_PROVIDERS", "cuda")
    monkeypatch.setenv("MODELLOOP_SERVING_API_KEY", "k")
    monkeypatch.setenv("MODELLOOP_SERVING_SIDECAR_URL", "http://sidecar:8001")
    s = ServingSettings()
    assert (s.model, s.providers, s.api_key.get_secret_value() if s.api_key else None) == ("churn", "cuda", "k")
    assert str(s.jobs_dir) == "/srv/ml/serving/jobs"
    assert ServingSettings().registry_dir == Path("/srv/ml/registry")


def test_settings_round_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = ServingSettings(model="m", workers=3, batching=False, api_key="t", nan_policy="reject",
                        sidecar_url="http://x:1", event_shares={"m": 0.25}, event_rows_per_s_by_model={"m": 500})
    env = s.to_env()
    assert env["MODELLOOP_SERVING_BATCHING"] == "false" and env["MODELLOOP_SERVING_API_KEY"] == "t"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert ServingSettings() == s


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("providers", "rocm", "providers"),
    ("max_batch_rows", "0", "max_batch_rows"),
    ("nan_policy", "drop", "nan_policy"),
    ("sidecar_url", "not a url", "sidecar_url"),
    ("event_share", "0", "event_share"),  # a share is above 0 and at most 1
    ("event_shares", '{"m": 1.5}', "event_shares.m"),  # per model alike, naming the model
    ("event_rows_per_s_by_model", "[1]", "event_rows_per_s_by_model"),  # a JSON object
])
def test_bad_settings_name_the_setting(monkeypatch: pytest.MonkeyPatch, field: str, value: str, problem: str) -> None:
    monkeypatch.setenv(f"MODELLOOP_SERVING_{field.upper()}", value)
    with pytest.raises(ValueError, match=re.escape(problem)):
        ServingSettings()


def test_threads_are_sized_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert ServingSettings(workers=2).ort_threads() == 4
    assert ServingSettings(workers=0).ort_threads() == 1  # one worker per core
    assert ServingSettings(workers=16).ort_threads() == 1
    assert ServingSettings(workers=2, threads=3).ort_threads() == 3


def test_buffered_updates_equal_direct_updates() -> None:
    from prometheus_client import generate_latest

    from serving.metrics import MetricBuffer

    values = [0.0004, 0.001, 0.0011, 0.02, 0.3, 7.0, 11.0, 0.1, 0.1]
    direct, buffered = ServingMetrics(CollectorRegistry()), ServingMetrics(CollectorRegistry())
    buffer = MetricBuffer()
    for v in values:
        direct.queue_wait.labels(model="m").observe(v)
        buffer.observe(buffered.queue_wait.labels(model="m"), v)
        direct.rows.labels(model="m", mode="realtime").inc(3)
        buffer.inc(buffered.rows.labels(model="m", mode="realtime"), 3)
    assert generate_latest(buffered.registry) != generate_latest(direct.registry)  # not yet flushed
    buffer.flush()

    def text(m: ServingMetrics) -> list[str]:  # creation timestamps differ; the values must not
        return [line for line in generate_latest(m.registry).decode().splitlines() if "_created" not in line]

    assert text(buffered) == text(direct)
    buffer.flush()  # flushing again adds nothing
    assert text(buffered) == text(direct)
