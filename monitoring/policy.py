"""The threshold policy: rules from a YAML file, validated at start-up, evaluated every check.

A rule watches one metric of each model (or of the serving process), and when the value is past
its threshold on at least ``min_samples`` samples for ``for`` (a duration), it fires: the breach
is counted and logged, and with ``action: retrain`` a retraining job is requested. After firing it
stays quiet for ``cooldown``, unless its action was refused (:meth:`PolicyEngine.refused`: no job
could start, say at the cap of running jobs): then it fires again at the next check. The file
format is in docs/monitoring.md and ``monitoring/assets/policy.yaml``; ``load_policy(path)``
reads one (PolicyError naming the rule and the field). Example (run by test_policy.py)::

    >>> policy = parse_policy('''
    ... rules:
    ...   - {name: accuracy-floor, metric: accuracy, threshold: 0.7, min_samples: 200}
    ... ''')
    >>> engine = PolicyEngine(policy)
    >>> observe = lambda rule: Observation(value=0.62, samples=400)  # the rule's metric now
    >>> [f.message() for f in engine.evaluate("model", "churn", observe, now=0.0, model="churn")]
    ["rule 'accuracy-floor' fired for churn: accuracy < 0.7, value 0.62 over 400 samples"]
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class PolicyError(ValueError):
    """The policy file is invalid; the message names the file, the rule and the field."""


@dataclass(frozen=True)
class MetricSpec:
    """What a rule's metric is: breached when above (ceiling) or below (floor) the threshold."""

    kind: Literal["ceiling", "floor", "flag"]
    scope: Literal["model", "process", "gpu"]
    unit: Literal["ratio", "seconds", "bytes", "cores", "none"]


METRICS: dict[str, MetricSpec] = {
    "data_drift": MetricSpec("flag", "model", "none"),
    "drift_share": MetricSpec("ceiling", "model", "ratio"),
    "feature_drift": MetricSpec("flag", "model", "none"),
    "prediction_drift": MetricSpec("flag", "model", "none"),
    "multivariate_drift": MetricSpec("flag", "model", "none"),
    "out_of_support_share": MetricSpec("ceiling", "model", "ratio"),
    "missing_share": MetricSpec("ceiling", "model", "ratio"),
    "accuracy": MetricSpec("floor", "model", "ratio"),
    "f1": MetricSpec("floor", "model", "ratio"),
    "precision": MetricSpec("floor", "model", "ratio"),
    "recall": MetricSpec("floor", "model", "ratio"),
    "estimated_accuracy": MetricSpec("floor", "model", "ratio"),
    "estimate_gap": MetricSpec("ceiling", "model", "ratio"),
    "latency_p50": MetricSpec("ceiling", "model", "seconds"),
    "latency_p95": MetricSpec("ceiling", "model", "seconds"),
    "latency_p99": MetricSpec("ceiling", "model", "seconds"),
    "error_rate": MetricSpec("ceiling", "model", "ratio"),
    "cpu": MetricSpec("ceiling", "process", "cores"),
    "memory_bytes": MetricSpec("ceiling", "process", "bytes"),
    "gpu_utilization": MetricSpec("ceiling", "gpu", "ratio"),
    "gpu_memory_bytes": MetricSpec("ceiling", "gpu", "bytes"),
}
"""The metrics a rule may watch. Each has one observer in ``monitoring/evaluate.py``, of its
scope; ``check_observers`` there refuses to start when one is missing."""
QUALITY = {"accuracy", "f1", "precision", "recall"}

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?"
                       r"(?:(\d+(?:\.\d+)?)s)?$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_duration(value: Any) -> float:
    """``90``, ``"90s"``, ``"5m"``, ``"1h30m"``, ``"2d"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s, 5m, 1h, got {value!r}")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"must be a non-negative duration, got {value!r}")
        return float(value)
    match = _DURATION.match(str(value).strip()) if isinstance(value, str) and value.strip() else None
    if not match:
        raise ValueError(f"expected a duration like 30s, 5m, 1h, got {value!r}")
    d, h, m, s = (float(x) if x else 0.0 for x in match.groups())
    return d * 86400 + h * 3600 + m * 60 + s


def parse_size(value: Any) -> float:
    """``1073741824``, ``"1GiB"``, ``"512MB"`` -> bytes."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = _SIZE.match(str(value).strip()) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"expected a number or a size like 512MiB, 4GiB, got {value!r}")
    return float(match.group(1)) * _SIZE_UNITS[match.group(2)]


