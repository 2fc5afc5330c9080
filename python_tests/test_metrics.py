"""Accuracy intervals, paired comparisons and the report helpers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from unlock_fast.evaluation.grading import (
    accuracy,
    mcnemar_exact,
    paired_comparison,
    wilson_interval,
)


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"need 0 <= k <= n, got k=3, n=2"):
        wilson_interval(3, 2)
    for n in range(1, 120):  # the point estimate always lies inside its interval
        for k in (0, n // 3, n):
            lo, hi = wilson_interval(k, n)
            assert lo <= k / n <= hi


def test_accuracy_carries_count_and_interval() -> None:
    acc = accuracy([True, False, True, True])
    assert (acc.correct, acc.n, acc.value) == (3, 4, 0.75)
    assert acc.low < 0.75 < acc.high
    assert "(n=4)" in str(acc)
    assert math.isnan(accuracy([]).value)


def test_mcnemar_exact() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    # 0 vs 6 discordant: two-sided 2 * 0.5**6
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(6, 0) == mcnemar_exact(0, 6)


def test_paired_comparison_says_within_noise() -> None:
    a = [True, False] * 10
    b = [True, True, True, False] + a[4:]  # one more right than a
    comp = paired_comparison(a, b, name_a="baseline", name_b="unlock")
    assert comp.diff == pytest.approx(1 / 20)
    assert not comp.significant
    assert "within noise" in comp.verdict


def test_paired_comparison_significant() -> None:
    a = [False] * 30
    b = [True] * 12 + [False] * 18
    comp = paired_comparison(a, b, name_a="baseline", name_b="cot")
    assert comp.significant
    assert comp.low > 0
    assert comp.verdict.endswith("cot is higher (p < 0.05)")
    with pytest.raises(ValueError, match="equal length"):
        paired_comparison([True], [True, False])


def test_condition_measures() -> None:
    from unlock_fast.evaluation.conditions import ConditionResult, ItemResult

    def item(i: int, out: str, steps: bool, extraction: str) -> ItemResult:
        return ItemResult("c", f"i{i}", "q", "1", "p", out, "1", extraction, i == 0, 4 + i, steps)

    words = "We add 2 and 3.\nQuestion: next one"  # the grader stops at "Question:"
    cond = ConditionResult("c", "d", [item(0, words, True, "final"), item(1, "1", False, "number")])
    assert cond.mean_tokens == 4.5
    assert cond.step_rate == 0.5
    assert cond.final_rate == 0.5
    assert cond.mean_answer_words == (5 + 1) / 2
    assert cond.accuracy.correct == 1
    empty = ConditionResult("e", "d", [])
    assert math.isnan(empty.step_rate)
    assert math.isnan(empty.mean_tokens)


def test_report_tables_and_plots(tmp_path: Path) -> None:
    from unlock_fast.demo.plots import plot_accuracy_vs_alpha
    from unlock_fast.evaluation.conditions import (
        ConditionResult,
        EvaluationResult,
        ItemResult,
        write_items,
    )
    from unlock_fast.evaluation.report import condition_table, write_json

    def items(cond: str, verdicts: list[bool]) -> list[ItemResult]:
        return [
            ItemResult(cond, f"i{k}", "q", "1", "p", "out", "1" if v else "2", "final", v, 5, v)
            for k, v in enumerate(verdicts)
        ]

    res = EvaluationResult(
        {
            "baseline": ConditionResult(
                "baseline", "Target, direct", items("baseline", [False] * 6)
            ),
            "unlock": ConditionResult(
                "unlock", "Target, UNLOCK", items("unlock", [True, False] * 3)
            ),
        }
    )
    table = condition_table(res)
    assert "| Target, UNLOCK | 50.0% [" in table
    assert "within noise" in table
    payload = res.to_dict()
    assert payload["conditions"][1]["accuracy"]["correct"] == 3
    path = write_json(payload, tmp_path / "r.json")
    assert json.loads(path.read_text())["comparisons"][0]["b"] == "unlock"
    write_items(res.conditions.values(), tmp_path / "items.jsonl")
    assert len((tmp_path / "items.jsonl").read_text().splitlines()) == 12
    png = plot_accuracy_vs_alpha(
        {
            "baseline": [(0.0, 0.1, 0.0, 0.3)],
            "unlock": [(0.1, 0.2, 0.1, 0.4), (0.5, 0.3, 0.1, 0.5)],
        },
        tmp_path / "a.png",
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
