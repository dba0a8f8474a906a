#!/usr/bin/env python
"""Class weights on imbalanced data: the rare class's precision, recall and F1 on the same test
split with ``class_weight`` none and balanced; prints a table (results go to BENCHMARKS.md).

Two tables of 4,000 rows with about 10% positives, per seed: ``churn`` (the default),
``modelloop.synthetic.churn_frame``'s 3 text columns (plan, region, channel: coded in the graph)
and 5 numeric ones; ``numeric``, 8 numeric features (5 informative) from scikit-learn's
make_classification, 2% of labels flipped.

    .venv/bin/python scripts/bench_imbalance.py [--data churn|numeric] [--seeds 3] [--epochs 60]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from sklearn.datasets import make_classification

from modelloop.registry import Registry
from modelloop.synthetic import CHURN_TARGET, churn_frame
from training.config import TrainingConfig
from training.pipeline import TrainOptions, train_and_register
from training.settings import TrainingSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--data", choices=("churn", "numeric"), default="churn")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    table = Table(title="The rare class (about 10% of rows) on the test split")
    for col in ("seed", "class_weight", "precision", "recall", "F1", "accuracy", "ROC-AUC"):
        table.add_column(col)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        settings = TrainingSettings(home=home, epochs=args.epochs, progress=False)
        for seed in range(args.seeds):
            frame = _table(args.data, seed)
            for weighting in ("none", "balanced"):
                config = TrainingConfig.from_settings(settings, target="churned",
                                                      class_weight=weighting)
                meta = train_and_register(frame, name=f"s{seed}-{weighting}",
                                          options=TrainOptions(config=config, settings=settings),
                                          registry=Registry(home / "r"))
                rare = meta.evaluation["per_class"]["yes"]
                table.add_row(str(seed), weighting, f"{rare['precision']:.3f}",
                              f"{rare['recall']:.3f}", f"{rare['f1']:.3f}",
                              f"{meta.metrics['accuracy']:.3f}", f"{meta.metrics['roc_auc']:.3f}")
    Console(width=120).print(table)


def _table(kind: str, seed: int) -> pd.DataFrame:
    if kind == "churn":
        frame = churn_frame(4000, seed=seed)
        frame["churned"] = np.where(frame.pop(CHURN_TARGET) == 1, "yes", "no")
        return frame
    x, y = make_classification(n_samples=4000, n_features=8, n_informative=5, weights=[0.9],
                               class_sep=0.7, flip_y=0.02, random_state=seed)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(8)])
    frame["churned"] = np.where(y == 1, "yes", "no")
    return frame


if __name__ == "__main__":
    main()
