"""Global importance beside each feature's drift in the sidecar's drift report: a real sidecar app
(real store, registry and report thread) with a real ONNX logistic regression registered."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelloop.registry import Registry
from modelloop.synthetic import SyntheticTask
from monitoring.app import create_app
from monitoring.importance import version_importance
from monitoring.sidecar import Sidecar
from tests.monitoring.helpers import TrainedModel, serve_in_thread
from tests.monitoring.test_app import events_for, make_settings


@pytest.fixture(params=[True], ids=["importance"])
def client(request: pytest.FixtureRequest, home: Path,
           registered: TrainedModel) -> Iterator[tuple[httpx.Client, Sidecar]]:
    # the suite turns the section off (tests/conftest.py); here it is what is tested
    sc = Sidecar(make_settings(home).model_copy(update={"report_importance": request.param}))
    sc.start(background=False)
    try:
        with serve_in_thread(create_app(sc)) as url, httpx.Client(base_url=url, timeout=120) as c:
            yield c, sc
    finally:
        sc.stop()


def test_the_drift_report_shows_importance_beside_drift(client: tuple[httpx.Client, Sidecar],
                                                        registered: TrainedModel, task: SyntheticTask,
                                                        home: Path) -> None:
    c, sidecar = client
    events, _ = events_for(registered, task.sample(1000, seed=6, shift={"f02": 1.5, "f09": -1.5}), "d")
    assert c.post("/events", json={"events": events}).status_code == 200
    assert c.post("/check").json()["models"]["churn"]["drift"]["drifted_features"] == ["f02", "f09"]
    sidecar.evaluator.wait_for_report()
    page = c.get("/reports/drift/latest").text
    section = page[page.index('<section id="modelloop-importance"'):]
    section = section[:section.index("</section>")]
    assert "Drift and importance by feature (churn v1)" in section
    rows = re.findall(r"<tr><th>(f\d\d)</th><td>(\w+) (p-value|distance) ([^<]+)</td><td>([^<]+)</td>"
                      r"<td>([^<]+)</td><td>([^<]+)%</td></tr>", section)
    assert [r[0] for r in rows] and sorted(r[0] for r in rows) == task.feature_names
    drifted = {r[0] for r in rows if r[4] == "drifted"}
    assert drifted == {"f02", "f09"}
    importance = [float(r[5]) for r in rows]
    assert importance == sorted(importance, reverse=True)  # most important first
    assert sum(float(r[6]) for r in rows) == pytest.approx(100, abs=0.5)
    # the numbers are the version's importance, which is computed once and kept
    kept = version_importance(Registry(home / "registry"), "churn", 1)
    assert kept is version_importance(Registry(home / "registry"), "churn", 1)
    assert [f"{kept.values[r[0]]:.4g}" for r in rows] == [r[5] for r in rows]


@pytest.mark.parametrize("client", [False], ids=["off"], indirect=True)
def test_with_importance_off_the_report_has_no_section(client: tuple[httpx.Client, Sidecar],
                                                      registered: TrainedModel,
                                                      task: SyntheticTask) -> None:
    c, sidecar = client
    events, _ = events_for(registered, task.sample(1000, seed=6, shift={"f02": 1.5}), "o")
    assert c.post("/events", json={"events": events}).status_code == 200
    assert c.post("/check").json()["models"]["churn"]["drift"]["drifted_features"] == ["f02"]
    sidecar.evaluator.wait_for_report()
    page = c.get("/reports/drift/latest").text
    assert '<section id="modelloop-sidecar"' in page  # the report was written, with our section
    assert 'id="modelloop-importance"' not in page


def test_importance_follows_the_models_weights(registered: TrainedModel, home: Path) -> None:
    """A logistic regression's standardised feature moves the probability by its coefficient:
    the two orders agree at the top and the bottom."""
    result = version_importance(Registry(home / "registry"), "churn", 1)
    assert not result.note and all(v >= 0 for v in result.values.values())
    weight = np.abs(registered.pipeline[1].coef_[0])  # (the scaler standardised the features)
    names = registered.task.feature_names
    by_weight = [names[j] for j in np.argsort(-weight)]
    by_importance = sorted(names, key=lambda f: -result.values[f])
    assert by_importance[0] == by_weight[0]
    assert set(by_importance[-3:]) <= set(by_weight[-6:])


def test_a_version_without_a_reference_sample_has_none_and_says_why(home: Path, trained: TrainedModel) -> None:
    meta = trained.register(home / "registry", name="bare", promote=False, reference_rows=10)
    (Registry(home / "registry").get("bare", meta.version).reference_path).unlink()
    result = version_importance(Registry(home / "registry"), "bare", meta.version)
    assert result.values == {} and "has no reference sample" in result.note