class Rule(BaseModel):
    """One rule of the policy file."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    name: str
    metric: str
    threshold: float | None = None
    features: list[str] | None = None
    window: Literal["count", "time"] = "count"
    models: list[str] | None = None
    min_samples: int = Field(default=0, ge=0)
    for_s: float = Field(default=0.0, alias="for")
    cooldown_s: float = Field(default=3600.0, alias="cooldown")
    action: Literal["alert", "retrain"] = "alert"

    @field_validator("for_s", "cooldown_s", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    @property
    def spec(self) -> MetricSpec:
        return METRICS[self.metric]

    def breached(self, value: float) -> bool:
        if self.spec.kind == "flag":
            return value >= 1
        assert self.threshold is not None
        return value < self.threshold if self.spec.kind == "floor" else value >= self.threshold

    def describe(self) -> str:
        if self.spec.kind == "flag":
            what = f"any of {', '.join(self.features or [])} drifts" if self.features else "drift"
            return f"{self.metric}: {what}"
        op = "<" if self.spec.kind == "floor" else ">="
        return f"{self.metric} {op} {self.threshold:g}"


class Policy(BaseModel):
    rules: list[Rule]
    source: str = ""

    def rule(self, name: str) -> Rule:
        return next(r for r in self.rules if r.name == name)


_DEFAULTABLE = ("min_samples", "for", "cooldown")


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; :class:`PolicyError` names what is wrong."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file ({exc.strerror})") from exc
    return parse_policy(text, str(path))


def parse_policy(text: str, source: str = "policy") -> Policy:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"{source}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: expected a mapping with a 'rules' list")
    unknown = sorted(set(data) - {"rules", "defaults"})
    if unknown:
        raise PolicyError(f"{source}: unknown top-level key {unknown[0]!r} (allowed: defaults, rules)")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise PolicyError(f"{source}: defaults: expected a mapping")
    bad = sorted(set(defaults) - set(_DEFAULTABLE))
    if bad:
        raise PolicyError(f"{source}: defaults: field {bad[0]!r} cannot have a default "
                          f"(allowed: {', '.join(_DEFAULTABLE)})")
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise PolicyError(f"{source}: rules: expected a non-empty list of rules")
    rules: list[Rule] = []
    names: set[str] = set()
    for i, raw in enumerate(raw_rules):
        if not isinstance(raw, dict):
            raise PolicyError(f"{source}: rules[{i}]: expected a mapping, got {type(raw).__name__}")
        name = raw.get("name")
        where = f"{source}: rule {name!r} (rules[{i}])" if name else f"{source}: rules[{i}]"
        rule = _build_rule({**defaults, **raw}, where)
        if rule.name in names:
            raise PolicyError(f"{where}: field 'name': {rule.name!r} is used by another rule")
        names.add(rule.name)
        rules.append(rule)
    return Policy(rules=rules, source=source)


def _build_rule(raw: dict[str, Any], where: str) -> Rule:
    raw = dict(raw)
    metric = raw.get("metric")
    if "threshold" in raw and metric in METRICS and METRICS[metric].unit == "bytes":
        try:
            raw["threshold"] = parse_size(raw["threshold"])
        except ValueError as exc:
            raise PolicyError(f"{where}: field 'threshold': {exc}") from exc
    try:
        rule = Rule.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"]) or "rule"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (fields: name, metric, threshold, features, window, models, " \
                  "min_samples, for, cooldown, action)"
        elif err["type"] == "missing":
            msg = "required"
        raise PolicyError(f"{where}: field {field!r}: {msg}") from exc
    _check_rule(rule, raw, where)
    return rule


def _threshold_problem(rule: Rule, spec: MetricSpec) -> str | None:
    """What is wrong with the rule's threshold for its metric, or None."""
    if spec.kind == "flag":
        if rule.threshold is not None:
            return f"{rule.metric} is a drift flag and takes no threshold"
    elif rule.threshold is None:
        return f"required for metric {rule.metric}"
    elif not math.isfinite(rule.threshold) or rule.threshold < 0:
        return f"must be a non-negative number (got {rule.threshold:g})"
    elif spec.unit == "ratio" and rule.threshold > 1:
        return f"must be between 0 and 1 for metric {rule.metric} (got {rule.threshold:g})"
    return None


def _check_rule(rule: Rule, raw: dict[str, Any], where: str) -> None:
    def fail(field: str, msg: str) -> PolicyError:
        return PolicyError(f"{where}: field {field!r}: {msg}")

    if not _NAME.match(rule.name):
        raise fail("name", "letters, digits, '_', '-' or '.', up to 64")
    if rule.metric not in METRICS:
        raise fail("metric", f"unknown metric {rule.metric!r} (one of: {', '.join(METRICS)})")
    spec = rule.spec
    if (problem := _threshold_problem(rule, spec)) is not None:
        raise fail("threshold", problem)
    if rule.metric == "feature_drift":
        if not rule.features:
            raise fail("features", "feature_drift needs a non-empty list of feature names")
    elif rule.features is not None:
        raise fail("features", f"only used by metric feature_drift, not {rule.metric}")
    if "window" in raw and rule.metric not in QUALITY:
        raise fail("window", f"only used by accuracy, f1, precision and recall, not {rule.metric}")
    if rule.action == "retrain" and spec.scope != "model":
        raise fail("action", f"retrain needs a model metric; {rule.metric} is about the "
                             f"{'serving process' if spec.scope == 'process' else 'GPU'}")
    if rule.models is not None and spec.scope != "model":
        raise fail("models", f"{rule.metric} is not a per-model metric")


