"""The alert rules: promtool's syntax check and unit tests, and what every rule must carry."""

from __future__ import annotations

import pytest
import yaml

from tests.deploy._support import (
    RULES,
    RULES_TEST,
    alert_rules,
    allowed_series_names,
    metric_names,
    run,
    tool,
)


def test_promtool_check_rules() -> None:
    result = run([tool("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = run([tool("promtool"), "test", "rules", str(RULES_TEST)])
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _cases() -> dict[str, list[list]]:
    """alert name -> the expected alert lists of its cases in the unit tests."""
    cases: dict[str, list[list]] = {}
    for test in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(case.get("exp_alerts") or [])
    return cases


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_is_tested_firing_and_quiet(rule: dict) -> None:
    cases = _cases().get(rule["alert"], [])
    assert any(cases), f"{rule['alert']}: no unit test case where it fires"
    assert any(not c for c in cases), f"{rule['alert']}: no unit test case where it stays quiet"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_has_for_severity_action_and_text(rule: dict) -> None:
    assert rule.get("for"), "an alert without `for:` pages on a single bad scrape"
    assert rule["labels"]["severity"] in {"warning", "critical"}
    # `retrain` routes to the sidecar's Alertmanager receiver (deploy/alertmanager)
    assert rule["labels"]["action"] in {"retrain", "notify"}
    assert {"summary", "description"} <= set(rule["annotations"])


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_rules_use_only_catalog_metrics(rule: dict) -> None:
    names = metric_names(rule["expr"])
    assert names, f"found no metric in {rule['expr']!r}"
    unknown = names - allowed_series_names()
    assert not unknown, f"{rule['alert']} uses metrics missing from docs/metrics.md: {unknown}"


def test_retraining_alerts_cover_drift_and_accuracy() -> None:
    retrain = {r["alert"] for r in alert_rules() if r["labels"]["action"] == "retrain"}
    assert retrain == {"ModelloopDataDrift", "ModelloopAccuracyBelowFloor"}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        # histogram series inside a rate, grouping labels are not metrics
        ("histogram_quantile(0.9, sum by (le) (rate(a_bucket{x=\"y\"}[5m])))", {"a_bucket"}),
        # binary operators with matching clauses and a number in exponent form
        ("a / on (model) group_left(version) b > 76e9", {"a", "b"}),
        # strings in label_replace, offset, keywords
        ("label_replace(vector(0), \"r\", \"none\", \"\", \"\") or c offset 1m unless d", {"c", "d"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
