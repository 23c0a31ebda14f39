"""What a benchmark run produces: figures (one value per run), their targets, and notes."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

SYMBOLS = {">=": "≥", "<=": "≤"}


@dataclass(frozen=True)
class Target:
    """A bound the median must meet: ``op`` is ``>=``, ``<=`` or ``>``."""

    op: str
    value: float

    def met(self, median: float) -> bool:
        if self.op == ">=":
            return median >= self.value
        if self.op == "<=":
            return median <= self.value
        return median > self.value

    def __str__(self) -> str:
        shown = f"{self.value:,.0f}" if self.value == int(self.value) else f"{self.value:g}"
        return f"{SYMBOLS.get(self.op, self.op)} {shown}"


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    target: Target | None = None
    baseline_key: str | None = None  # the baseline figure this one is compared with
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def met(self) -> bool | None:
        if self.target is None or not self.values:
            return None
        return self.target.met(self.median)


@dataclass
class ScenarioResult:
    """The figures and notes of one scenario; ``error`` if it could not finish."""

    name: str
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    keyed_notes: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def add_latencies(self, key: str, load: dict[str, Any], label: str) -> None:
        """A load run's p50 and p99, as the figures ``<key>.p50`` and ``<key>.p99``."""
        self.add(f"{key}.p50", load["p50_ms"], label=f"{label}: p50 latency", unit="ms")
        self.add(f"{key}.p99", load["p99_ms"], label=f"{label}: p99 latency", unit="ms")

    def add(
        self,
        key: str,
        value: float | None,
        *,
        label: str,
        unit: str,
        target: Target | None = None,
        baseline_key: str | None = None,
    ) -> None:
        """Record one run's value of a figure (a None value, e.g. no latency sample, is skipped)."""
        figure = self.figures.get(key)
        if figure is None:
            figure = self.figures[key] = Figure(key, label, unit, target, baseline_key)
        if value is not None:
            figure.values.append(float(value))

    def note(self, text: str, key: str | None = None) -> None:
        """Add a note once; a note with a ``key`` replaces the earlier note with that key."""
        if key is not None:
            if key in self.keyed_notes:
                self.notes[self.notes.index(self.keyed_notes[key])] = text
                self.keyed_notes[key] = text
                return
            self.keyed_notes[key] = text
        if text not in self.notes:
            self.notes.append(text)


def number(value: float) -> str:
    """A figure as people read it: 12,345 / 123 / 12.3 / 1.23."""
    if value != value:  # NaN
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 999.5:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
