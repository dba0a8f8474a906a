"""Dashboards and alert rules have one source, the chart's files; compose mounts them and the
chart renders them, and no copy lives anywhere else in the repo."""

from __future__ import annotations

import hashlib
import subprocess

from tests.deploy._support import DASHBOARDS, ROOT, RULES


def repo_files() -> list[str]:
    """Tracked and untracked files, as git sees the tree (ignored ones left out)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def test_no_copies_of_rules_or_dashboards() -> None:
    sources = {RULES.resolve(), *(p.resolve() for p in DASHBOARDS.glob("*.json"))}
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in sources}
    copies = []
    for name in repo_files():
        path = (ROOT / name).resolve()
        if path in sources:
            continue
        data = path.read_bytes()
        text = data.decode("utf-8", errors="replace")
        if hashlib.sha256(data).hexdigest() in digests:
            copies.append(f"{name}: identical to a source file")
        elif path.suffix == ".json" and '"uid": "modelloop-' in text:
            copies.append(f"{name}: another modelloop dashboard")
        elif path.suffix in {".yml", ".yaml"} and "- alert: Modelloop" in text:
            copies.append(f"{name}: another set of modelloop alert rules")
    assert not copies, "\n".join(copies)


def test_the_sources_are_used_by_compose_and_chart() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "./helm/modelloop/files/prometheus/rules.yml:" in compose
    assert "./helm/modelloop/files/grafana/dashboards:" in compose
    templates = ROOT / "helm/modelloop/templates"
    assert '.Files.Get "files/prometheus/rules.yml"' in (templates / "prometheusrule.yaml").read_text()
    assert '.Files.Glob "files/grafana/dashboards/*.json"' in (
        templates / "grafana-dashboards.yaml"
    ).read_text()
