"""The human-readable drift report: Evidently's own HTML, rendered off the hot path.

The numbers that drive metrics and the policy come from :mod:`monitoring.drift` over the whole
window; the report is Evidently's ``DataDriftPreset`` (with the same method, threshold and drift
share) over a seeded sample of the window and the reference, at most ``max_rows`` rows each,
because the preset's charts cost seconds per 100k rows. Reports are written atomically and the
newest ``keep`` are kept per model.

Example::

    path = write_drift_report(reports_dir, "churn", 3, reference_df, window_df,
                              method=None, threshold=None, drift_share=0.5)
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)
LATEST = "latest.html"


def latest_report(reports_dir: Path, model: str) -> Path | None:
    path = reports_dir / model / LATEST
    return path if path.exists() else None


def write_drift_report(
    reports_dir: Path, model: str, version: int, reference: pd.DataFrame, current: pd.DataFrame,
    *, method: str | None, threshold: float | None, drift_share: float, max_rows: int = 20_000,
    keep: int = 10, prediction_column: str | None = None, calibrated: bool = False,
) -> Path:
    """Render Evidently's data drift report and make it the model's ``latest.html``.
    ``calibrated``: ``method`` and ``threshold`` are the features' (KS at the Bonferroni
    threshold); the prediction, a categorical column here, keeps Evidently's default test."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    ref = _sample(reference, max_rows)
    cur = _sample(current, max_rows)
    numerical = [c for c in cur.columns if c != prediction_column]
    categorical = [prediction_column] if prediction_column else []
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    if calibrated:
        preset = DataDriftPreset(num_method=method, num_threshold=threshold,
                                 drift_share=drift_share)
    else:
        preset = DataDriftPreset(method=method, threshold=threshold, drift_share=drift_share)
    snapshot = Report([preset], metadata={"model": model, "version": str(version)}).run(
        Dataset.from_pandas(cur, data_definition=definition),
        Dataset.from_pandas(ref, data_definition=definition),
    )
    folder = reports_dir / model
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):  # left by a process that stopped while rendering
        if time.time() - stale.stat().st_mtime > 3600:
            stale.unlink(missing_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    final = folder / f"drift-v{version}-{stamp}.html"
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    snapshot.save_html(str(tmp))
    os.replace(tmp, final)
    latest_tmp = folder / f".{LATEST}.{os.getpid()}.tmp"
    latest_tmp.write_bytes(final.read_bytes())
    os.replace(latest_tmp, folder / LATEST)
    for old in sorted(folder.glob("drift-v*.html"), key=lambda p: p.stat().st_mtime)[:-keep]:
        old.unlink(missing_ok=True)
    log.info("drift report for %s v%d written to %s", model, version, final)
    return final


def _sample(df: pd.DataFrame, max_rows: int) -> pd.DataFrame:
    if len(df) <= max_rows:
        return df.reset_index(drop=True)
    return df.sample(n=max_rows, random_state=0).reset_index(drop=True)
