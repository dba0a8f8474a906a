"""Shared helpers of the deployment tests: where things are, the external tools, the metric
catalog of docs/metrics.md, and the PromQL of the dashboards and rules."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "modelloop"
RULES = CHART / "files" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "tests" / "deploy" / "prometheus" / "rules.test.yml"
DASHBOARDS = CHART / "files" / "grafana" / "dashboards"
METRICS_DOC = ROOT / "docs" / "metrics.md"
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"

# Metrics a query may use beyond the catalog: Prometheus's own scrape health.
PROMETHEUS_BUILTINS = {"up"}


def tool(name: str) -> str:
    """Path of an external tool; a missing one fails the test (never skips) with the fix."""
    candidates = [ROOT / ".tools" / name, Path(sys.executable).parent / name]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(
        f"{name} is not installed: run `bash scripts/ci_services.sh` (prometheus, promtool, helm) "
        f"or `pip install -e '.[dev]'` (hadolint, shellcheck)",
        pytrace=False,
    )


def run(args: list[str], cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a tool; the result carries stdout and stderr for the assertion message."""
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def entrypoint_env(run_dir: Path, home: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of the image, here: modelloop on PATH, a run dir and a home of our own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELLOOP_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MODELLOOP_RUN_DIR"] = str(run_dir)
    env["MODELLOOP_HOME"] = str(home or run_dir / "home")
    env.update(extra)
    return env


def run_entrypoint(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=timeout,
        check=False,
    )


# ----------------------------------------------------------------------------- metric catalog
@dataclass(frozen=True)
class CatalogMetric:
    name: str
    type: str


def catalog() -> dict[str, CatalogMetric]:
    """The metric names of docs/metrics.md: first cell of every table row, `a` / `b` rows too."""
    metrics: dict[str, CatalogMetric] = {}
    for line in METRICS_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`modelloop_"):
            continue
        kind = cells[1].split()[0]
        for name in re.findall(r"`(modelloop_[a-z0-9_]+)`", cells[0]):
            metrics[name] = CatalogMetric(name, kind)
    return metrics


def allowed_series_names() -> set[str]:
    """Every series name a query may select: catalog names, histogram series, builtins."""
    names = set(PROMETHEUS_BUILTINS)
    for metric in catalog().values():
        names.add(metric.name)
        if metric.type == "histogram":
            names |= {f"{metric.name}_bucket", f"{metric.name}_sum", f"{metric.name}_count"}
    return names


# ----------------------------------------------------------------------------- PromQL
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "atan2",
}


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects (a tokenizer, enough for our expressions)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors and subqueries
    text = re.sub(r"\boffset\s+\S+", " ", text)
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        word, is_call = match.group(1), match.group(2)
        if is_call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


# Grafana's variables, replaced as Grafana does before the query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "15s",
    "$__interval": "5s",
    "$__range": "5m",
    "${model}": ".+",
    "$model": ".+",
}


def grafana_to_promql(expr: str, variables: dict[str, str] | None = None) -> str:
    for name, value in (variables or GRAFANA_VARIABLES).items():
        expr = expr.replace(name, value)
    return expr


@dataclass(frozen=True)
class DashboardQuery:
    dashboard: str
    where: str  # panel title (or annotation name) and refId
    expr: str
    instant: bool


def dashboards() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries() -> list[DashboardQuery]:
    """Every PromQL query of every dashboard: panel targets, annotations, variables."""
    queries = []
    for name, board in dashboards().items():
        for panel in _panels(board["panels"]):
            for target in panel.get("targets", []):
                where = f"panel {panel['title']!r} {target['refId']}"
                queries.append(
                    DashboardQuery(name, where, target["expr"], bool(target.get("instant")))
                )
        for ann in board.get("annotations", {}).get("list", []):
            if "expr" in ann:
                queries.append(DashboardQuery(name, f"annotation {ann['name']!r}", ann["expr"], False))
        for var in board.get("templating", {}).get("list", []):
            if var["type"] == "query":
                query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                # label_values(metric, label) is Grafana's, not PromQL: check its metric
                inner = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
                queries.append(DashboardQuery(
                    name, f"variable {var['name']!r}", inner.group(1) if inner else query, True
                ))
    return queries


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


# ----------------------------------------------------------------------------- settings
SETTINGS_CLASSES = {
    "MODELLOOP_SERVING_": ("serving.settings", "ServingSettings"),
    "MODELLOOP_MONITOR_": ("monitoring.settings", "MonitorSettings"),
    "MODELLOOP_TRAINING_": ("training.settings", "TrainingSettings"),
}


def settings_class(prefix: str) -> Any:
    """The pydantic-settings class behind an env prefix."""
    module, name = SETTINGS_CLASSES[prefix]
    return getattr(importlib.import_module(module), name)
