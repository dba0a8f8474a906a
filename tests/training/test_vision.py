"""The CNN on digits: acceptance accuracy, the exported [batch, 1, 8, 8] graph against PyTorch,
augmentation (training mode only, never in the graph) and the image-shape checks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from modelloop.schemas import INPUT_NAME, PROBABILITIES, REF_SPLIT
from tests.training.conftest import Registered
from training.config import TrainingConfig
from training.data import DataError, load_data
from training.export import onnx_session, run_onnx
from training.pipeline import TrainOptions, train_model
from training.settings import TrainingSettings
from training.vision import Augment, CNNParams, ImagePreprocessor, image_shape

pytestmark = pytest.mark.slow


def test_cnn_meets_the_acceptance_accuracy_on_digits(digits_cnn: Registered) -> None:
    meta = digits_cnn.version.metadata
    assert meta.metrics["accuracy"] >= 0.97
    assert meta.architecture == "cnn" and meta.parity is not None and meta.parity.passed
    assert meta.inputs[0].shape == [None, 1, 8, 8]
    assert meta.outputs[0].shape == [None, 10] and meta.n_features == 64
    assert meta.config["model"]["augment"] is True


def test_registered_graph_takes_images_with_a_dynamic_batch(digits_cnn: Registered) -> None:
    proto = onnx.load(str(digits_cnn.version.onnx_path))
    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == INPUT_NAME and dims[1:] == [1, 8, 8] and isinstance(dims[0], str)
    # the augmentation is training-only: no sampling or random op made it into the graph
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"GridSample", "RandomNormalLike", "RandomUniformLike", "RandomNormal"}


@pytest.mark.parametrize("batch", [1, 7, 300])
def test_onnx_equals_torch_on_test_images(digits_cnn: Registered, batch: int) -> None:
    trained = digits_cnn.trained
    images = trained.net.layout(trained.dataset.features[trained.split.test])
    x = images[np.arange(batch) % len(images)]
    x[0, 0, 3, 4] = np.nan  # a missing pixel takes the training median inside the graph
    got = run_onnx(onnx_session(digits_cnn.version.onnx_path), x)[PROBABILITIES]
    with torch.no_grad():
        want = trained.net.infer(torch.from_numpy(x)).numpy()
    assert got.shape == (batch, 10) and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_reference_sample_holds_the_64_pixels(digits_cnn: Registered) -> None:
    ref = digits_cnn.version.reference()
    ref = ref[ref[REF_SPLIT] == "train"]  # the held-out rows follow, for calibration
    trained = digits_cnn.trained
    assert list(ref.columns[:64]) == trained.dataset.feature_names
    rows = trained.dataset.features[trained.split.train][: len(ref)]
    np.testing.assert_array_equal(ref.iloc[:, :64].to_numpy(np.float32), rows)


def test_image_preprocessor_has_one_scale_for_the_whole_image() -> None:
    images = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    images[0, 0, 0, 0] = np.nan
    pre = ImagePreprocessor.fit(images)
    assert pre.median.shape == (1, 4, 4) and pre.mean.ndim == 0 and pre.scale.ndim == 0
    assert float(pre.median[0, 0, 0]) == 16.0  # the other image's pixel
    filled = np.where(np.isnan(images), 16.0, images)
    assert float(pre.mean) == pytest.approx(filled.mean())
    assert float(pre.scale) == pytest.approx(filled.std(), rel=1e-6)


def _blob() -> torch.Tensor:
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 16.0
    return x


def _centre(x: torch.Tensor) -> torch.Tensor:
    grid = torch.arange(8.0)
    mass = x.sum(dim=(1, 2, 3))
    return torch.stack([(x.sum(dim=(1, 2)) * grid).sum(-1) / mass,
                        (x.sum(dim=(1, 3)) * grid).sum(-1) / mass], 1)


@pytest.mark.parametrize(("shift", "rotation", "noise", "check"), [
    # eval mode is checked separately; here training mode:
    (0.0, 0.0, 0.0, "identity"),      # nothing to do: the batch comes back unchanged
    (1.0, 0.0, 0.0, "shifted"),       # the blob's centre moves, by at most one pixel per axis
    (0.0, 30.0, 0.0, "same-centre"),  # a rotation about the centre keeps the blob's centre
    (0.0, 0.0, 0.5, "noisy"),         # noise of the given standard deviation, nothing else
])
def test_augmentation_cases(shift: float, rotation: float, noise: float, check: str) -> None:
    aug = Augment(shift, rotation, noise).train()
    x = _blob()
    torch.manual_seed(0)
    out = aug(x)
    if check == "identity":
        torch.testing.assert_close(out, x)
    elif check == "shifted":
        moved = (_centre(out) - _centre(x)).abs()
        assert moved.max() <= 1.0 + 1e-4 and moved.max() > 0.3
    elif check == "same-centre":
        torch.testing.assert_close(_centre(out), _centre(x), atol=0.05, rtol=0)
        assert not torch.allclose(out, x)
    else:
        assert float((out - x).std()) == pytest.approx(0.5, rel=0.05)


def test_augmentation_is_identity_in_eval_mode() -> None:
    aug = Augment(1.0, 12.0, 0.5).eval()
    x = _blob()
    assert aug(x) is x


@pytest.mark.parametrize(("params", "n_features", "message"), [
    (CNNParams(), 64, None),                                   # 8x8, one channel
    (CNNParams(image_shape=[3, 2, 2]), 12, None),              # explicit channels
    (CNNParams(), 30, "30 features are not a square"),         # breast_cancer is no image
    (CNNParams(image_shape=[1, 4, 4]), 64, "holds 16 pixels, the data has 64 features"),
])
def test_image_shape_from_the_features(params: CNNParams, n_features: int, message: str | None) -> None:
    if message is None:
        c, h, w = image_shape(params, n_features)
        assert c * h * w == n_features
    else:
        with pytest.raises(ValueError, match=message):
            image_shape(params, n_features)


def test_cnn_on_non_image_data_is_a_data_error(tmp_path: object) -> None:
    settings = TrainingSettings(home=tmp_path, progress=False)
    config = TrainingConfig.from_settings(settings, architecture="cnn", epochs=1)
    with pytest.raises(DataError, match=r"^breast_cancer: architecture 'cnn' needs the features "
                                        r"to form an image: 30 features are not a square"):
        train_model(load_data("breast_cancer"), name="x", options=TrainOptions(
            config=config, settings=settings))
