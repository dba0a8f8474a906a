"""The Helm chart's observability: the prometheus-operator resources, the dashboards' ConfigMaps,
the chart without its sidecar, and one version for chart, compose and package."""

from __future__ import annotations

import yaml

from tests.deploy._helm import (
    ALL_ON,
    KEYS_SECRET,
    OPERATOR_KINDS,
    containers,
    find,
    render,
    secret_refs,
    settings_env,
    workloads,
)
from tests.deploy._support import (
    CHART,
    DASHBOARDS,
    RULES,
)


def test_operator_resources() -> None:
    docs = render((), ALL_ON)
    service = find(docs, "Service")
    monitor = find(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    jobs = {e["port"]: e["relabelings"][0]["replacement"] for e in monitor["spec"]["endpoints"]}
    # the job names the rules and dashboards (and docker-compose's Prometheus) use
    assert jobs == {"http": "modelloop-serving", "monitor": "modelloop-monitor"}
    assert jobs.keys() <= {p["name"] for p in service["spec"]["ports"]}
    rule = find(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    am = find(docs, "AlertmanagerConfig")
    assert am["spec"]["route"]["matchers"] == [{"name": "action", "value": "retrain", "matchType": "="}]
    webhook = am["spec"]["receivers"][0]["webhookConfigs"][0]
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "monitor")
    assert webhook["url"] == f"http://{service['metadata']['name']}.models.svc:{port}/alertmanager"
    # with the sidecar's alertmanager key, read by the operator from the keys Secret
    assert webhook["httpConfig"] == {"authorization": {
        "type": "Bearer", "credentials": {"name": KEYS_SECRET, "key": "alertmanager-key"}}}
    assert "alertmanager-key" in find(docs, "Secret", KEYS_SECRET)["data"]
    # /metrics stays open: Prometheus scrapes both ports without a key
    for endpoint in monitor["spec"]["endpoints"]:
        assert not {"authorization", "bearerTokenSecret", "basicAuth", "oauth2"} & endpoint.keys()
    # without the CRDs nothing of the operator is rendered
    assert not [d for d in render() if d["kind"] in OPERATOR_KINDS]


def test_dashboard_configmaps_carry_the_files_unchanged() -> None:
    maps = [d for d in render() if d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"]]
    files = sorted(DASHBOARDS.glob("*.json"))
    assert len(maps) == len(files) == 3
    for path in files:
        (cm,) = [m for m in maps if path.name in m["data"]]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["data"][path.name] == path.read_text().rstrip("\n")


def test_without_the_sidecar_its_alert_and_container_are_left_out() -> None:
    docs = render((), ("monitor.enabled=false", "prometheusRule.enabled=true"))
    rules = [r["alert"] for g in find(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    # it would fire for ever (serving scraped, no sidecar)
    assert "ModelloopSidecarDown" not in rules and "ModelloopServingDown" in rules
    assert set(containers(find(docs, "Deployment"))) == {"serving"}
    assert not [k for k in settings_env(docs) if k.startswith("MODELLOOP_MONITOR_")]
    assert "MODELLOOP_SERVING_SIDECAR_URL" not in settings_env(docs)
    # nor its keys, nor references to them
    assert KEYS_SECRET not in {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    assert not [r for doc in workloads(docs) for c in containers(doc).values()
                for r in secret_refs(c).values() if r["name"] == KEYS_SECRET]


def test_chart_compose_and_package_agree_on_the_version() -> None:
    import re
    import tomllib

    from tests.deploy._support import ROOT

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version
    compose = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r"image: modelloop:\$\{MODELLOOP_TAG:-" + re.escape(version) + r"\}", compose)
