"""The GRU on the synthetic sequence task: acceptance accuracy, a graph that takes any sequence
length, what the task promises (order matters) and the layout checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from modelloop.schemas import PROBABILITIES, REF_SPLIT
from tests.training.conftest import Registered
from training.config import TrainingConfig
from training.data import DataError, load_data
from training.export import onnx_session, run_onnx
from training.pipeline import TrainOptions, train_model
from training.sequence import CHANNELS, CLASSES, RNNParams, SequenceTask, TimeStretch
from training.settings import TrainingSettings

pytestmark = pytest.mark.slow


def test_gru_meets_the_acceptance_accuracy(sequences_gru: Registered) -> None:
    meta = sequences_gru.version.metadata
    assert meta.metrics["accuracy"] >= 0.90
    assert meta.inputs[0].shape == [None, None, 3] and meta.feature_names == CHANNELS
    assert meta.class_labels == CLASSES
    # parity was checked at four sequence lengths, each on the held-out rows
    assert meta.parity is not None and meta.parity.passed
    assert meta.parity.rows_checked == 4 * (24 + len(sequences_gru.trained.split.test))


def test_graph_has_dynamic_batch_and_time_axes(sequences_gru: Registered) -> None:
    (inp,) = onnx.load(str(sequences_gru.version.onnx_path)).graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[1], str) and dims[2] == 3


@pytest.mark.parametrize(("batch", "length"), [(1, 1), (7, 5), (3, 24), (2, 60)])
def test_onnx_equals_torch_at_any_length(sequences_gru: Registered, batch: int, length: int) -> None:
    x, _ = SequenceTask(seed=5).sample(batch, length=max(length, 2))
    x = np.ascontiguousarray(x[:, :length])
    x[0, 0, 1] = np.nan  # a missing value takes the channel's training median
    got = run_onnx(onnx_session(sequences_gru.version.onnx_path), x)[PROBABILITIES]
    with torch.no_grad():
        want = sequences_gru.trained.net.infer(torch.from_numpy(x)).numpy()
    assert got.shape == (batch, 4) and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(("length", "floor"), [(12, 0.7), (48, 0.9)])  # chance: 0.25
def test_trained_at_24_steps_it_classifies_other_lengths(
        sequences_gru: Registered, length: int, floor: float) -> None:
    """The time-stretch augmentation is what makes the dynamic length axis useful."""
    x, y = SequenceTask(seed=11).sample(800, length=length)
    proba = run_onnx(onnx_session(sequences_gru.version.onnx_path), x)[PROBABILITIES]
    assert (proba.argmax(axis=1) == y).mean() >= floor


def test_rise_and_fall_need_the_order(sequences_gru: Registered) -> None:
    """A model of the sorted values (order thrown away) cannot tell rise from fall; the GRU can."""
    x, y = SequenceTask(seed=3).sample(2000)
    keep = y < 2  # rise, fall
    x, y = x[keep], y[keep]
    bag = np.sort(x, axis=1).reshape(len(x), -1)
    half = len(x) // 2
    baseline = LogisticRegression(max_iter=2000).fit(bag[:half], y[:half]).score(bag[half:], y[half:])
    proba = run_onnx(onnx_session(sequences_gru.version.onnx_path), x[half:])[PROBABILITIES]
    assert baseline < 0.6
    assert (proba.argmax(axis=1) == y[half:]).mean() >= 0.9


def test_reference_sample_holds_channel_means(sequences_gru: Registered) -> None:
    trained = sequences_gru.trained
    ref = sequences_gru.version.reference()
    ref = ref[ref[REF_SPLIT] == "train"]  # the held-out rows follow, for calibration
    rows = trained.dataset.features[trained.split.train][: len(ref)]
    assert list(ref.columns[:3]) == CHANNELS
    np.testing.assert_allclose(ref[CHANNELS].to_numpy(), rows.mean(axis=1), rtol=1e-5, atol=1e-6)


def test_the_task_is_seeded_and_balanced() -> None:
    x1, y1 = SequenceTask(seed=1).sample(400, length=10)
    x2, y2 = SequenceTask(seed=1).sample(400, length=10)
    x3, _ = SequenceTask(seed=2).sample(400, length=10)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert x1.shape == (400, 10, 3) and x1.dtype == np.float32
    assert np.bincount(y1).tolist() == [100, 100, 100, 100]
    ds = load_data("sequences", rows=40, seed=4)
    assert ds.features.shape == (40, 24, 3) and ds.class_labels == CLASSES


@pytest.mark.parametrize(("low", "high", "steps", "expect"), [
    (1.0, 1.0, 24, {24}),           # augmentation off
    (0.5, 0.5, 24, {12}),           # always half as long
    (0.5, 2.0, 24, set(range(12, 49))),  # anywhere from half to twice
    (0.01, 1.0, 3, {2, 3}),         # never shorter than two steps
])
def test_time_stretch_lengths(low: float, high: float, steps: int, expect: set[int]) -> None:
    stretch = TimeStretch(low, high).train()
    x = torch.randn(4, steps, 3)
    torch.manual_seed(0)
    seen = {stretch(x).shape[1] for _ in range(200)}
    assert seen <= expect and (len(expect) == 1 or len(seen) > 0.7 * len(expect))
    assert stretch.eval()(x) is x


def test_time_stretch_keeps_a_ramp_a_ramp() -> None:
    x = torch.linspace(0, 1, 24).reshape(1, 24, 1)
    torch.manual_seed(1)
    out = TimeStretch(0.5, 2.0).train()(x)
    torch.testing.assert_close(out[0, :, 0], torch.linspace(0, 1, out.shape[1]))


def test_rnn_params_reject_dropout_without_layers() -> None:
    with pytest.raises(ValueError, match="dropout between layers needs layers > 1"):
        RNNParams(dropout=0.2)
    RNNParams(dropout=0.2, layers=2)


@pytest.mark.parametrize(("data", "architecture", "message"), [
    ("digits", "gru", "^digits: architecture 'gru' trains on sequences \\[rows, time, features\\]; "
                      "the data holds rows of features$"),
    ("sequences", "mlp", "^sequences: architecture 'mlp' trains on rows of features; "
                         "the data holds sequences \\[rows, time, features\\]$"),
    ("sequences", "autoencoder", "^sequences: architecture 'autoencoder' trains on rows"),
])
def test_layout_mismatch_is_a_data_error(tmp_path: Path, data: str, architecture: str, message: str) -> None:
    settings = TrainingSettings(home=tmp_path, progress=False)
    config = TrainingConfig.from_settings(settings, architecture=architecture, epochs=1)
    with pytest.raises(DataError, match=message):
        train_model(load_data(data, rows=60), name="x", options=TrainOptions(
            config=config, settings=settings))
