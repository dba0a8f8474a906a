"""The training loop: determinism, early stopping, penalties, schedules, failure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelloop.schemas import Task
from training.config import TrainingConfig
from training.data import TabularDataset, load_data, split_dataset
from training.models import MLPParams, TabularNet, build_model
from training.settings import TrainingSettings
from training.trainer import FitResult, TrainingError, cpu_threads, fit, resolve_device, seeded


@pytest.fixture(scope="module")
def data() -> TabularDataset:
    return load_data("synthetic", rows=600, seed=0)


def _config(**overrides: object) -> TrainingConfig:
    return TrainingConfig.from_settings(TrainingSettings(), **{"epochs": 6, **overrides})


def _train(ds: TabularDataset, config: TrainingConfig, params: MLPParams | None = None
           ) -> tuple[TabularNet, FitResult]:
    split = split_dataset(ds, val_fraction=config.val_fraction,
                          test_fraction=config.test_fraction, seed=config.seed)
    with seeded(config.seed):
        net = build_model("mlp", params or MLPParams(), train_features=ds.features[split.train],
                          task=ds.task, n_outputs=2)
    with cpu_threads(1):  # as the pipeline does (MODELLOOP_TRAINING_THREADS)
        result = fit(net, net.loss,
                     (torch.from_numpy(ds.features[split.train]), net.encode_target(ds.target[split.train])),
                     (torch.from_numpy(ds.features[split.val]), net.encode_target(ds.target[split.val])),
                     config, progress=False)
    return net, result


def test_same_seed_gives_identical_weights(data: TabularDataset) -> None:
    a, _ = _train(data, _config(seed=7))
    b, _ = _train(data, _config(seed=7))
    c, _ = _train(data, _config(seed=8))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_early_stopping_restores_the_best_epoch() -> None:
    # few rows, a wide net and a high learning rate: it overfits within a few epochs
    ds = load_data("synthetic", rows=200, seed=0)
    config = _config(epochs=200, patience=5, learning_rate=0.02, scheduler="none")
    net, result = _train(ds, config, MLPParams(hidden=[256, 256], dropout=0.0))
    assert result.stopped_early and result.epochs_run == result.best_epoch + 5 < 200
    last = result.history[-1]
    assert last.val_loss > result.best_val_loss
    assert result.history[result.best_epoch - 1].val_loss == result.best_val_loss
    # the model holds the best epoch's weights, not the last one's
    split = split_dataset(ds, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                          seed=config.seed)
    with torch.no_grad():
        val = net.loss(net(torch.from_numpy(ds.features[split.val])),
                       net.encode_target(ds.target[split.val]))
    assert float(val) == pytest.approx(result.best_val_loss, rel=1e-5)
    assert not net.training


def test_l1_penalty_shrinks_the_weights(data: TabularDataset) -> None:
    def weight_mass(net: TabularNet) -> float:
        return sum(float(p.detach().abs().sum()) for p in net.parameters() if p.ndim >= 2)

    plain, _ = _train(data, _config(l1=0.0))
    sparse, _ = _train(data, _config(l1=0.01))
    assert weight_mass(sparse) < 0.8 * weight_mass(plain)


def test_cosine_schedule_anneals_the_learning_rate(data: TabularDataset) -> None:
    _, result = _train(data, _config(scheduler="cosine", epochs=6, patience=50))
    rates = [h.learning_rate for h in result.history]
    assert rates[0] == pytest.approx(1e-3) and rates == sorted(rates, reverse=True)
    assert rates[-1] < 0.1 * rates[0]


def test_plateau_schedule_halves_the_rate_when_validation_stalls() -> None:
    ds = load_data("synthetic", rows=200, seed=0)
    _, result = _train(ds, _config(epochs=60, patience=9, learning_rate=0.02, scheduler="plateau"),
                       MLPParams(hidden=[256, 256], dropout=0.0))
    rates = sorted({h.learning_rate for h in result.history}, reverse=True)
    assert rates[:2] == [pytest.approx(0.02), pytest.approx(0.01)]


def test_a_diverging_loss_stops_training_with_a_clear_error() -> None:
    x = torch.randn(64, 3)
    y = torch.full((64, 1), float("nan"))  # the loss cannot be finite
    net = torch.nn.Linear(3, 1)
    with pytest.raises(TrainingError, match=r"^training diverged at epoch 1 .*lower the learning rate"):
        fit(net, torch.nn.functional.mse_loss, (x, y), (x, y), _config(), progress=False)


def test_fit_trains_any_module_with_any_loss() -> None:
    """The loop is not tied to TabularNet: a plain regression module and loss."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.3
    net = torch.nn.Linear(4, 1)
    result = fit(net, torch.nn.functional.mse_loss, (x[:200], y[:200]), (x[200:], y[200:]),
                 _config(epochs=80, learning_rate=0.05, weight_decay=0.0, patience=80,
                         scheduler="none"), progress=False)
    assert result.best_val_loss < 0.01