# -- evaluation ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Observation:
    """A rule's metric now: its value (None when unknown) and how many samples it rests on."""

    value: float | None
    samples: int
    detail: str = ""


@dataclass(frozen=True)
class Firing:
    rule: Rule
    scope: str
    """The model (or the process target / GPU) the rule fired for."""
    value: float
    samples: int
    at: float
    detail: str = ""
    retry_of: float | None = None
    """Set when the rule fired inside its cooldown because enough new labels arrived after a job
    that changed nothing (:meth:`PolicyEngine.retry_on_labels`): when that job ended."""

    def message(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return (f"rule {self.rule.name!r} fired for {self.scope}: {self.rule.describe()}, "
                f"value {self.value:g} over {self.samples} samples{extra}")


@dataclass
class RuleState:
    state: str = "ok"  # ok, insufficient, pending, firing, refused, cooldown
    pending_since: float | None = None
    last_fired: float | None = None
    """When the rule last fired and its action was carried out: its cooldown runs from here."""
    value: float | None = None
    samples: int = 0
    fired_before: float | None = None
    """:attr:`last_fired` before the newest firing, put back if that firing's action is refused."""
    refused: str = ""
    """Why the newest firing's action was refused (empty when it was carried out)."""
    retry_after: tuple[float, int] | None = None
    """(since, labels): the rule may fire inside its cooldown once ``labels`` new labels arrived
    after ``since``."""


class PolicyEngine:
    """Keeps each rule's for-duration and cooldown state per scope and decides when it fires."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.states: dict[tuple[str, str], RuleState] = {}

    def rules_for(self, scope_kind: str, model: str | None = None) -> list[Rule]:
        return [r for r in self.policy.rules if r.spec.scope == scope_kind
                and (model is None or r.models is None or model in r.models)]

    def restore(self, rule: str, scope: str, last_fired: float) -> None:
        """Carry a cooldown over a restart (from the jobs the store remembers)."""
        st = self.states.setdefault((rule, scope), RuleState())
        st.last_fired = max(st.last_fired or 0.0, last_fired)

    def retry_on_labels(self, scope: str, since: float, labels: int) -> None:
        """A retraining job for ``scope`` ended without a new production version (its challenger
        lost, or it failed): the retrain rules that fired for it may fire again, cooldown or not,
        once ``labels`` new labels arrived after ``since``."""
        for (name, sc), st in self.states.items():
            if sc == scope and self.policy.rule(name).action == "retrain" and st.last_fired:
                st.retry_after = (since, labels)

    def _retry_due(self, st: RuleState, labelled_since: Callable[[float], int] | None) -> bool:
        if st.retry_after is None or labelled_since is None:
            return False
        return labelled_since(st.retry_after[0]) >= st.retry_after[1]

    def evaluate(self, scope_kind: str, scope: str, observe: Callable[[Rule], Observation],
                 now: float, model: str | None = None,
                 labelled_since: Callable[[float], int] | None = None) -> list[Firing]:
        """Evaluate the rules of ``scope_kind`` for ``scope``; the ones that fire now.
        ``labelled_since(t)``: labels of the scope received after ``t`` (for
        :meth:`retry_on_labels`)."""
        fired = []
        for rule in self.rules_for(scope_kind, model):
            obs = observe(rule)
            st = self.states.setdefault((rule.name, scope), RuleState())
            st.value, st.samples = obs.value, obs.samples
            if obs.value is None or obs.samples < rule.min_samples:
                st.state, st.pending_since = "insufficient", None
                continue
            if not rule.breached(obs.value):
                st.state, st.pending_since = "ok", None
                continue
            if st.pending_since is None:
                st.pending_since = now
            if now - st.pending_since < rule.for_s:
                st.state = "pending"
                continue
            retry_of = None
            if st.last_fired is not None and now - st.last_fired < rule.cooldown_s:
                if not self._retry_due(st, labelled_since):
                    st.state = "cooldown"
                    continue
                assert st.retry_after is not None
                retry_of = st.retry_after[0]
            st.state, st.fired_before, st.last_fired, st.refused = "firing", st.last_fired, now, ""
            st.retry_after = None
            fired.append(Firing(rule, scope, obs.value, obs.samples, now, obs.detail, retry_of))
        return fired

    def refused(self, firing: Firing, why: str) -> None:
        """``firing``'s action was refused (no job could start): it starts no cooldown, so the
        rule fires again at the next check while it is still breached."""
        st = self.states[(firing.rule.name, firing.scope)]
        if st.last_fired == firing.at:
            st.state, st.last_fired, st.refused = "refused", st.fired_before, why

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for (name, scope), st in sorted(self.states.items()):
            rule = self.policy.rule(name)
            out.append({"rule": name, "scope": scope, "condition": rule.describe(),
                        "action": rule.action, "state": st.state, "value": st.value,
                        "samples": st.samples, "min_samples": rule.min_samples,
                        "last_fired": st.last_fired, "refused": st.refused or None,
                        "retry_after_labels": None if st.retry_after is None else
                        {"since": st.retry_after[0], "labels": st.retry_after[1]}})
        return out
