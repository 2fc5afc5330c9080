"""The behavioural null: the transferred key's outcome rates among those of many null keys.

Every null key (:mod:`.null_keys`) steers the Target on the same test items with the same
alpha, mode and positions as the transferred key. Four measures per condition:

- ``accuracy``: share of correct answers;
- ``step_rate``: share of outputs that show intermediate steps;
- ``answer_words``: mean length in words of the output up to its first stop marker (the
  part the grader reads; the token count of a base model mostly hits the budget);
- ``final_rate``: share of outputs that state "The final answer is ..." (the CoT form).

For each measure and null family: p = (1 + #{null >= key}) / (1 + n), one-sided (the key
is expected to raise each measure), with Holm's adjustment over the measures, and the
null's spread. With n null keys that p is never below 1 / (n + 1), so the normal-model
p-value (:func:`~unlock_fast.evaluation.null.prediction_p_value`) is given beside it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..artifacts import SteeringKey
from ..capture import progress_bar
from .null import Spread, holm, permutation_p_value, prediction_p_value, spread
from .problem import Problem
from .prompts import format_prompts
from .runner import ConditionResult, generate, grade_outputs

__all__ = [
    "METRICS",
    "BehaviouralNull",
    "MetricTest",
    "behavioural_null",
    "evaluate_keys",
    "metric_values",
]

METRICS: dict[str, str] = {
    "accuracy": "accuracy",
    "step_rate": "shows steps",
    "answer_words": "mean answer length (words)",
    "final_rate": "final-answer phrase",
}


def metric_values(cond: ConditionResult) -> dict[str, float]:
    """The four measures of one condition."""
    return {
        "accuracy": cond.accuracy.value,
        "step_rate": cond.step_rate,
        "answer_words": cond.mean_answer_words,
        "final_rate": cond.final_rate,
    }


def evaluate_keys(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    keys: Mapping[str, SteeringKey],
    *,
    alpha: float = 0.1,
    chat: bool | str = False,
    mode: str = "rotate",
    positions: str = "last_prompt",
    max_new_tokens: int = 128,
    batch_size: int = 8,
    description: str = "Target, direct prompt + {name}",
    progress: bool = True,
) -> dict[str, ConditionResult]:
    """Steer the direct prompt of ``problems`` with each of ``keys`` (name -> key); one
    graded :class:`ConditionResult` per key, named by its key's name."""
    if not problems:
        raise ValueError("problems must not be empty")
    questions = [p.question for p in problems]
    prompts = format_prompts(questions, "direct", tokenizer=tokenizer, chat=chat)
    out: dict[str, ConditionResult] = {}
    bar = progress_bar(len(problems) * len(keys), "null keys", progress)
    try:
        for name, key in keys.items():
            bar.set_description(f"evaluate {name}")
            t0 = time.perf_counter()
            gens = generate(
                model,
                tokenizer,
                prompts,
                key=key,
                alpha=alpha,
                mode=mode,
                positions=positions,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=bar.update,
            )
            out[name] = ConditionResult(
                name,
                description.format(name=name),
                grade_outputs(name, problems, prompts, gens),
                alpha=alpha,
                seconds=time.perf_counter() - t0,
            )
    finally:
        bar.close()
    return out


@dataclass
class MetricTest:
    """One measure of the key against one null family."""

    metric: str
    key: float
    null: list[float]
    p_value: float
    holm_p: float
    normal_p: float
    spread: Spread

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "key": self.key,
            "null": self.null,
            "p_value": self.p_value,
            "holm_p": self.holm_p,
            "normal_p": self.normal_p,
            "spread": self.spread.to_dict(),
        }


@dataclass
class BehaviouralNull:
    """Per null family ("random", "null_contrast"): one :class:`MetricTest` per measure."""

    families: dict[str, list[MetricTest]]
    num_items: int

    def test(self, family: str, metric: str) -> MetricTest:
        for t in self.families[family]:
            if t.metric == metric:
                return t
        raise KeyError(f"no test of {metric!r} in family {family!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_items": self.num_items,
            "families": {k: [t.to_dict() for t in v] for k, v in self.families.items()},
        }


def _null_values(conds: Sequence[ConditionResult], metric: str) -> list[float]:
    return [metric_values(c)[metric] for c in conds]


def behavioural_null(
    key: ConditionResult,
    nulls: Mapping[str, Sequence[ConditionResult]],
    *,
    metrics: Sequence[str] = tuple(METRICS),
) -> BehaviouralNull:
    """Test the key's condition against each family of null-key conditions (same items)."""
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {tuple(METRICS)}, got {metrics}")
    ids = [it.id for it in key.items]
    families: dict[str, list[MetricTest]] = {}
    observed = metric_values(key)
    for family, conds in nulls.items():
        if not conds:
            continue
        for c in conds:
            if [it.id for it in c.items] != ids:
                raise ValueError(
                    f"null condition {c.name!r} ran on other items than the key's condition"
                )
        raw = {m: permutation_p_value(observed[m], _null_values(conds, m)) for m in metrics}
        adjusted = holm(raw)
        families[family] = []
        for m in metrics:
            null = _null_values(conds, m)
            normal = prediction_p_value(observed[m], null)
            test = MetricTest(m, observed[m], null, raw[m], adjusted[m], normal, spread(null))
            families[family].append(test)
    return BehaviouralNull(families, len(ids))
