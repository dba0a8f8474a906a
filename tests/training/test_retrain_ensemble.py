"""Retraining an ensemble in production (a real sidecar process, a real `modelloop retrain`):
each member is retrained from its own configuration and weights, the new members are combined as
the champion's were, and the gate judges that ensemble as any challenger."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from modelloop.registry import Registry
from modelloop.schemas import PROBABILITIES
from modelloop.synthetic import SyntheticTask
from tests.monitoring.helpers import sidecar_process
from tests.training.test_retrain import MANUAL_ONLY, SHIFT, _retrain, _send
from training.config import TrainingConfig
from training.data import load_data
from training.ensemble import build_ensemble, combine, register_ensemble
from training.pipeline import TrainOptions, train_and_register
from training.settings import TrainingSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]
WIDTHS = ([32], [64, 32], [48])


@pytest.fixture
def ensemble(home: Path) -> Registry:
    """`demo` v1-v3: three MLPs of one split (different widths) on the synthetic task; v4 their
    weighted ensemble, in production."""
    registry = Registry(home / "registry")
    settings = TrainingSettings(home=home, epochs=40, progress=False)
    data = load_data("synthetic", rows=3000)
    for hidden in WIDTHS:
        config = TrainingConfig.from_settings(settings, model={"hidden": hidden})
        train_and_register(data, name="demo", registry=registry, promote=False,
                           options=TrainOptions(config=config, settings=settings,
                                                lineage={"dataset_rows": 3000}))
    built = build_ensemble([registry.get("demo", v) for v in (1, 2, 3)], method="weighted",
                           settings=settings)
    meta, _, _ = register_ensemble(built, registry)
    registry.promote("demo", meta.version)  # whether or not it beat its best member
    return registry


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        [PROBABILITIES], {"input": x})[0]
    return out


def test_retraining_an_ensemble_retrains_each_member_and_gates_their_ensemble(
        home: Path, ensemble: Registry, tmp_path: Path) -> None:
    champion = ensemble.get("demo", "production")
    assert champion.version == 4
    task = SyntheticTask(seed=0)
    with sidecar_process(home, tmp_path / "sidecar.log", **MANUAL_ONLY) as sidecar:
        # production data drifted: two features moved and the concept changed
        _send(sidecar.url, ensemble, task.sample(1500, seed=50, shift=SHIFT, concept=1.0),
              time.time() - 60)
        code, out, err = _retrain(home, sidecar.url)
    assert code == 0, err
    assert out is not None and out["promoted"], out["reason"] if out else err
    # three new members, each retrained from its own member (configuration and weights)
    assert ensemble.version_numbers("demo") == [1, 2, 3, 4, 5, 6, 7, 8]
    for old, new in zip((1, 2, 3), (5, 6, 7), strict=True):
        member = ensemble.get("demo", new).metadata
        assert member.parent_version == old and "ensemble" not in member.lineage
        assert member.config == ensemble.get("demo", old).metadata.config
        assert member.lineage["fine_tuned_from"]["version"] == old
        assert member.lineage["trigger"] == "manual"
    # their ensemble is the challenger the gate promoted, combined as the champion was
    challenger = ensemble.get("demo", "production")
    meta = challenger.metadata
    assert challenger.version == 8 == out["challenger"]["version"]
    assert meta.parent_version == 4 and meta.architecture == "ensemble"
    spec, before = meta.lineage["ensemble"], champion.metadata.lineage["ensemble"]
    assert spec["members"] == [5, 6, 7] and spec["retrained_from"] == [1, 2, 3]
    assert spec["method"] == "weighted" and spec["weights"] == before["weights"]
    assert meta.lineage["gate"]["champion_version"] == 4 and meta.lineage["gate"]["promoted"]
    assert meta.parity is not None and meta.parity.passed
    # one graph that computes what its members do, run separately
    x = task.sample(64, seed=3)[meta.feature_names].to_numpy(np.float32)
    members = [_run(ensemble.get("demo", v).onnx_path, x) for v in (5, 6, 7)]
    np.testing.assert_allclose(_run(challenger.onnx_path, x), combine(members, "weighted", spec["weights"]),
                               atol=1e-6)
    # and it is retrainable in turn: its lineage names its members
    assert ensemble.aliases("demo") == {"production": 8, "previous": 4}
