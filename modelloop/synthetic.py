"""A seedable synthetic tabular classification task with controllable drift.

Used to train the demo model and to inject drift in tests and in the demo: covariate shift moves
chosen features' distribution; concept shift changes how the label depends on the features, so a
model trained before the shift loses accuracy and one retrained on new labels recovers it.

Example::

    task = SyntheticTask(seed=0)
    train = task.sample(5000)                       # features f00..f19 and "target"
    drifted = task.sample(2000, shift={"f03": 2.0, "f07": -1.5}, concept=1.0)

Pure numpy and pandas, so every package (and the demo) can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

TARGET = "target"


@dataclass
class SyntheticTask:
    """A fixed labelling function over ``n_features`` numeric features (some informative).

    Features have different scales and offsets (so standardization matters); the label is a
    noisy non-linear function of the first ``n_informative`` features.
    """

    n_features: int = 20
    n_informative: int = 8
    n_classes: int = 2
    noise: float = 0.3
    seed: int = 0
    _means: np.ndarray = field(init=False, repr=False)
    _scales: np.ndarray = field(init=False, repr=False)
    _w: np.ndarray = field(init=False, repr=False)
    _w_shift: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.n_informative <= self.n_features:
            raise ValueError("n_informative must be between 1 and n_features")
        if self.n_classes < 2:
            raise ValueError("n_classes must be at least 2")
        rng = np.random.default_rng(self.seed)
        self._means = rng.uniform(-5, 5, self.n_features)
        self._scales = rng.uniform(0.5, 20, self.n_features)
        self._w = rng.normal(0, 1, (self.n_informative, self.n_classes))
        # the concept after a full shift: a different dependence on the same features
        self._w_shift = rng.normal(0, 1, (self.n_informative, self.n_classes))

    @property
    def feature_names(self) -> list[str]:
        return [f"f{i:02d}" for i in range(self.n_features)]

    def sample(
        self,
        n: int,
        *,
        seed: int | None = None,
        shift: Mapping[str, float] | None = None,
        concept: float = 0.0,
        missing: float = 0.0,
    ) -> pd.DataFrame:
        """Draw ``n`` rows with features and ``target``.

        ``shift`` moves each named feature's mean by that many of its standard deviations
        (covariate shift); ``concept`` in [0, 1] blends the labelling function towards a new one
        (concept shift); ``missing`` is the share of feature values replaced by NaN.
        """
        if not 0.0 <= concept <= 1.0:
            raise ValueError("concept must be in [0, 1]")
        rng = np.random.default_rng(self.seed + 1 if seed is None else seed)
        z = rng.normal(0, 1, (n, self.n_features))
        # a little correlation between neighbouring features, as in real tables
        z[:, 1:] = 0.8 * z[:, 1:] + 0.2 * z[:, :-1]
        names = self.feature_names
        for fname, delta in (shift or {}).items():
            if fname not in names:
                raise ValueError(f"unknown feature {fname!r} in shift (features: f00..f{len(names) - 1:02d})")
            z[:, names.index(fname)] += delta
        zi = z[:, : self.n_informative]
        w = (1 - concept) * self._w + concept * self._w_shift
        logits = np.tanh(zi) @ w + 0.5 * (zi**2 - 1) @ (w * 0.3) + rng.normal(0, self.noise, (n, self.n_classes))
        y = logits.argmax(axis=1)
        x = z * self._scales + self._means
        if missing > 0:
            x[rng.random(x.shape) < missing] = np.nan
        df = pd.DataFrame(x.astype(np.float32), columns=names)
        df[TARGET] = y.astype(np.int64)
        return df


CHURN_TARGET = "churned"
CHURN_CATEGORICAL = ("plan", "region", "channel")
CHURN_NUMERIC = ("tenure_months", "monthly_charges", "support_calls", "usage_gb", "age")
NEW_PLAN = "ultra"
"""The plan value only ``churn_frame(..., new_category=True)`` draws: a new product in
production data, with the highest churn."""


def churn_frame(rows: int, seed: int, new_category: bool = False) -> pd.DataFrame:
    """A churn-like table: 3 text columns (``plan``, ``region``, ``channel``; about 3% of
    ``channel`` missing, ``region`` with a rare value), 5 numeric ones and ``churned`` (0/1,
    about 10% positives) that depends on the plan and region as much as on the numbers.
    ``new_category`` gives a quarter of the rows the plan :data:`NEW_PLAN`, which churns most::

        frame = churn_frame(2000, seed=0)   # columns: CHURN_CATEGORICAL, CHURN_NUMERIC, churned
    """
    rng = np.random.default_rng(seed)
    plans = np.array(["basic", "plus", "pro", "family"])
    plan = plans[rng.choice(len(plans), size=rows, p=[0.4, 0.3, 0.2, 0.1])].astype(object)
    if new_category:
        plan[rng.random(rows) < 0.25] = NEW_PLAN
    regions = np.array(["north", "south", "east", "west", "islands"])
    region = regions[rng.choice(len(regions), size=rows, p=[0.3, 0.3, 0.2, 0.195, 0.005])]
    channel = np.array(["web", "store", "phone"])[rng.integers(0, 3, rows)].astype(object)
    channel[rng.random(rows) < 0.03] = None
    tenure = rng.gamma(2.0, 12.0, rows)
    charges = rng.normal(60, 20, rows).clip(10, None)
    calls = rng.poisson(1.5, rows).astype(np.float64)
    usage = rng.lognormal(2.5, 0.6, rows)
    age = rng.integers(18, 80, rows).astype(np.float64)
    plan_effect = {"basic": 0.8, "plus": -0.3, "pro": -1.2, "family": -0.6, NEW_PLAN: 2.5}
    region_effect = {"north": -0.5, "south": 0.6, "east": 0.0, "west": -0.2, "islands": 0.0}
    logit = (-2.6 + np.array([plan_effect[p] for p in plan])
             + np.array([region_effect[r] for r in region])
             - 0.04 * (tenure - 24) + 0.02 * (charges - 60) + 0.45 * (calls - 1.5))
    churned = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return pd.DataFrame({
        "plan": plan, "region": region, "channel": channel,
        "tenure_months": tenure.round(1), "monthly_charges": charges.round(2),
        "support_calls": calls, "usage_gb": usage.round(2), "age": age,
        CHURN_TARGET: churned,
    })
