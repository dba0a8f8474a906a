"""The human-readable drift report: Evidently's own HTML, rendered off the hot path.

The numbers that drive metrics and the policy come from :mod:`monitoring.drift` over the whole
window; the report is Evidently's ``DataDriftPreset`` (with the same method, threshold and drift
share) over a seeded sample of the window and the reference, at most ``max_rows`` rows each,
because the preset's charts cost seconds per 100k rows. What the preset has no widget for, the
joint-distribution check and the window's data quality (over the whole window, as the sidecar
judged it), follows Evidently's report as a section of its own (:func:`sidecar_section`), and so
does each feature's drift beside its global importance (:func:`importance_section`: the mean
absolute SHAP attribution on the version's graph, :mod:`monitoring.importance`), so a reader sees
whether a drifted feature matters to the model.
Reports are written atomically and the newest ``keep`` are kept per model.

Example::

    path = write_drift_report(reports_dir, "churn", 3, reference_df, window_df,
                              method=None, threshold=None, drift_share=0.5)
"""

from __future__ import annotations

import html
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from modelloop.registry import Registry
from monitoring.data_quality import DataQuality
from monitoring.drift import DriftResult, UnknownShare
from monitoring.importance import version_importance
from monitoring.multivariate import MultivariateDrift

log = logging.getLogger(__name__)
LATEST = "latest.html"


def latest_report(reports_dir: Path, model: str) -> Path | None:
    path = reports_dir / model / LATEST
    return path if path.exists() else None


def write_drift_report(
    reports_dir: Path, model: str, version: int, reference: pd.DataFrame, current: pd.DataFrame,
    *, method: str | None, threshold: float | None, drift_share: float, max_rows: int = 20_000,
    keep: int = 10, prediction_column: str | None = None, calibrated: bool = False,
    extra_html: str = "", categorical: Sequence[str] = (),
) -> Path:
    """Render Evidently's data drift report and make it the model's ``latest.html``.
    ``calibrated``: ``method`` and ``threshold`` are the numeric features' (KS at the Bonferroni
    threshold); the prediction and the ``categorical`` features (string columns) keep
    Evidently's default test for categories.
    ``extra_html`` (:func:`sidecar_section`) is placed after Evidently's report."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    ref = _sample(reference, max_rows)
    cur = _sample(current, max_rows)
    categories = [*categorical, *([prediction_column] if prediction_column else [])]
    numerical = [c for c in cur.columns if c not in categories]
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categories)
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
    if extra_html:
        page = tmp.read_text(encoding="utf-8")
        at = page.rfind("</body>")
        tmp.write_text(page[:at] + extra_html + page[at:] if at >= 0 else page + extra_html,
                       encoding="utf-8")
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


def sidecar_section(joint: MultivariateDrift | None, quality: DataQuality | None,
                    unknown: Sequence[UnknownShare] = ()) -> str:
    """The joint-distribution check, the categorical features' unknown values and the window's
    data quality as an HTML section."""
    rows = []
    for u in unknown:
        verdict = "risen" if u.risen else "no rise"
        rows.append((f"Unknown values of {u.column}",
                     f"{verdict}: {u.share:.1%} of the window's values, {u.reference_share:.1%} "
                     f"of the reference's (p-value {u.p_value:.3g}, threshold {u.threshold:.3g})"))
    if joint is not None:
        verdict = "drifted: " + ", ".join(joint.pairs) if joint.drifted else "no drift"
        rows.append(("Joint distribution (pairs of features)",
                     f"{verdict}; smallest p-value {joint.statistic:.3g}, threshold "
                     f"{joint.threshold:.3g}, {joint.tested_pairs} pairs tested"))
    if quality is not None:
        rows.append(("Rows with a feature outside the reference's range",
                     f"{quality.out_of_support_rows_share:.1%} of {quality.rows}"))
        for f in quality.features:
            if f.missing_share or f.out_of_support_share:
                rows.append((f"Feature {f.feature}", f"missing {f.missing_share:.1%}, outside "
                             f"the reference's range {f.out_of_support_share:.1%}"))
    if not rows:
        return ""
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                    for k, v in rows)
    return ('<section id="modelloop-sidecar" style="font-family: sans-serif; margin: 2em">'
            "<h2>Joint drift and data quality (the sidecar's checks)</h2>"
            f'<table cellpadding="4">{cells}</table></section>')


def importance_section(registry: Registry, model: str, version: int, drift: DriftResult, *,
                       nice: int = 10) -> str:
    """Each feature's drift test beside its global importance (mean |SHAP| over the reference
    sample, and its share of the total), most important first, as an HTML section."""
    importance = version_importance(registry, model, version, nice=nice)
    values = importance.values
    total = sum(values.values()) or 1.0
    tests = {c.column: c for c in drift.features}
    names = sorted(tests, key=lambda f: -values.get(f, 0.0))
    rows = []
    for name in names:
        c = tests[name]
        kind = "p-value" if c.p_value else "distance"
        verdict = "drifted" if c.drifted else "-"
        if name in values:
            weight = f"{values[name]:.4g}</td><td>{values[name] / total:.1%}"
        else:
            weight = "</td><td>"
        rows.append(f"<tr><th>{html.escape(name)}</th><td>{html.escape(c.method)} {kind} "
                    f"{c.score:.3g}</td><td>{verdict}</td><td>{weight}</td></tr>")
    note = (f"<p>No importance: {html.escape(importance.note)}</p>" if importance.note else
            "<p>Importance: each feature's mean absolute SHAP attribution (permutation SHAP on "
            "the version's ONNX graph, summed over a classifier's class probabilities) over its "
            "reference sample.</p>")
    return ('<section id="modelloop-importance" style="font-family: sans-serif; margin: 2em">'
            f"<h2>Drift and importance by feature ({html.escape(model)} v{version})</h2>{note}"
            '<table cellpadding="4"><tr><th>feature</th><th>drift test</th><th>drift</th>'
            f"<th>importance</th><th>share</th></tr>{''.join(rows)}</table></section>")
