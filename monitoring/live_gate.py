"""The live gate: a challenger shadowing production (:mod:`serving.shadow`) is promoted when it
beats the champion on the same live labelled requests, with significance, or retired.

A retraining job registers its winner as ``challenger`` instead of promoting it when
``MODELLOOP_TRAINING_RETRAIN_LIVE_GATE`` (``modelloop retrain --live-gate``) is on (the offline gate of :mod:`training.retrain` still has to
pass first). Serving then scores a copy of production's traffic with it; the sidecar stores its
answers beside the champion's events, and labels join both by request id. At each check,
:class:`LiveGate` takes the labelled requests both answered since the challenger was named and
judges them with a paired test:

- classification (and anomaly flags): McNemar's exact test on the requests where exactly one of
  the two was right (a binomial test of the challenger's wins among them against 1/2);
- regression: Wilcoxon's signed-rank test on the two absolute errors of each request.

The test is taken at fixed looks, when the pairs reach ``min_rows``, 2x, 4x, ... (oldest pairs
first, so a look always sees the same rows), and look ``k`` (from 0) spends ``alpha / 2**(k+1)``
of the false-decision rate: over all looks the chance of promoting a challenger that is no
better, or retiring one that is no worse, stays below ``alpha`` (Bonferroni over the looks),
although the check runs every minute. The challenger is promoted (through the registry's checked
promotion; the old champion becomes ``previous``) when it wins, retired (its alias removed) when
it loses, and retired when ``max_age_s`` passes without a decision. Every decision is logged
with its numbers, counted in ``modelloop_live_gate_decisions_total`` and written to the model's
registry history, where ``modelloop models history`` shows it.

Example::

    verdict = judge(Task.classification, labels, champion_pred, challenger_pred,
                    min_rows=200, alpha=0.05)
    verdict.action   # "promote", "retire" or "wait"
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

import numpy as np
from scipy import stats

from modelloop.registry import Registry, RegistryError
from modelloop.schemas import ALIAS_CHALLENGER, ALIAS_PRODUCTION, ModelMetadata, Task
from monitoring.metrics import MonitorMetrics
from monitoring.store import EventStore

log = logging.getLogger(__name__)

MAX_LOOKS = 20


class Action(StrEnum):
    promote = "promote"
    retire = "retire"
    wait = "wait"


@dataclass(frozen=True)
class Verdict:
    """One judgement of a challenger against the champion on live labelled requests."""

    action: Action
    rows: int
    """Labelled requests both answered (the pairs)."""
    judged_rows: int
    """Pairs the test used: the last look's size (0 before the first look)."""
    champion_wins: int
    """Judged requests where only the champion was right (regression: its error was smaller)."""
    challenger_wins: int
    champion_score: float
    """Accuracy (regression: mean absolute error) of each on the judged pairs (all pairs before
    the first look)."""
    challenger_score: float
    p_value: float | None
    alpha: float
    """The share of the false-decision rate this look spends."""
    reason: str

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "action": str(self.action)}


def looks(rows: int, min_rows: int) -> int:
    """How many looks ``rows`` pairs have reached: sizes ``min_rows * 2**k``."""
    k = 0
    while k < MAX_LOOKS and rows >= min_rows * 2**k:
        k += 1
    return k


