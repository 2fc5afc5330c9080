"""The steering strength: rate curves against alpha, and alpha chosen on a held-out split.

A curve maps a condition to points (alpha, rate, ci_low, ci_high) with 95% Wilson
intervals; unsteered conditions (baseline, CoT) sit at alpha 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..artifacts import SteeringKey
from .metrics import accuracy
from .problem import Problem
from .runner import ConditionResult, EvaluationResult, evaluate_conditions, random_key_like

__all__ = ["ALPHA_RULE", "Curves", "Point", "alpha_curves", "alpha_sweep", "choose_alpha"]

Point = tuple[float, float, float, float]  # (alpha, rate, ci_low, ci_high)
Curves = dict[str, dict[str, list[Point]]]  # "accuracy" / "steps" -> condition -> points
ALPHA_RULE = "largest held-out gain of UNLOCK over the random key in shows-steps rate"


def _points(cond: ConditionResult, alpha: float) -> tuple[Point, Point]:
    acc = cond.accuracy
    steps = accuracy([it.shows_steps for it in cond.items])
    return (alpha, acc.value, acc.low, acc.high), (alpha, steps.value, steps.low, steps.high)


def alpha_curves(evaluation: EvaluationResult, alpha: float) -> Curves:
    """One point per condition of ``evaluation`` (the steered ones at ``alpha``)."""
    curves: Curves = {"accuracy": {}, "steps": {}}
    for name, cond in evaluation.conditions.items():
        acc, steps = _points(cond, alpha if name in ("unlock", "random") else 0.0)
        curves["accuracy"][name] = [acc]
        curves["steps"][name] = [steps]
    return curves


def alpha_sweep(
    model: Any,
    tokenizer: Any,
    items: Sequence[Problem],
    key: SteeringKey,
    alphas: Sequence[float],
    *,
    seed: int = 0,
    **generation: Any,  # chat, max_new_tokens, batch_size, progress of evaluate_conditions
) -> Curves:
    """Baseline and CoT once, UNLOCK and the random control (seed ``seed``) at every alpha."""
    rkey = random_key_like(key, seed=seed)
    conds = ("baseline", "cot")
    runs = [(0.0, evaluate_conditions(model, tokenizer, items, conditions=conds, **generation))]
    for alpha in alphas:
        res = evaluate_conditions(
            model,
            tokenizer,
            items,
            key=key,
            random_key=rkey,
            alpha=alpha,
            conditions=("unlock", "random"),
            **generation,
        )
        runs.append((float(alpha), res))
    curves: Curves = {"accuracy": {}, "steps": {}}
    for alpha, res in runs:
        for name, cond in res.conditions.items():
            acc, steps = _points(cond, alpha)
            curves["accuracy"].setdefault(name, []).append(acc)
            curves["steps"].setdefault(name, []).append(steps)
    return curves


def choose_alpha(steps: Mapping[str, Sequence[Point]]) -> float:
    """The alpha whose held-out UNLOCK rate exceeds the random key's the most (the smaller
    alpha on a tie); ``steps`` maps "unlock" and "random" to (alpha, rate, ...) points."""
    if "unlock" not in steps or "random" not in steps:
        raise ValueError("choose_alpha needs the unlock and random curves")
    rnd = {a: v for a, v, *_ in steps["random"]}
    gains = {a: v - rnd[a] for a, v, *_ in steps["unlock"] if a in rnd}
    if not gains:
        raise ValueError("the unlock and random curves share no alpha")
    return max(sorted(gains), key=lambda a: gains[a])