def test_seeded_leaves_no_global_state_behind() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    was = torch.are_deterministic_algorithms_enabled()
    with seeded(5):
        torch.rand(10)
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.rand(3), expected)
    assert torch.are_deterministic_algorithms_enabled() == was


def test_cpu_threads_is_restored() -> None:
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    with cpu_threads(0):  # 0 leaves torch's choice alone
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_device_auto_falls_back_to_cpu_and_cuda_is_checked() -> None:
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(TrainingError, match="no GPU is available"):
            resolve_device("cuda")


def test_regression_target_is_learned_in_standard_units() -> None:
    ds = load_data("diabetes")
    net = build_model("mlp", MLPParams(), train_features=ds.features, task=Task.regression,
                      n_outputs=1, train_target=ds.target).eval()
    encoded = net.encode_target(ds.target)
    assert float(encoded.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(encoded.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():  # infer() maps a standardized output back to the target's units
        out = net.infer(torch.from_numpy(ds.features[:4]))
        raw = net(torch.from_numpy(ds.features[:4]))
    np.testing.assert_allclose(out, raw * ds.target.std() + ds.target.mean(), rtol=1e-5)


def _val_accuracy(net: TabularNet, ds: TabularDataset, config: TrainingConfig) -> float:
    split = split_dataset(ds, val_fraction=config.val_fraction,
                          test_fraction=config.test_fraction, seed=config.seed)
    with torch.no_grad():
        out = net(torch.from_numpy(ds.features[split.test])).argmax(dim=1).numpy()
    return float(np.mean(out == ds.target[split.test]))


@pytest.mark.parametrize(
    ("optimizer", "learning_rate", "extra"),
    [("adamw", 1e-3, {}), ("adam", 1e-3, {}), ("sgd", 0.05, {"nesterov": True}),
     ("rmsprop", 1e-3, {"momentum": 0.5})],
)
def test_each_optimiser_trains_and_is_the_one_used(
        data: TabularDataset, optimizer: str, learning_rate: float, extra: dict[str, object]
) -> None:
    config = _config(optimizer=optimizer, learning_rate=learning_rate, epochs=30, **extra)
    net, _ = _train(data, config)
    assert _val_accuracy(net, data, config) > 0.8
    # another optimiser from the same seed ends at other weights
    other, _ = _train(data, _config(optimizer="adamw" if optimizer != "adamw" else "sgd",
                                    learning_rate=learning_rate, epochs=30))
    assert not all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                     other.state_dict().values(), strict=True))


def test_an_unknown_optimiser_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="'adamw', 'adam', 'sgd' or 'rmsprop'"):
        _config(optimizer="lbfgs")


def test_balanced_class_weights() -> None:
    from training.trainer import balanced_class_weights

    weights = balanced_class_weights(np.array([0] * 90 + [1] * 10), 3)
    # rows / (classes x class rows); a class with no rows weighs 1
    assert weights.tolist() == pytest.approx([100 / (3 * 90), 100 / (3 * 10), 1.0])


@pytest.mark.slow
def test_balanced_class_weights_raise_the_rare_class_recall(tmp_path) -> None:
    import pandas as pd
    from sklearn.datasets import make_classification

    from modelloop.registry import Registry
    from training.pipeline import TrainOptions, train_and_register

    x, y = make_classification(n_samples=2000, n_features=8, n_informative=5, weights=[0.9],
                               class_sep=0.7, flip_y=0.02, random_state=0)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(8)])
    frame["churned"] = np.where(y == 1, "yes", "no")  # about 10% "yes"
    settings = TrainingSettings(home=tmp_path, epochs=40, progress=False)
    rare = {}
    for weighting in ("none", "balanced"):
        config = TrainingConfig.from_settings(settings, target="churned", class_weight=weighting)
        meta = train_and_register(frame, name=f"churn-{weighting}",
                                  options=TrainOptions(config=config, settings=settings),
                                  registry=Registry(tmp_path / "registry"))
        assert meta.config["class_weight"] == weighting  # stored with the version
        rare[weighting] = meta.evaluation["per_class"]["yes"]
    # the same test split: the rare class is found more often (at some cost in precision)
    assert rare["balanced"]["recall"] > rare["none"]["recall"] + 0.05, rare
    assert rare["balanced"]["support"] == rare["none"]["support"]
