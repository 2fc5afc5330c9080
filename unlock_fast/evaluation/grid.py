"""Choose rank, alpha and N on a held-out split; report the test score of that choice only.

The official release picked these by test accuracy. Here every setting is scored with the
UNLOCK condition on a ``heldout`` split that shares no question with ``train`` (direction
and alignment prompts) or ``test``; the best setting (accuracy, then the rate of outputs
with intermediate steps, then the smaller alpha, rank and N) is then evaluated once on
``test`` with all four conditions.

Statistics grow with N: the directions and Gram statistics of the first N1 items are
extended by the next N2 - N1, never recomputed, and each N is refit at every rank from one
eigendecomposition per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..alignment import collect_alignment_stats
from ..artifacts import Direction
from ..direction import extract_direction
from .datasets import Problem
from .experiment import check_disjoint
from .metrics import Accuracy
from .prompts import format_prompts
from .runner import CONDITIONS, EvaluationResult, evaluate_conditions

__all__ = ["GridPoint", "GridResult", "grid_search", "select_point"]


@dataclass(frozen=True)
class GridPoint:
    """One setting scored on the held-out split (UNLOCK condition)."""

    rank: int
    alpha: float
    n: int
    heldout: Accuracy
    step_rate: float
    mean_tokens: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["heldout"] = self.heldout.to_dict()
        return d

    def sort_key(self) -> tuple[float, ...]:
        return (-self.heldout.value, -self.step_rate, self.alpha, self.rank, self.n)


def select_point(points: Sequence[GridPoint]) -> GridPoint:
    """The setting to evaluate on ``test``: the highest held-out accuracy, then the highest
    step rate, then the smaller alpha, rank and N; on a full tie, the earliest point."""
    if not points:
        raise ValueError("select_point needs at least one grid point, got none")
    return min(points, key=GridPoint.sort_key)


@dataclass
class GridResult:
    """All held-out scores, the selected setting, and its test evaluation."""

    points: list[GridPoint]
    selected: GridPoint
    test: EvaluationResult
    key: Any = None
    alpha_curve: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "selected": self.selected.to_dict(),
            "points": [p.to_dict() for p in self.points],
            "test": self.test.to_dict(),
            "note": "setting selected on the held-out split; test scored once, for it only",
        }


def _combine_mean(prev: Direction, new: Direction) -> Direction:
    """Direction of the union of two disjoint prompt sets (mean method)."""
    n = prev.num_prompts + new.num_prompts
    vec = (prev.vectors * prev.num_prompts + new.vectors * new.num_prompts) / n
    return Direction(vec, list(prev.layers), prev.method, n, prev.model, prev.unlocked_model)


def grid_search(
    source_model: Any,
    source_tokenizer: Any,
    target_model: Any,
    target_tokenizer: Any,
    train: Sequence[Problem],
    heldout: Sequence[Problem],
    test: Sequence[Problem],
    *,
    ranks: Sequence[int] = (16, 64),
    alphas: Sequence[float] = (0.05, 0.1, 0.2, 0.5),
    ns: Sequence[int] | None = None,
    method: str = "mean",
    layer_map: Any = None,
    source_chat: bool | str = False,
    target_chat: bool | str = False,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    conditions: Sequence[str] = CONDITIONS,
    progress: bool = True,
) -> GridResult:
    """Grid over rank x alpha x N, selected on ``heldout``, scored once on ``test``."""
    if not heldout or not test or not train:
        raise ValueError("train, heldout and test must all be non-empty")
    check_disjoint(train=train, heldout=heldout, test=test)
    ns = sorted({len(train)} if ns is None else {int(n) for n in ns})
    if ns[0] < 1 or ns[-1] > len(train):
        raise ValueError(f"every N must be in 1..{len(train)} (the train split), got {ns}")
    if not ranks or not alphas:
        raise ValueError("ranks and alphas must not be empty")
    if method != "mean" and len(ns) > 1:
        raise ValueError("a grid over N needs method='mean' (PCA directions do not extend)")

    def render(items: Sequence[Problem], tok: Any, chat: Any, style: str) -> list[str]:
        return format_prompts([p.question for p in items], style, tokenizer=tok, chat=chat)

    points: list[GridPoint] = []
    keys: dict[tuple[int, float, int], Any] = {}
    direction = stats = None
    done = 0
    for n in ns:
        chunk = list(train[done:n])
        d_new = extract_direction(
            source_model,
            source_tokenizer,
            render(chunk, source_tokenizer, source_chat, "direct"),
            render(chunk, source_tokenizer, source_chat, "cot"),
            method=method,
            batch_size=batch_size,
            progress=progress,
        )
        s_new = collect_alignment_stats(
            source_model,
            source_tokenizer,
            target_model,
            target_tokenizer,
            render(chunk, source_tokenizer, source_chat, "direct"),
            target_prompts=render(chunk, target_tokenizer, target_chat, "direct"),
            layer_map=layer_map,
            batch_size=batch_size,
            progress=progress,
        )
        direction = d_new if direction is None else _combine_mean(direction, d_new)
        stats = s_new if stats is None else stats.merge(s_new)
        done = n
        for rank, alignment in stats.fit_ranks(list(ranks)).items():
            key = alignment.transfer(direction)
            for alpha in alphas:
                res = evaluate_conditions(
                    target_model,
                    target_tokenizer,
                    heldout,
                    key=key,
                    alpha=alpha,
                    conditions=("unlock",),
                    chat=target_chat,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    seed=seed,
                    progress=progress,
                )
                c = res.conditions["unlock"]
                points.append(
                    GridPoint(rank, float(alpha), n, c.accuracy, c.step_rate, c.mean_tokens)
                )
                keys[(rank, float(alpha), n)] = key
    best = select_point(points)
    key = keys[(best.rank, best.alpha, best.n)]
    test_res = evaluate_conditions(
        target_model,
        target_tokenizer,
        test,
        key=key,
        alpha=best.alpha,
        conditions=conditions,
        chat=target_chat,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    test_res.settings.update(rank=best.rank, n=best.n, selected_on="heldout")
    curve = [(p.alpha, p.heldout.value) for p in points if (p.rank, p.n) == (best.rank, best.n)]
    return GridResult(points, best, test_res, key, {"unlock (held-out)": sorted(curve)})
