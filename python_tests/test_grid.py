"""The selection rule of the held-out grid search, on hand-made points and through grid_search."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest

import unlock_fast.alignment
import unlock_fast.direction
from unlock_fast.evaluation import Problem, accuracy, grid
from unlock_fast.evaluation.grid import GridPoint, select_point


def point(
    correct: int,
    n_items: int = 10,
    *,
    step_rate: float = 0.5,
    alpha: float = 0.1,
    rank: int = 16,
    n: int = 8,
    mean_tokens: float = 20.0,
) -> GridPoint:
    """A grid point whose held-out accuracy is ``correct`` of ``n_items``."""
    verdicts = [True] * correct + [False] * (n_items - correct)
    return GridPoint(rank, alpha, n, accuracy(verdicts), step_rate, mean_tokens)


def test_highest_heldout_accuracy_wins_over_every_other_field():
    best = point(7, step_rate=0.0, alpha=0.5, rank=64, n=32, mean_tokens=99.0)
    others = [
        point(6, step_rate=1.0, alpha=0.05, rank=2, n=1, mean_tokens=1.0),
        point(5, step_rate=0.9, alpha=0.01, rank=1, n=1),
    ]
    for order in itertools.permutations([best, *others]):
        assert select_point(order) is best


def test_accuracy_compares_fractions_not_counts():
    three_of_four = point(3, 4)  # 0.75
    five_of_eight = point(5, 8)  # 0.625: more correct items, lower accuracy
    assert select_point([five_of_eight, three_of_four]) is three_of_four
    # equal fractions of different sizes tie on accuracy; the step rate decides
    half_small = point(1, 2, step_rate=0.2)
    half_large = point(5, 10, step_rate=0.3)
    assert select_point([half_small, half_large]) is half_large


def test_tie_on_accuracy_goes_to_the_higher_step_rate():
    low = point(6, step_rate=0.4, alpha=0.05, rank=2, n=1)
    high = point(6, step_rate=0.6, alpha=0.5, rank=64, n=32)
    assert select_point([low, high]) is high
    assert select_point([high, low]) is high


def test_then_the_smaller_alpha():
    small = point(6, alpha=0.05, rank=64, n=32)
    large = point(6, alpha=0.2, rank=2, n=1)
    assert select_point([large, small]) is small
    assert select_point([small, large]) is small


def test_then_the_smaller_rank():
    small = point(6, rank=4, n=32)
    large = point(6, rank=16, n=1)
    assert select_point([large, small]) is small
    assert select_point([small, large]) is small


def test_then_the_smaller_n():
    small = point(6, n=4)
    large = point(6, n=8)
    assert select_point([large, small]) is small
    assert select_point([small, large]) is small


def test_mean_tokens_is_ignored_and_a_full_tie_keeps_the_first_point():
    first = point(6, mean_tokens=50.0)
    second = point(6, mean_tokens=5.0)
    assert first.sort_key() == second.sort_key()
    assert select_point([first, second]) is first
    assert select_point([second, first]) is second


def test_one_point_and_no_point():
    only = point(0)
    assert select_point([only]) is only
    with pytest.raises(ValueError, match="at least one grid point"):
        select_point([])


# -- grid_search selects with select_point, on held-out scores only ---------------------------


@dataclass
class _Condition:
    accuracy: Any
    step_rate: float
    mean_tokens: float


@dataclass
class _Result:
    conditions: dict[str, _Condition]
    settings: dict[str, Any] = field(default_factory=dict)


class _Alignment:
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def transfer(self, direction: str) -> tuple[str, int]:
        return (direction, self.rank)


class _Stats:
    def fit_ranks(self, ranks: list[int]) -> dict[int, _Alignment]:
        return {r: _Alignment(r) for r in ranks}


def test_grid_search_evaluates_test_once_with_the_selected_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # held-out (correct of 10, step rate) per (rank, alpha): two points tie on accuracy and
    # step rate, so the smaller alpha must win; test scores would pick another point
    heldout_scores = {
        (2, 0.1): (4, 0.9),
        (2, 0.5): (7, 0.2),
        (4, 0.1): (7, 0.5),
        (4, 0.5): (7, 0.5),
    }
    calls: list[tuple[str, Any, float, tuple[str, ...]]] = []

    def fake_evaluate(
        _model: Any,
        _tokenizer: Any,
        problems: list[Problem],
        *,
        key: tuple[str, int],
        alpha: float,
        conditions: tuple[str, ...],
        **_kwargs: Any,
    ) -> _Result:
        split = problems[0].id.split("-")[0]
        calls.append((split, key, alpha, tuple(conditions)))
        correct, rate = heldout_scores[(key[1], alpha)] if split == "heldout" else (10, 1.0)
        verdicts = [True] * correct + [False] * (10 - correct)
        return _Result({"unlock": _Condition(accuracy(verdicts), rate, 12.0)})

    def fake_direction(*_args: Any, **_kwargs: Any) -> str:
        return "direction"

    def fake_stats(*_args: Any, **_kwargs: Any) -> _Stats:
        return _Stats()

    for module in (grid, unlock_fast.direction):
        monkeypatch.setattr(module, "extract_direction", fake_direction, raising=False)
    for module in (grid, unlock_fast.alignment):
        monkeypatch.setattr(module, "collect_alignment_stats", fake_stats, raising=False)
    monkeypatch.setattr(grid, "evaluate_conditions", fake_evaluate)

    def items(split: str, count: int) -> list[Problem]:
        return [Problem(f"{split}-{i}", f"{split} question {i}?", str(i)) for i in range(count)]

    res = grid.grid_search(
        None,
        None,
        None,
        None,
        items("train", 3),
        items("heldout", 2),
        items("test", 2),
        ranks=(2, 4),
        alphas=(0.1, 0.5),
        conditions=("baseline", "unlock"),
        progress=False,
    )
    assert len(res.points) == 4
    assert res.selected == select_point(res.points)
    assert (res.selected.rank, res.selected.alpha, res.selected.n) == (4, 0.1, 3)
    test_calls = [c for c in calls if c[0] == "test"]
    assert test_calls == [("test", ("direction", 4), 0.1, ("baseline", "unlock"))]
    assert res.key == ("direction", 4)
    assert res.test.settings["rank"] == 4
    assert res.test.settings["selected_on"] == "heldout"
