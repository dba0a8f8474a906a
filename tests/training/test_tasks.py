"""Beyond binary classification: a regressor (diabetes) and a multiclass model (wine), each
trained, exported, checked and registered through the same pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.metrics import roc_auc_score

from modelloop.registry import Registry
from modelloop.schemas import (
    INPUT_NAME,
    PREDICTION,
    PROBABILITIES,
    REF_LABEL,
    REF_PREDICTION,
    REF_SPLIT,
    Task,
)
from tests.training.conftest import quiet_settings
from training.config import TrainingConfig
from training.data import DataError, load_data, split_dataset
from training.pipeline import CONFUSION_MATRIX_PNG, TrainOptions, train_and_register, train_model

pytestmark = pytest.mark.slow


def test_regression_model_end_to_end(tmp_path: Path) -> None:
    settings = quiet_settings(tmp_path)
    meta = train_and_register("diabetes", name="diabetes", options=TrainOptions(settings=settings))
    assert meta.task is Task.regression and meta.class_labels is None
    assert set(meta.metrics) == {"mae", "rmse", "r2"}
    assert meta.metrics["r2"] > 0.3  # a linear model gets about 0.45 on this data
    assert [(o.name, o.shape) for o in meta.outputs] == [(PREDICTION, [None, 1])]

    version = Registry(settings.registry_dir).get("diabetes", meta.version)
    assert not (version.path / CONFUSION_MATRIX_PNG).exists()
    ds = load_data("diabetes")
    session = ort.InferenceSession(str(version.onnx_path), providers=["CPUExecutionProvider"])
    (pred,) = session.run([PREDICTION], {INPUT_NAME: ds.features})
    assert pred.shape == (len(ds), 1)
    # in the target's own units (disease progression 25..346), not standardized
    assert abs(float(pred.mean()) - ds.target.mean()) < 15
    ref = version.reference()
    assert list(ref.columns) == [*ds.feature_names, REF_LABEL, REF_PREDICTION, REF_SPLIT]
    assert (ref[REF_SPLIT] == "train").all()  # held-out rows calibrate classifiers only
    assert ref[REF_PREDICTION].dtype == np.float64


def test_multiclass_model_reports_one_vs_rest_roc_auc(tmp_path: Path) -> None:
    settings = quiet_settings(tmp_path)
    meta = train_and_register("wine", name="wine", promote=True, options=TrainOptions(
        settings=settings))
    assert meta.class_labels == ["class_0", "class_1", "class_2"]
    assert [(o.name, o.shape) for o in meta.outputs] == [(PROBABILITIES, [None, 3])]
    assert meta.metrics["accuracy"] >= 0.9 and meta.metrics["roc_auc"] >= 0.97

    # recompute from the registered file on the same (seeded) test split
    version = Registry(settings.registry_dir).get("wine", "production")
    ds = load_data("wine")
    config = meta.config
    split = split_dataset(ds, val_fraction=config["val_fraction"],
                          test_fraction=config["test_fraction"], seed=config["seed"])
    session = ort.InferenceSession(str(version.onnx_path), providers=["CPUExecutionProvider"])
    (proba,) = session.run([PROBABILITIES], {INPUT_NAME: ds.features[split.test]})
    expected = roc_auc_score(ds.target[split.test], proba, multi_class="ovr", average="macro")
    assert meta.metrics["roc_auc"] == pytest.approx(expected, abs=1e-6)
    assert np.array(meta.evaluation["confusion_matrix"]["matrix"]).shape == (3, 3)
    assert meta.evaluation["split_rows"] == {"train": len(split.train), "val": len(split.val),
                                             "test": len(split.test)}


def test_a_config_for_another_task_is_a_data_error(tmp_path: Path) -> None:
    settings = quiet_settings(tmp_path)
    config = TrainingConfig.from_settings(settings, task=Task.classification)
    with pytest.raises(DataError) as err:
        train_model("diabetes", name="diabetes", options=TrainOptions(
            config=config, settings=settings))
    assert str(err.value) == "diabetes: holds regression data but the config asks for classification"