def judge(task: Task, labels: np.ndarray, champion: np.ndarray, challenger: np.ndarray, *,
          min_rows: int, alpha: float) -> Verdict:
    """The verdict on pairs oldest first (module docstring): promote, retire or wait."""
    rows = len(labels)
    k = looks(rows, min_rows)
    n = min_rows * 2 ** (k - 1) if k else rows
    y, a, b = labels[:n], champion[:n], challenger[:n]
    if task == Task.regression:
        ea, eb = np.abs(a - y), np.abs(b - y)
        score_a, score_b = float(ea.mean()) if n else 0.0, float(eb.mean()) if n else 0.0
        a_wins, b_wins = int(np.sum(ea < eb)), int(np.sum(eb < ea))
        p = _wilcoxon(ea, eb) if k else None
        d = eb - ea
        d = d[d != 0]
        ranks = stats.rankdata(np.abs(d))
        better = bool(ranks[d < 0].sum() > ranks[d > 0].sum())  # the side the signed-rank test weighs
    else:
        ra, rb = a == y, b == y
        score_a, score_b = float(ra.mean()) if n else 0.0, float(rb.mean()) if n else 0.0
        a_wins, b_wins = int(np.sum(ra & ~rb)), int(np.sum(rb & ~ra))
        p = float(stats.binomtest(b_wins, a_wins + b_wins, 0.5).pvalue) if k and a_wins + b_wins else None
        better = b_wins > a_wins
    spent = alpha / 2**k if k else alpha / 2
    v = Verdict(Action.wait, rows=rows, judged_rows=n if k else 0, champion_wins=a_wins,
                challenger_wins=b_wins, champion_score=score_a, challenger_score=score_b,
                p_value=p, alpha=spent, reason="")
    metric = "MAE" if task == Task.regression else "accuracy"
    scores = (f"{metric} {score_b:.4f} against {score_a:.4f} on {n} labelled requests "
              f"({b_wins} won by the challenger, {a_wins} by the champion")
    if k == 0:
        return replace(v, reason=f"{rows} of {min_rows} labelled requests needed")
    if p is None or p >= spent:
        shown = "n/a" if p is None else f"{p:.3g}"
        return replace(v, reason=f"no significant difference yet: {scores}, p {shown} >= {spent:.3g})")
    if better:
        return replace(v, action=Action.promote,
                       reason=f"the challenger wins: {scores}, p {p:.3g} < {spent:.3g})")
    return replace(v, action=Action.retire, reason=f"the challenger loses: {scores}, p {p:.3g} < {spent:.3g})")


def _wilcoxon(ea: np.ndarray, eb: np.ndarray) -> float | None:
    if not np.any(ea != eb):
        return None
    return float(stats.wilcoxon(ea, eb, zero_method="wilcox").pvalue)


