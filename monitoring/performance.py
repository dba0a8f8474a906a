"""Latency quantiles from the events, and the error rate from serving's request counters.

An event is a predicted row, so events alone cannot count the requests that failed; the error
rate comes from serving's own ``modelloop_serving_requests_total{model,route,code}`` counters
(scraped from ``serving_metrics_url``): the share of requests answered with a 5xx over the time
window, from the counters' increase (restarts of serving, which reset the counters, are detected
and handled like Prometheus's ``increase``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)
QUANTILES = (0.5, 0.95, 0.99)
REQUESTS = "modelloop_serving_requests"


def latency_quantiles(latency_s: np.ndarray) -> dict[float, float] | None:
    """p50/p95/p99 of the latencies (seconds); None when there are none."""
    values = np.asarray(latency_s, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    return dict(zip(QUANTILES, (float(q) for q in np.quantile(values, QUANTILES)), strict=True))


class ErrorRate(NamedTuple):
    """The share of serving's requests answered with a 5xx over the window, and how many
    requests that share is of."""

    rate: float
    requests: int


@dataclass(frozen=True)
class RequestCounts:
    total: float
    errors: float


def parse_request_counts(text: str) -> dict[str, RequestCounts]:
    """Per model: requests and 5xx answers, summed over routes, from a Prometheus exposition."""
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != REQUESTS:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            model = sample.labels.get("model", "")
            acc = out.setdefault(model, [0.0, 0.0])
            acc[0] += sample.value
            if str(sample.labels.get("code", "")).startswith("5"):
                acc[1] += sample.value
    return {m: RequestCounts(t, e) for m, (t, e) in out.items()}


class ErrorRateTracker:
    """Keeps scraped counters over the time window and answers the error rate per model."""

    def __init__(self, url: str | None, window_s: float, timeout_s: float = 5.0) -> None:
        self.url = url
        self.window_s = window_s
        self.timeout_s = timeout_s
        # per model: (time, cumulative total, cumulative errors), reset-corrected
        self._series: dict[str, deque[tuple[float, float, float]]] = {}
        self._last_raw: dict[str, RequestCounts] = {}
        self._offset: dict[str, list[float]] = {}
        self.last_error: str | None = None

    def scrape(self, now: float | None = None) -> bool:
        """Read serving's counters once; False (and ``last_error`` set) when it cannot."""
        if not self.url:
            return False
        now = time.time() if now is None else now
        try:
            resp = httpx.get(self.url, timeout=self.timeout_s)
            resp.raise_for_status()
            counts = parse_request_counts(resp.text)
        except (httpx.HTTPError, ValueError) as exc:
            if self.last_error is None:
                log.warning("cannot read serving metrics at %s: %s", self.url, exc)
            self.last_error = str(exc)
            return False
        self.last_error = None
        self.observe(counts, now)
        return True

    def observe(self, counts: dict[str, RequestCounts], now: float) -> None:
        for model, c in counts.items():
            prev = self._last_raw.get(model)
            off = self._offset.setdefault(model, [0.0, 0.0])
            if prev is not None and (c.total < prev.total or c.errors < prev.errors):
                off[0] += prev.total  # the counters restarted from zero
                off[1] += prev.errors
            self._last_raw[model] = c
            series = self._series.setdefault(model, deque())
            series.append((now, c.total + off[0], c.errors + off[1]))
            while len(series) > 2 and series[1][0] <= now - self.window_s:
                series.popleft()

    def error_rate(self, model: str) -> ErrorRate | None:
        """5xx share of the requests over the window, and how many requests that is; None
        before two scrapes or without requests in between."""
        series = self._series.get(model)
        if not series or len(series) < 2:
            return None
        _, total0, err0 = series[0]
        _, total1, err1 = series[-1]
        if total1 <= total0:
            return None
        return ErrorRate((err1 - err0) / (total1 - total0), int(total1 - total0))
