"""Measured figures, and sharedict's goals as ratios to its peers measured in the same run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Result:
    """One figure: a metric of one variant on one workload.

    ``durable`` is whether the variant's writes are on disk when the call returns. Every
    figure records it, reads included, because it describes the measured configuration.
    """

    workload: str
    system: str
    metric: str
    value: float
    unit: str
    durable: bool
    higher_is_better: bool
    parameters: dict[str, Any] = field(default_factory=dict)


def find(results: Sequence[Result], workload: str, system: str, metric: str) -> Result | None:
    for result in results:
        if (result.workload, result.system, result.metric) == (workload, system, metric):
            return result
    return None


@dataclass(frozen=True)
class Goal:
    """A target for a sharedict figure: a ratio to a baseline figure, or an absolute value.

    ``relation`` is ``"<="`` or ``">="``: the ratio (or the value, without a baseline)
    must be at most or at least ``target``.
    """

    label: str
    workload: str
    metric: str
    relation: str
    target: float
    baseline_system: str | None = None
    baseline_metric: str | None = None
    subject_system: str = "sharedict"

    def describe(self) -> str:
        if self.baseline_system is None:
            return f"{self.relation} {self.target:,g}"
        baseline_metric = self.baseline_metric or self.metric
        return f"{self.relation} {self.target:g} x {self.baseline_system} {baseline_metric}"


GOALS = (
    Goal("W1 get p50", "W1", "get p50", "<=", 0.65, "redis everysec"),
    Goal("W1 durable set p50", "W1", "set p50", "<=", 1.0, "redis always"),
    Goal("W3 4 processes", "W3", "4 processes", ">=", 1.0, "redis everysec"),
    Goal("W4 update", "W4", "update", "<=", 1.0, "redis everysec"),
    Goal("W4 iteration", "W4", "iterate", "<=", 1.0, "redis everysec"),
    Goal("W5 durable writes", "W5", "writes", ">=", 2.0, "redis always"),
    Goal("W6 gathered gets", "W6", "gathered", ">=", 100_000),
    Goal("W6 gathered vs blocking", "W6", "gathered", ">=", 5.0, "sharedict", "blocking"),
    Goal("W9 memory", "W9", "RssAnon", "<=", 0.5, "redis everysec", "RSS"),
)


@dataclass(frozen=True)
class GoalOutcome:
    goal: Goal
    value: float | None
    baseline: float | None

    @property
    def ratio(self) -> float | None:
        """The subject's figure divided by the baseline's, or the figure itself without a baseline."""
        if self.value is None:
            return None
        if self.goal.baseline_system is None:
            return self.value
        if not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        if ratio is None:
            return None
        return ratio <= self.goal.target if self.goal.relation == "<=" else ratio >= self.goal.target

    def to_json(self) -> dict[str, Any]:
        return {
            "goal": self.goal.label,
            "target": self.goal.describe(),
            "value": self.value,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "met": self.met,
        }


def evaluate_goals(results: Sequence[Result]) -> list[GoalOutcome]:
    """Evaluate every goal whose figures this run measured."""
    outcomes = []
    for goal in GOALS:
        subject = find(results, goal.workload, goal.subject_system, goal.metric)
        if subject is None:
            continue
        baseline = None
        if goal.baseline_system is not None:
            found = find(results, goal.workload, goal.baseline_system, goal.baseline_metric or goal.metric)
            if found is None:
                continue
            baseline = found.value
        outcomes.append(GoalOutcome(goal, subject.value, baseline))
    return outcomes
