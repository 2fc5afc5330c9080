"""Steered against unsteered on the same items: the paired difference and its interval.

lm-eval's per-sample logs (``log_samples``) hold each item's score under every metric and
filter. Items are paired by task, filter and ``doc_id``; the difference of a metric is the
mean over items of (steered - unsteered), with a 95% confidence interval from the normal
approximation: mean +- 1.96 * sd / sqrt(n), sd the sample standard deviation of the
per-item differences (ddof = 1; no interval for a single item). Metrics whose per-item
values are not numbers (perplexities, which lm-eval aggregates from tuples) are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = ["CI_METHOD", "PairedDifference", "format_differences", "paired_differences"]

Z95 = 1.959963984540054
CI_METHOD = "95% CI: normal approximation over per-item differences (mean +- 1.96 sd/sqrt(n))"

Sample = Mapping[str, object]


@dataclass(frozen=True)
class PairedDifference:
    """One metric of one task: the means over the paired items and their difference."""

    task: str
    metric: str
    filter: str
    n: int
    unsteered: float
    steered: float
    difference: float  # mean of steered - unsteered over the items
    ci_low: float  # nan when n < 2
    ci_high: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        out = float(value)  # type: ignore[arg-type]  # numpy scalars, ints, floats
    except (TypeError, ValueError):
        return None
    return out


def _scores(samples: Sequence[Sample]) -> dict[tuple[str, str], dict[object, float]]:
    """(metric, filter) -> doc_id -> score."""
    out: dict[tuple[str, str], dict[object, float]] = {}
    for s in samples:
        metrics = s.get("metrics")
        names = [m for m in metrics if isinstance(m, str)] if isinstance(metrics, list) else []
        for m in names:
            v = _number(s.get(m))
            if v is not None:
                out.setdefault((m, str(s.get("filter", "none"))), {})[s.get("doc_id")] = v
    return out


def paired_differences(
    steered: Mapping[str, Sequence[Sample]], unsteered: Mapping[str, Sequence[Sample]]
) -> list[PairedDifference]:
    """The paired difference of every numeric metric of every task logged in both runs
    (``results["samples"]`` of ``lm_eval.simple_evaluate(..., log_samples=True)``)."""
    out = []
    for task in sorted(set(steered) & set(unsteered)):
        a, b = _scores(steered[task]), _scores(unsteered[task])
        for metric, flt in sorted(set(a) & set(b)):
            docs = [d for d in a[(metric, flt)] if d in b[(metric, flt)]]
            if not docs:
                continue
            s_vals = [a[(metric, flt)][d] for d in docs]
            u_vals = [b[(metric, flt)][d] for d in docs]
            diffs = [x - y for x, y in zip(s_vals, u_vals, strict=True)]
            n = len(diffs)
            mean = sum(diffs) / n
            if n > 1:
                sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
                half = Z95 * sd / math.sqrt(n)
                low, high = mean - half, mean + half
            else:
                low = high = math.nan
            out.append(
                PairedDifference(
                    task, metric, flt, n, sum(u_vals) / n, sum(s_vals) / n, mean, low, high
                )
            )
    return out


def format_differences(diffs: Sequence[PairedDifference]) -> str:
    """A markdown table, as lm-eval prints its results, with the CI method under it."""
    head = "| Task | Filter | Metric | n | unsteered | steered | steered - unsteered | 95% CI |"
    rows = [head, "|---|---|---|--:|--:|--:|--:|---|"]
    for d in diffs:
        ci = "n/a" if math.isnan(d.ci_low) else f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}]"
        rows.append(
            f"| {d.task} | {d.filter} | {d.metric} | {d.n} | {d.unsteered:.4f} | "
            f"{d.steered:.4f} | {d.difference:+.4f} | {ci} |"
        )
    return "\n".join(rows) + f"\n\n{CI_METHOD}\n"
