"""The policy file: validation with errors naming the rule and the field, and the evaluation
semantics (minimum samples, for-duration, cooldown)."""

from __future__ import annotations

import doctest
import textwrap
from pathlib import Path

import pytest

from monitoring import policy as policy_module
from monitoring.policy import (
    Observation,
    PolicyEngine,
    PolicyError,
    load_policy,
    parse_duration,
    parse_policy,
    parse_size,
)
from monitoring.settings import default_policy_file


def test_the_module_example_runs() -> None:
    result = doctest.testmod(policy_module)
    assert (result.attempted, result.failed) == (4, 0)


def test_the_shipped_policy_is_valid() -> None:
    policy = load_policy(default_policy_file())
    names = [r.name for r in policy.rules]
    assert "data-drift" in names and "accuracy-floor" in names
    drift = policy.rule("data-drift")
    assert (drift.metric, drift.threshold, drift.action, drift.cooldown_s) == (
        "data_drift", None, "retrain", 6 * 3600)
    assert policy.rule("serving-memory").threshold == 4 * 2**30


def rules(*lines: str) -> str:
    return "rules:\n" + "\n".join(textwrap.indent(line, "  ") for line in lines)


GOOD = "- {name: r, metric: drift_share, threshold: 0.3}"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        # YAML that does not parse
        ("rules: [", "p.yaml: invalid YAML at line 1: expected the node content, but found '<stream end>'"),
        # not a mapping
        ("- a\n- b", "p.yaml: expected a mapping with a 'rules' list"),
        # a misspelt top-level key
        ("rule: []", "p.yaml: unknown top-level key 'rule' (allowed: defaults, rules)"),
        # no rules
        ("rules: []", "p.yaml: rules: expected a non-empty list of rules"),
        # a default for a field that cannot have one
        ("defaults: {threshold: 1}\n" + rules(GOOD),
         "p.yaml: defaults: field 'threshold' cannot have a default (allowed: min_samples, for, "
         "cooldown)"),
        # a rule that is a string
        (rules("- just text"), "p.yaml: rules[0]: expected a mapping, got str"),
        # no name
        (rules("- {metric: drift_share, threshold: 0.3}"), "p.yaml: rules[0]: field 'name': required"),
        # a bad name
        (rules("- {name: 'a b', metric: drift_share, threshold: 0.3}"),
         "p.yaml: rule 'a b' (rules[0]): field 'name': letters, digits, '_', '-' or '.', up to 64"),
        # a duplicate name
        (rules(GOOD, GOOD), "p.yaml: rule 'r' (rules[1]): field 'name': 'r' is used by another rule"),
        # an unknown metric
        (rules("- {name: r, metric: drift, threshold: 0.3}"),
         "p.yaml: rule 'r' (rules[0]): field 'metric': unknown metric 'drift' (one of: data_drift, drift_share, "
         "feature_drift, prediction_drift, multivariate_drift, out_of_support_share, "
         "missing_share, accuracy, f1, precision, recall, estimated_accuracy, "
         "estimate_gap, latency_p50, latency_p95, latency_p99, error_rate, cpu, memory_bytes, gpu_utilization, "
         "gpu_memory_bytes)"),
        # a ratio above 1
        (rules("- {name: acc, metric: accuracy, threshold: 1.5}"),
         "p.yaml: rule 'acc' (rules[0]): field 'threshold': must be between 0 and 1 for metric "
         "accuracy (got 1.5)"),
        # a missing threshold
        (rules("- {name: lat, metric: latency_p95}"),
         "p.yaml: rule 'lat' (rules[0]): field 'threshold': required for metric latency_p95"),
        # a threshold that is not a number
        (rules("- {name: lat, metric: latency_p95, threshold: fast}"),
         "p.yaml: rule 'lat' (rules[0]): field 'threshold': Input should be a valid number, "
         "unable to parse string as a number"),
        # a negative threshold
        (rules("- {name: lat, metric: latency_p95, threshold: -1}"),
         "p.yaml: rule 'lat' (rules[0]): field 'threshold': must be a non-negative number (got -1)"),
        # a threshold on a flag
        (rules("- {name: pd, metric: prediction_drift, threshold: 0.1}"),
         "p.yaml: rule 'pd' (rules[0]): field 'threshold': prediction_drift is a drift flag and "
         "takes no threshold"),
        # the joint-distribution flag takes no threshold either
        (rules("- {name: joint, metric: multivariate_drift, threshold: 0.01}"),
         "p.yaml: rule 'joint' (rules[0]): field 'threshold': multivariate_drift is a drift flag "
         "and takes no threshold"),
        # a share of rows is a ratio
        (rules("- {name: gaps, metric: missing_share, threshold: 10}"),
         "p.yaml: rule 'gaps' (rules[0]): field 'threshold': must be between 0 and 1 for metric "
         "missing_share (got 10)"),
        (rules("- {name: outside, metric: out_of_support_share}"),
         "p.yaml: rule 'outside' (rules[0]): field 'threshold': required for metric "
         "out_of_support_share"),
        # a size that is not a size
        (rules("- {name: mem, metric: memory_bytes, threshold: lots}"),
         "p.yaml: rule 'mem' (rules[0]): field 'threshold': expected a number or a size like "
         "512MiB, 4GiB, got 'lots'"),
        # feature_drift without features
        (rules("- {name: fd, metric: feature_drift}"),
         "p.yaml: rule 'fd' (rules[0]): field 'features': feature_drift needs a non-empty list of "
         "feature names"),
        # features on another metric
        (rules("- {name: r, metric: drift_share, threshold: 0.3, features: [f1]}"),
         "p.yaml: rule 'r' (rules[0]): field 'features': only used by metric feature_drift, not "
         "drift_share"),
        # a window on a metric without windows
        (rules("- {name: r, metric: drift_share, threshold: 0.3, window: time}"),
         "p.yaml: rule 'r' (rules[0]): field 'window': only used by accuracy, f1, precision and "
         "recall, not drift_share"),
        # a window that does not exist
        (rules("- {name: acc, metric: accuracy, threshold: 0.8, window: daily}"),
         "p.yaml: rule 'acc' (rules[0]): field 'window': Input should be 'count' or 'time'"),
        # an action that does not exist
        (rules("- {name: r, metric: drift_share, threshold: 0.3, action: page}"),
         "p.yaml: rule 'r' (rules[0]): field 'action': Input should be 'alert' or 'retrain'"),
        # retraining because of the serving process's CPU
        (rules("- {name: cpu, metric: cpu, threshold: 2, action: retrain}"),
         "p.yaml: rule 'cpu' (rules[0]): field 'action': retrain needs a model metric; cpu is about "
         "the serving process"),
        # models on a per-process metric
        (rules("- {name: cpu, metric: cpu, threshold: 2, models: [a]}"),
         "p.yaml: rule 'cpu' (rules[0]): field 'models': cpu is not a per-model metric"),
        # a duration that is not one
        (rules("- {name: r, metric: drift_share, threshold: 0.3, for: soon}"),
         "p.yaml: rule 'r' (rules[0]): field 'for': expected a duration like 30s, 5m, 1h, got 'soon'"),
        # a negative cooldown
        (rules("- {name: r, metric: drift_share, threshold: 0.3, cooldown: -5}"),
         "p.yaml: rule 'r' (rules[0]): field 'cooldown': must be a non-negative duration, got -5"),
        # a negative minimum sample count
        (rules("- {name: r, metric: drift_share, threshold: 0.3, min_samples: -1}"),
         "p.yaml: rule 'r' (rules[0]): field 'min_samples': Input should be greater than or equal "
         "to 0"),
        # a misspelt field
        (rules("- {name: r, metric: drift_share, thresold: 0.3}"),
         "p.yaml: rule 'r' (rules[0]): field 'thresold': unknown field (fields: name, metric, "
         "threshold, features, window, models, min_samples, for, cooldown, action)"),
    ],
)
def test_invalid_policies_name_the_rule_and_the_field(text: str, error: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "p.yaml")
    assert str(err.value) == error