class LiveGate:
    """Judges each watched model's challenger at every check and acts on the verdict."""

    def __init__(self, registry: Registry, store: EventStore, metrics: MonitorMetrics, *,
                 min_rows: int, alpha: float, max_age_s: float) -> None:
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.min_rows = min_rows
        self.alpha = alpha
        self.max_age_s = max_age_s
        self.last: dict[str, Verdict] = {}
        self._looked: dict[tuple[str, int, int], int] = {}
        """The last look taken per (model, champion, challenger): each is taken once."""

    def check(self, model: str, now: float) -> Verdict | None:
        """Judge ``model``'s challenger (None when it has none, or none other than production)
        and promote or retire it when the verdict says so. Each look is taken once (module
        docstring): a check that reaches no new look waits, whatever the pairs say now, since
        late labels reorder and retention removes pairs under an earlier look."""
        aliases = self.registry.aliases(model)
        challenger, champion = aliases.get(ALIAS_CHALLENGER), aliases.get(ALIAS_PRODUCTION)
        if challenger is None or champion is None or challenger == champion:
            self.last.pop(model, None)
            return None
        since, moved = self._named(model, challenger)
        meta = self.registry.get(model, champion).metadata
        labels, champ, chall = self.store.live_pairs(model, champion, challenger, since)
        key = (model, champion, challenger)
        taken = self._looked.get(key, 0)
        unfit = moved or self._incompatible(model, meta, challenger)
        if unfit:
            verdict = replace(judge(meta.task, labels[:0], champ[:0], chall[:0], min_rows=self.min_rows,
                                    alpha=self.alpha), rows=len(labels), action=Action.retire, reason=unfit)
        elif looks(len(labels), self.min_rows) > taken:
            verdict = judge(meta.task, labels, champ, chall, min_rows=self.min_rows, alpha=self.alpha)
            self._looked[key] = looks(len(labels), self.min_rows)
        else:
            previous = self.last.get(model)
            base = previous if previous is not None and taken else judge(
                meta.task, labels, champ, chall, min_rows=self.min_rows, alpha=self.alpha)
            verdict = replace(base, action=Action.wait, rows=len(labels),
                              reason=base.reason if not taken else
                              f"look {taken} taken ({base.reason}); the next at "
                              f"{self.min_rows * 2 ** taken} labelled requests")
        if verdict.action == Action.wait and now - since > self.max_age_s:
            verdict = replace(verdict, action=Action.retire, reason=f"timed out after {now - since:.0f} s "
                                                                    f"without a decision ({verdict.reason})")
        self._publish(model, verdict)
        if verdict.action != Action.wait:
            self._act(model, champion, challenger, verdict)
        return verdict

    def _named(self, model: str, version: int) -> tuple[float, str | None]:
        """When the ``challenger`` alias came to name ``version`` (its pairs count from then:
        an earlier shadowing of another challenger is not this one's), and why it cannot be
        judged any more if production moved since (the looks were spent on another champion)."""
        moved = None
        for event in reversed(self.registry.history(model)):
            if event.get("op") in ("promote", "rollback"):
                moved = (f"production moved to v{event.get('version')} while the challenger was judged: "
                         "name it again to judge it against the new champion")
            if event.get("op") == "set_alias" and event.get("alias") == ALIAS_CHALLENGER \
                    and event.get("version") == version:
                return float(event["time"]), moved
        # no record of its naming (a history cut short): count from its registration
        return self.registry.get(model, version).metadata.created_at.timestamp(), None

    def _incompatible(self, model: str, champion: ModelMetadata, version: int) -> str | None:
        """Why the challenger's answers cannot be compared with the champion's, or None."""
        other = self.registry.get(model, version).metadata
        if not champion.answers_like(other):
            return (f"the challenger v{version} answers another task or classes ({other.task}, "
                    f"{other.class_labels_or_indices()}) than the champion v{champion.version} "
                    f"({champion.task}, {champion.class_labels_or_indices()})")
        return None

    def _publish(self, model: str, v: Verdict) -> None:
        m = self.metrics
        m.live_gate_rows.labels(model).set(v.rows)
        m.live_gate_score.labels(model, "champion").set(v.champion_score)
        m.live_gate_score.labels(model, "challenger").set(v.challenger_score)
        m.live_gate_p_value.labels(model).set(np.nan if v.p_value is None else v.p_value)
        self.last[model] = v

    def _act(self, model: str, champion: int, challenger: int, v: Verdict) -> None:
        note = {"live_gate": {**v.record(), "champion_version": champion, "challenger_version": challenger}}
        try:
            # compare-and-set: nothing happens when production or the alias moved meanwhile
            # (an operator, or another replica's decision)
            if v.action == Action.promote:
                self.registry.promote(model, challenger, note=note, expect_production=champion)
            self.registry.remove_alias(model, ALIAS_CHALLENGER, note=note, expect_version=challenger)
        except RegistryError as exc:  # a broken challenger (or a moved alias) is retired instead
            log.error("%s: live gate could not %s v%d: %s; retiring it", model, v.action, challenger, exc)
            with contextlib.suppress(RegistryError):
                self.registry.remove_alias(model, ALIAS_CHALLENGER, note={**note, "error": str(exc)},
                                           expect_version=challenger)
            self.metrics.live_gate_decisions.labels(model, "failed").inc()
            return
        self.metrics.live_gate_decisions.labels(model, str(v.action)).inc()
        log.warning("%s: live gate %s challenger v%d (champion v%d): %s", model,
                    "promoted" if v.action == Action.promote else "retired", challenger, champion, v.reason)

    def status(self) -> dict[str, Any]:
        return {model: v.record() for model, v in self.last.items()}
