"""Policy metrics and their observers: one registry (monitoring/evaluate.py), checked on import,
so a metric without an observer stops the sidecar instead of its rules never firing."""

from __future__ import annotations

import pytest

from monitoring.evaluate import GPU_OBSERVERS, MODEL_OBSERVERS, PROCESS_OBSERVERS, check_observers
from monitoring.policy import METRICS, MetricSpec


def test_every_metric_has_an_observer_of_its_scope() -> None:
    check_observers()
    assert set(METRICS) == {*MODEL_OBSERVERS, *PROCESS_OBSERVERS, *GPU_OBSERVERS}


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        # a metric added without an observer
        ({**METRICS, "new_metric": MetricSpec("ceiling", "model", "ratio")},
         "no observer for new_metric (model)"),
        # an observer left behind by its metric
        ({k: v for k, v in METRICS.items() if k != "cpu"}, "no such metric for cpu (process)"),
        # a metric of another scope than its observer's
        ({**METRICS, "cpu": MetricSpec("ceiling", "model", "cores")},
         "no observer for cpu (model); no such metric for cpu (process)"),
    ],
)
def test_metrics_and_observers_that_disagree_are_refused(metrics: dict[str, MetricSpec],
                                                          message: str) -> None:
    with pytest.raises(RuntimeError) as exc:
        check_observers(metrics)
    assert str(exc.value) == f"policy metrics and observers disagree: {message}"
