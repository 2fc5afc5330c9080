"""Accuracy with its uncertainty, paired comparisons, and output statistics.

Every accuracy carries its item count and a 95% Wilson score interval. Two conditions run on
the same items are compared pairwise (exact McNemar test on the items where they disagree),
and the verdict says plainly when the difference is within noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "Accuracy",
    "PairedComparison",
    "accuracy",
    "mcnemar_exact",
    "mean",
    "paired_comparison",
    "rate",
    "wilson_interval",
]

_Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n``; (0, 1) when ``n == 0``."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # clamp: rounding must not put the point estimate outside its own interval
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


@dataclass(frozen=True)
class Accuracy:
    """``correct`` of ``n`` items, with a 95% Wilson interval [``low``, ``high``]."""

    correct: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    def __str__(self) -> str:
        if not self.n:
            return "n/a (n=0)"
        return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] (n={self.n})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.value}


def accuracy(verdicts: Sequence[bool]) -> Accuracy:
    """Accuracy of a list of per-item verdicts."""
    k, n = sum(bool(v) for v in verdicts), len(verdicts)
    lo, hi = wilson_interval(k, n)
    return Accuracy(k, n, lo, hi)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2**m
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedComparison:
    """Condition ``b`` against condition ``a`` on the same items, for one yes/no outcome
    (answer correct, or output shows steps).

    ``diff`` is rate(b) - rate(a) with a 95% interval; ``only_a``/``only_b`` count the items
    where only one condition has the outcome; ``p_value`` is the exact McNemar test.
    """

    a: str
    b: str
    n: int
    diff: float
    low: float
    high: float
    only_a: int
    only_b: int
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < 0.05

    @property
    def verdict(self) -> str:
        """One line: the difference, its interval and p-value, and plainly whether it is noise."""
        if self.n == 0:
            return "no items to compare"
        head = (
            f"{self.b} vs {self.a}: {100 * self.diff:+.1f} pts "
            f"[{100 * self.low:+.1f}, {100 * self.high:+.1f}], McNemar p={self.p_value:.2g} "
            f"(items where only one has it: {self.b} {self.only_b}, {self.a} {self.only_a})"
        )
        if not self.significant:
            return f"{head}: within noise"
        word = "higher" if self.diff > 0 else "lower"
        return f"{head}: {self.b} is {word} (p < 0.05)"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant, "verdict": self.verdict}


def paired_comparison(
    a: Sequence[bool], b: Sequence[bool], *, name_a: str = "A", name_b: str = "B"
) -> PairedComparison:
    """Compare two conditions item by item (same items, same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired verdicts must have equal length, got {len(a)} and {len(b)}")
    n = len(a)
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    if n == 0:
        return PairedComparison(name_a, name_b, 0, 0.0, 0.0, 0.0, 0, 0, 1.0)
    diff = (only_b - only_a) / n
    # Wald interval of a paired difference of proportions, widened by a continuity term
    var = (only_a + only_b - (only_b - only_a) ** 2 / n) / n**2
    half = _Z95 * math.sqrt(max(var, 0.0)) + 1 / n
    return PairedComparison(
        name_a,
        name_b,
        n,
        diff,
        max(-1.0, diff - half),
        min(1.0, diff + half),
        only_a,
        only_b,
        mcnemar_exact(only_a, only_b),
    )


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def rate(flags: Sequence[bool]) -> float:
    return sum(bool(f) for f in flags) / len(flags) if flags else float("nan")
