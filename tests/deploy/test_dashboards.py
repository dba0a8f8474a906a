"""The Grafana dashboards: every query parses (promtool) and uses only catalog metrics, the
panels the issue asks for are there, and the provisioning points at the one source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.deploy._support import (
    DASHBOARDS,
    ROOT,
    alert_rules,
    allowed_series_names,
    catalog,
    dashboard_queries,
    dashboards,
    grafana_to_promql,
    metric_names,
    run,
    tool,
)

QUERIES = dashboard_queries()


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # Each query becomes a recording rule, so promtool's own parser checks them all at once.
    rules = [
        {"record": f"dashboard_query_{i}", "expr": grafana_to_promql(q.expr)}
        for i, q in enumerate(QUERIES)
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = run([tool("promtool"), "check", "rules", str(path)])
    legend = "\n".join(f"dashboard_query_{i}: {q.dashboard}, {q.where}" for i, q in enumerate(QUERIES))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{legend}"
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: f"{q.dashboard}: {q.where}")
def test_queries_use_only_catalog_metrics(query) -> None:
    names = metric_names(grafana_to_promql(query.expr))
    assert names, f"no metric found in {query.expr!r}"
    unknown = names - allowed_series_names()
    assert not unknown, f"not in docs/metrics.md: {sorted(unknown)}"


def test_every_catalog_metric_is_on_a_dashboard_or_in_a_rule() -> None:
    used = set()
    for q in QUERIES:
        used |= metric_names(grafana_to_promql(q.expr))
    for rule in alert_rules():
        used |= metric_names(rule["expr"])
    used = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in used}
    assert set(catalog()) - used == set()


# The panels the issue names, by the metrics that carry them.
REQUIRED = {
    "serving": {
        "request rate": "modelloop_serving_requests_total",
        "latency quantiles": "modelloop_serving_request_duration_seconds_bucket",
        "errors": "modelloop_serving_errors_total",
        "batch size": "modelloop_serving_batch_size_rows_bucket",
        "queue wait": "modelloop_serving_queue_wait_seconds_bucket",
        "model version and provider": "modelloop_serving_model_info",
    },
    "quality": {
        "realised accuracy": "modelloop_accuracy_ratio",
        "estimated accuracy": "modelloop_estimated_accuracy_ratio",
        "drift per feature": "modelloop_drift_score",
        "drift share": "modelloop_drift_share_ratio",
        "label coverage": "modelloop_label_coverage_ratio",
        "retraining": "modelloop_retrain_jobs_total",
    },
    "resources": {
        "CPU": "modelloop_process_cpu_ratio",
        "memory": "modelloop_process_memory_bytes",
        "GPU utilisation": "modelloop_gpu_utilization_ratio",
        "GPU memory": "modelloop_gpu_memory_used_bytes",
    },
}


@pytest.mark.parametrize("board", sorted(REQUIRED))
def test_required_panels_present(board: str) -> None:
    used = set()
    for q in QUERIES:
        if q.dashboard == board and q.where.startswith("panel"):
            used |= metric_names(grafana_to_promql(q.expr))
    missing = {what for what, metric in REQUIRED[board].items() if metric not in used}
    assert not missing


def test_quality_dashboard_marks_retraining_as_annotations() -> None:
    annotations = dashboards()["quality"]["annotations"]["list"]
    exprs = " ".join(a.get("expr", "") for a in annotations)
    assert "modelloop_retrain_last_timestamp_seconds" in exprs
    assert "modelloop_retrain_job_active" in exprs
    # the end time is the gauge's value: no first-job blind spot of changes()/increase()
    ended = next(a for a in annotations if "last_timestamp" in a.get("expr", ""))
    assert ended["useValueForTime"] is True and ended["expr"].endswith("* 1000")


def test_model_panel_shows_version_and_provider() -> None:
    info = [q for q in QUERIES if q.dashboard == "serving" and "modelloop_serving_model_info" in q.expr
            and q.where.startswith("panel")]
    assert info and all("version" in q.expr and "provider" in q.expr for q in info)
    # serving keeps the previous version's series at 0: count the 1s only
    assert all("modelloop_serving_model_info{" in q.expr and "} == 1" in q.expr for q in info)


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_dashboard_structure(name: str) -> None:
    board = dashboards()[name]
    assert board["uid"] == f"modelloop-{name}"
    assert "modelloop" in board["tags"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    # one data source variable, so the dashboards work in any Grafana whatever its uid
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    # no two panels on the same grid cell
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, f"{panel['title']!r} overlaps another panel"
        assert g["x"] + g["w"] <= 24
        cells |= area


def test_grafana_provisioning_loads_the_chart_dashboards() -> None:
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/modelloop.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    source = next(m.split(":")[0] for m in mounts if m.split(":")[1] == path)
    assert (ROOT / source).resolve() == DASHBOARDS.resolve()
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert json.loads((DASHBOARDS / "serving.json").read_text())["templating"]["list"][0]["query"] == "prometheus"
