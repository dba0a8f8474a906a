"""A model trained by the training package (PyTorch, exported to ONNX) served by serving's code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from modelloop.registry import Registry
from modelloop.synthetic import SyntheticTask
from serving.batch import score_file
from serving.predictions import interpret, to_records
from serving.runtime import OnnxRuntime
from serving.validation import parse_instances

pytestmark = pytest.mark.slow


def test_a_trained_model_serves_and_batch_scores_like_its_export(tmp_path: Path) -> None:
    from training.config import TrainingConfig
    from training.export import onnx_session, run_onnx
    from training.pipeline import TrainOptions, train_and_register
    from training.settings import TrainingSettings

    task = SyntheticTask(n_features=8, n_informative=8, n_classes=3)
    settings = TrainingSettings(home=tmp_path)
    config = TrainingConfig.from_settings(settings, epochs=3, model={"hidden": [16]})
    meta = train_and_register(task.sample(800, missing=0.05), name="trained", promote=True,
                              options=TrainOptions(config=config, settings=settings, progress=False))
    version = Registry(tmp_path / "registry").get("trained")
    runtime = OnnxRuntime(version, provider="cpu").load()  # the graph follows the conventions

    rows = task.sample(40, seed=9, missing=0.1)[task.feature_names]
    records = [{k: (None if pd.isna(v) else float(v)) for k, v in r.items()} for r in rows.to_dict("records")]
    x = parse_instances({"instances": records}, meta, nan_policy="allow", max_rows=100)  # NaN imputed in the graph
    preds = interpret(meta, runtime.predict(x))
    expected = run_onnx(onnx_session(version.onnx_path), rows.to_numpy(np.float32))["probabilities"]
    np.testing.assert_array_equal(preds.probabilities, expected)
    out = to_records(preds, [f"r-{i}" for i in range(40)])
    assert {o["label"] for o in out} <= set(meta.class_labels or [])

    rows.to_csv(tmp_path / "in.csv", index=False)
    score_file(tmp_path / "in.csv", tmp_path / "out.parquet", runtime, chunk_rows=16)
    scored = pd.read_parquet(tmp_path / "out.parquet")
    assert scored["label"].tolist() == [o["label"] for o in out]
