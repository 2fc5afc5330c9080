"""Settings chosen on a held-out split, never on the test items (the official release
picked them by test accuracy).

:func:`grid_search` scores rank x alpha x N with UNLOCK on held-out items and runs the test
once, for the best setting; statistics grow with N (each Source prompt goes through the
Source once) and every N is refit at all ranks from one eigendecomposition per layer.
:func:`alpha_sweep` / :func:`choose_alpha` and :func:`rank_sweep` / :func:`choose_rank` do
the same for alpha (UNLOCK's gain over the random key) and rank (mean held-out R²).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..artifacts import AlignmentReport, AlignmentStats, Direction, SteeringKey
from ..prompts import format_prompts
from ..transfer import collect_transfer
from .conditions import CONDITIONS, ConditionResult, EvaluationResult, Runner
from .grading import Accuracy, accuracy
from .problems import Problem, check_disjoint

__all__ = [
    "ALPHA_RULE", "Curves", "GridPoint", "GridResult", "alpha_curves", "alpha_sweep",
    "choose_alpha", "choose_rank", "grid_search", "rank_sweep", "select_point"
]  # fmt: skip

Point = tuple[float, float, float, float]  # (alpha, rate, ci_low, ci_high)
Curves = dict[str, dict[str, list[Point]]]  # "accuracy" / "steps" -> condition -> points
ALPHA_RULE = "largest held-out gain of UNLOCK over the random key in shows-steps rate"


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
        return {**asdict(self), "heldout": self.heldout.to_dict()}

    def sort_key(self) -> tuple[float, ...]:
        return (-self.heldout.value, -self.step_rate, self.alpha, self.rank, self.n)


def select_point(points: Sequence[GridPoint]) -> GridPoint:
    """The best held-out accuracy, then step rate, smaller alpha, rank, N, earlier point."""
    if not points:
        raise ValueError("select_point needs at least one grid point, got none")
    return min(points, key=GridPoint.sort_key)


@dataclass
class GridResult:
    """All held-out scores, the selected setting, and its test evaluation."""

    points: list[GridPoint]
    selected: GridPoint
    test: EvaluationResult
    key: SteeringKey | None = None

    def to_dict(self) -> dict[str, Any]:
        note = "setting selected on the held-out split; test scored once, for it only"
        return {"selected": self.selected, "points": self.points, "test": self.test, "note": note}


def _union(a: Direction, b: Direction) -> Direction:
    """The mean direction of two disjoint prompt sets."""
    n = a.num_prompts + b.num_prompts
    vec = (a.vectors * a.num_prompts + b.vectors * b.num_prompts) / n
    return Direction(vec, list(a.layers), a.method, n, a.model, a.unlocked_model)


def grid_search(
    source: tuple[Any, Any],
    target: Runner,
    splits: Mapping[str, Sequence[Problem]],
    *,
    ranks: Sequence[int] = (16, 64),
    alphas: Sequence[float] = (0.05, 0.1, 0.2, 0.5),
    ns: Sequence[int] | None = None,
    method: str = "mean",
    source_chat: bool | str = False,
    seed: int = 0,
    conditions: Sequence[str] = CONDITIONS,
    data: Mapping[str, Any] | None = None,
) -> GridResult:
    """Grid over rank x alpha x N on ``splits["heldout"]``, directions and alignments from
    ``splits["train"]`` (Source model and tokenizer ``source``), scored once on
    ``splits["test"]``."""
    train, heldout, test = (list(splits.get(k, ())) for k in ("train", "heldout", "test"))
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
    points: list[GridPoint] = []
    keys: dict[tuple[int, float, int], SteeringKey] = {}
    direction: Direction | None = None
    stats: AlignmentStats | None = None
    done = 0
    for n in ns:
        q = [p.question for p in train[done:n]]
        smodel, stok = source
        d_new, s_new = collect_transfer(
            smodel, stok, target.model, target.tokenizer,
            format_prompts(q, "direct", tokenizer=stok, chat=source_chat),
            format_prompts(q, "cot", tokenizer=stok, chat=source_chat),
            target_prompts=target.prompts(train[done:n]), method=method,
            target_prompts_unlocked=target.prompts(train[done:n], "cot"),
            batch_size=target.batch_size, progress=target.progress, **(data or {}),
        )  # fmt: skip
        direction = d_new if direction is None else _union(direction, d_new)
        stats = s_new if stats is None else stats.merge(s_new)
        done = n
        for rank, alignment in stats.fit_ranks(list(ranks)).items():
            key = alignment.transfer(direction)
            for alpha in alphas:
                res = target.with_alpha(alpha).evaluate(heldout, key, conditions=("unlock",))
                c = res.conditions["unlock"]
                points.append(
                    GridPoint(rank, float(alpha), n, c.accuracy, c.step_rate, c.mean_tokens)
                )
                keys[(rank, float(alpha), n)] = key
    best = select_point(points)
    key = keys[(best.rank, best.alpha, best.n)]
    test_res = target.with_alpha(best.alpha).evaluate(test, key, conditions=conditions, seed=seed)
    test_res.settings.update(rank=best.rank, n=best.n, selected_on="heldout")
    return GridResult(points, best, test_res, key)


def _points(cond: ConditionResult, alpha: float) -> tuple[Point, Point]:
    acc, steps = cond.accuracy, accuracy([it.shows_steps for it in cond.items])
    return (alpha, acc.value, acc.low, acc.high), (alpha, steps.value, steps.low, steps.high)


def alpha_curves(runs: Sequence[tuple[float, EvaluationResult]]) -> Curves:
    """Rate curves from evaluations at several alphas (a condition without key at 0)."""
    curves: Curves = {"accuracy": {}, "steps": {}}
    for alpha, res in runs:
        for name, cond in res.conditions.items():
            acc, steps = _points(cond, alpha if cond.alpha is not None else 0.0)
            curves["accuracy"].setdefault(name, []).append(acc)
            curves["steps"].setdefault(name, []).append(steps)
    return curves


def alpha_sweep(
    target: Runner,
    items: Sequence[Problem],
    key: SteeringKey,
    alphas: Sequence[float],
    *,
    seed: int = 0,
) -> Curves:
    """Baseline and CoT once, UNLOCK and the random control (seed ``seed``) at every alpha."""
    rkey = SteeringKey.random_like(key, seed=seed)
    runs = [(0.0, target.evaluate(items, conditions=("baseline", "cot")))]
    for alpha in alphas:
        steered = target.with_alpha(alpha)
        runs.append(
            (
                float(alpha),
                steered.evaluate(items, key, conditions=("unlock", "random"), random_key=rkey),
            )
        )
    return alpha_curves(runs)


def choose_alpha(steps: Mapping[str, Sequence[Point]]) -> float:
    """The alpha whose held-out UNLOCK rate beats the random key's the most (the smaller on
    a tie); ``steps`` maps "unlock" and "random" to (alpha, rate, ...) points."""
    if "unlock" not in steps or "random" not in steps:
        raise ValueError("choose_alpha needs the unlock and random curves")
    rnd = {a: v for a, v, *_ in steps["random"]}
    gains = {a: v - rnd[a] for a, v, *_ in steps["unlock"] if a in rnd}
    if not gains:
        raise ValueError("the unlock and random curves share no alpha")
    return max(sorted(gains), key=lambda a: gains[a])


def rank_sweep(
    stats: AlignmentStats, heldout: AlignmentStats, ranks: Sequence[int]
) -> dict[int, AlignmentReport]:
    """Held-out diagnostics of the alignment at each rank (one fit for all)."""
    fitted = stats.fit_ranks(sorted({int(r) for r in ranks}))
    return {r: a.diagnose(heldout) for r, a in fitted.items()}


def choose_rank(sweep: Mapping[int, AlignmentReport]) -> int:
    """The rank with the highest mean held-out centred R² (the smaller rank on a tie)."""
    if not sweep:
        raise ValueError("the rank sweep is empty")
    return max(sorted(sweep), key=lambda r: sum(sweep[r].r2) / len(sweep[r].r2))
