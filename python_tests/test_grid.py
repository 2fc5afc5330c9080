"""The selection rule of the held-out grid search, on hand-made points and through grid_search."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import pytest
import torch
from tiny_models import bpe_tokenizer, make_model, word_tokenizer

from unlock_fast.evaluation import Problem, accuracy
from unlock_fast.evaluation.conditions import (
    CONDITIONS,
    ConditionResult,
    EvaluationResult,
    ItemResult,
    Runner,
)
from unlock_fast.evaluation.evidence import run_transfer
from unlock_fast.evaluation.selection import GridPoint, grid_search, select_point


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


# -- grid_search on tiny models: held-out selection, one Source pass per item ---------------


@dataclass(frozen=True)
class _Scripted(Runner):
    """A Target whose held-out scores are set per (rank, alpha); it records every call."""

    scores: dict[tuple[int, float, int], tuple[int, float]] = field(default_factory=dict)
    calls: list[tuple[str, int, float, tuple[str, ...]]] = field(default_factory=list)

    def evaluate(self, problems, key=None, *, conditions=CONDITIONS, seed=0, random_key=None):  # noqa: ARG002
        split, rank = problems[0].id.split("-")[0], int(key.origin["rank"])
        self.calls.append((split, rank, self.alpha, tuple(conditions)))
        n, setting = len(problems), (rank, self.alpha, int(key.origin["direction_prompts"]))
        correct, rate = self.scores[setting] if split == "heldout" else (n, 1.0)
        items = [
            ItemResult("unlock", p.id, p.question, p.answer, "", "", None, "none", i < correct,
                       1, i < rate * n)
            for i, p in enumerate(problems)
        ]  # fmt: skip
        return EvaluationResult({"unlock": ConditionResult("unlock", "", items, self.alpha)})


def _items(split: str, count: int) -> list[Problem]:
    return [
        Problem(f"{split}-{i}", f"{split} item {i} asks {i} + 1?", str(i + 1)) for i in range(count)
    ]


def test_grid_search_selects_on_heldout_and_passes_each_source_prompt_once() -> None:
    stok, ttok = bpe_tokenizer(), word_tokenizer()
    source = make_model("llama", len(stok), hidden=32, layers=3)
    target_model = make_model("qwen2", len(ttok), hidden=48, layers=4, seed=2)
    # held-out (correct of 10, step rate) per (rank, alpha): two points tie on accuracy and
    # step rate, so the smaller alpha must win; the test split would pick any point
    per = {(2, 0.1): (4, 0.9), (2, 0.5): (7, 0.2), (4, 0.1): (7, 0.5), (4, 0.5): (7, 0.5)}
    scores = {(r, a, n): v for (r, a), v in per.items() for n in (4, 6)}
    target = _Scripted(target_model, ttok, batch_size=4, progress=False, scores=scores)
    rows: list[int] = []
    embed = source.get_input_embeddings()
    hook = embed.register_forward_hook(lambda _m, _a, out: rows.append(out.shape[0]))
    splits = {
        "train": _items("train", 6),
        "heldout": _items("heldout", 10),
        "test": _items("test", 3),
    }
    res = grid_search((source, stok), target, splits, ranks=(2, 4), alphas=(0.1, 0.5), ns=(4, 6),
                      conditions=("baseline", "unlock"))  # fmt: skip
    hook.remove()
    # each train item goes through the Source twice (locked and unlocked form), no more
    assert sum(rows) == 2 * 6
    assert len(res.points) == 2 * 2 * 2
    assert (res.selected.rank, res.selected.alpha) == (4, 0.1)
    assert res.selected.n == 4  # N ties too: the smaller N
    assert [c for c in target.calls if c[0] == "test"] == [("test", 4, 0.1, ("baseline", "unlock"))]
    assert res.test.settings | {"rank": 4, "n": 4, "selected_on": "heldout"} == res.test.settings
    # statistics extended from N=4 to N=6 give the key made from the 6 items at once
    again = replace(target, scores={(4, 0.1, 4): (3, 0.5), (4, 0.1, 6): (5, 0.5)}, calls=[])
    key6 = grid_search((source, stok), again, splits, ranks=(4,), alphas=(0.1,), ns=(4, 6)).key
    assert key6 is not None
    assert key6.origin["direction_prompts"] == 6
    run = run_transfer(Runner(source, stok), target, splits["train"], rank=4)
    assert run.key is not None
    torch.testing.assert_close(key6.vectors, run.key.vectors, rtol=1e-4, atol=1e-5)