def test_a_missing_policy_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"nope.yaml: cannot read the policy file \(No such file"):
        load_policy(tmp_path / "nope.yaml")


def test_defaults_apply_where_a_rule_is_silent() -> None:
    policy = parse_policy("defaults: {min_samples: 50, for: 1m, cooldown: 2h}\n" + rules(
        GOOD, "- {name: s, metric: drift_share, threshold: 0.2, cooldown: 10s}"))
    r, s = policy.rules
    assert (r.min_samples, r.for_s, r.cooldown_s) == (50, 60.0, 7200.0)
    assert (s.min_samples, s.cooldown_s) == (50, 10.0)


@pytest.mark.parametrize(("text", "seconds"), [(90, 90.0), ("90s", 90.0), ("5m", 300.0),
                                               ("1h30m", 5400.0), ("2d", 172800.0), ("0s", 0.0)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [(1024, 1024.0), ("4GiB", 4 * 2**30), ("512MB", 512e6)])
def test_sizes(text: object, size: float) -> None:
    assert parse_size(text) == size


def engine_with(line: str) -> PolicyEngine:
    return PolicyEngine(parse_policy(rules(line)))


def test_a_rule_needs_its_minimum_samples() -> None:
    engine = engine_with("- {name: r, metric: drift_share, threshold: 0.2, min_samples: 100}")
    assert engine.evaluate("model", "m", lambda r: Observation(0.5, 99), now=0.0) == []
    assert engine.states[("r", "m")].state == "insufficient"
    fired = engine.evaluate("model", "m", lambda r: Observation(0.5, 100, "f1, f2"), now=1.0)
    assert [(f.rule.name, f.scope, f.value) for f in fired] == [("r", "m", 0.5)]
    assert fired[0].message() == ("rule 'r' fired for m: drift_share >= 0.2, value 0.5 over 100 "
                                  "samples (f1, f2)")


def test_for_duration_and_cooldown() -> None:
    engine = engine_with("- {name: acc, metric: accuracy, threshold: 0.8, for: 60s, cooldown: 1h}")
    low = lambda r: Observation(0.7, 500)  # noqa: E731
    assert engine.evaluate("model", "m", low, now=0.0) == []          # breached, pending
    assert engine.states[("acc", "m")].state == "pending"
    assert engine.evaluate("model", "m", low, now=59.0) == []         # not for long enough
    assert len(engine.evaluate("model", "m", low, now=60.0)) == 1     # fires
    assert engine.evaluate("model", "m", low, now=120.0) == []        # the cooldown holds
    assert engine.states[("acc", "m")].state == "cooldown"
    assert len(engine.evaluate("model", "m", low, now=3660.0)) == 1   # still breached after it
    # recovering resets the for-duration
    assert engine.evaluate("model", "m", lambda r: Observation(0.9, 500), now=3700.0) == []
    assert engine.states[("acc", "m")].state == "ok"
    assert engine.evaluate("model", "m", low, now=8000.0) == []
    assert engine.states[("acc", "m")].state == "pending"


def test_a_refused_action_starts_no_cooldown() -> None:
    engine = engine_with("- {name: r, metric: drift_share, threshold: 0.2, cooldown: 6h, "
                         "action: retrain}")
    high = lambda r: Observation(0.5, 10)  # noqa: E731
    (first,) = engine.evaluate("model", "m", high, now=0.0)
    engine.refused(first, "2 retraining jobs are running")  # at the cap: no job started
    assert (engine.states[("r", "m")].state, engine.summary()[0]["refused"]) == (
        "refused", "2 retraining jobs are running")
    assert len(engine.evaluate("model", "m", high, now=60.0)) == 1  # asked again at the next check
    assert engine.evaluate("model", "m", high, now=120.0) == []  # that one started: cooldown
    assert engine.states[("r", "m")].state == "cooldown"
    # refused after a carried-out firing: the cooldown runs from that firing, not from none
    (third,) = engine.evaluate("model", "m", high, now=60.0 + 6 * 3600)
    engine.refused(third, "busy")
    assert engine.states[("r", "m")].last_fired == 60.0
    assert len(engine.evaluate("model", "m", high, now=120.0 + 6 * 3600)) == 1


def test_cooldown_is_restored_after_a_restart() -> None:
    engine = engine_with("- {name: r, metric: drift_share, threshold: 0.2, cooldown: 1h}")
    engine.restore("r", "m", last_fired=1000.0)
    assert engine.evaluate("model", "m", lambda r: Observation(0.5, 10), now=2000.0) == []
    assert len(engine.evaluate("model", "m", lambda r: Observation(0.5, 10), now=4601.0)) == 1


def test_rules_apply_to_their_models_and_scopes_only() -> None:
    engine = PolicyEngine(parse_policy(rules(
        "- {name: a, metric: drift_share, threshold: 0.2, models: [churn]}",
        "- {name: cpu, metric: cpu, threshold: 1.5}")))
    assert [r.name for r in engine.rules_for("model", "churn")] == ["a"]
    assert engine.rules_for("model", "other") == []
    fired = engine.evaluate("process", "serving", lambda r: Observation(1.6, 1), now=0.0)
    assert [f.rule.name for f in fired] == ["cpu"]
    assert engine.summary()[0]["state"] == "firing"


def test_floors_and_flags() -> None:
    policy = parse_policy(rules("- {name: f, metric: f1, threshold: 0.7}",
                                "- {name: pd, metric: prediction_drift}"))
    f1, pd = policy.rules
    assert f1.breached(0.69) and not f1.breached(0.7)
    assert pd.breached(1.0) and not pd.breached(0.0)
    assert pd.describe() == "prediction_drift: drift"
