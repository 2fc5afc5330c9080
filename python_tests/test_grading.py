"""Answer extraction and grading on tricky outputs."""

from __future__ import annotations

from fractions import Fraction

import pytest

from unlock_fast.evaluation.grading import (
    extract_answer,
    grade,
    is_equivalent,
    last_boxed,
    parse_number,
    shows_steps,
    truncate_at_stop,
)


@pytest.mark.parametrize(
    ("text", "answer", "method"),
    [
        ("3 + 4 = 7. The final answer is 7.", "7", "final"),
        ("The final answer is $\\frac{1}{2}$.", "\\frac{1}{2}", "final"),
        ("The final answer is \\boxed{42}", "42", "final"),
        ("The final answer is 3.5", "3.5", "final"),
        ("The final answer is 1,234 apples.", "1,234", "final"),
        ("The final answer is: 12", "12", "final"),
        # the last "final answer" wins over an earlier one
        ("The final answer is 5. Wait. The final answer is 6.", "6", "final"),
        ("so we get \\boxed{\\frac{3}{4}} in the end", "\\frac{3}{4}", "boxed"),
        ("nested \\boxed{\\sqrt{\\frac{1}{2}}} ok", "\\sqrt{\\frac{1}{2}}", "boxed"),
        ("The answer is 28.", "28", "answer"),
        ("Answer: 15 dollars", "15", "answer"),
        ("Tom has 3 apples, then 4 more, so 7", "7", "number"),
        ("It costs $12.50 in total", "$12.50", "number"),
        ("no digits here", None, "none"),
    ],
)
def test_extract_answer(text: str, answer: str | None, method: str) -> None:
    ext = extract_answer(text)
    assert ext.answer == answer
    assert ext.method == method


def test_text_after_a_new_question_is_ignored() -> None:
    out = "12 cards\n\nQuestion: Sam has 40 marbles. How many?\nAnswer: 40"
    assert truncate_at_stop(out) == "12 cards\n"
    assert extract_answer(out).answer == "12"


def test_a_number_inside_a_word_is_not_an_answer() -> None:
    assert extract_answer("see item A3x and stop").answer is None
    assert extract_answer("version v2 has 9 steps").answer == "9"


def test_last_boxed_balances_braces_and_handles_absence() -> None:
    assert last_boxed("\\boxed{a} and \\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("plain") is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", Fraction(42)),
        ("-1,234.5", Fraction(-12345, 10)),
        ("$5", Fraction(5)),
        ("3/4", Fraction(3, 4)),
        ("50%", Fraction(1, 2)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("\\dfrac{-6}{4}", Fraction(-3, 2)),
        ("7.", Fraction(7)),
        ("x+1", None),
        ("1/0", None),
    ],
)
def test_parse_number(text: str, value: Fraction | None) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize(
    ("pred", "ref", "ok"),
    [
        ("42", "42", True),
        ("42.0", "42", True),
        ("1,000", "1000", True),
        ("$18", "18", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\frac{2}{4}", "0.5", True),
        ("42 apples", "42", True),
        ("x = 42", "42", True),
        ("41", "42", False),
        ("4 and 42", "42", False),  # two numbers: not a clean answer
        (None, "42", False),
        ("\\sqrt{18}", "3\\sqrt{2}", True),  # math-verify: symbolic equality
        ("2\\pi", "\\pi", False),
    ],
)
def test_is_equivalent(pred: str | None, ref: str, ok: bool) -> None:
    assert is_equivalent(pred, ref) is ok


def test_grade_returns_extraction_and_verdict() -> None:
    ext, ok = grade("First 3 x 4 = 12. The final answer is 12.", "12")
    assert ok
    assert ext.method == "final"
    ext, ok = grade("The final answer is 13.", "12")
    assert not ok
    assert ext.answer == "13"


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("3 x 4 = 12, so 12", True),
        ("We add: 20 + 9 = 29.", True),
        ("1. Tom has 3 apples.\n2. He buys 4 more.\n3. So 7.", True),
        ("Step 1: count.\nStep 2: add.", True),
        ("First we add, then we subtract.", True),
        ("12", False),
        ("12 cards\n\nThe answer is 12 cards.", False),
        ("1. only one numbered line", False),
    ],
)
def test_shows_steps(text: str, steps: bool) -> None:
    assert shows_steps(text) is steps
