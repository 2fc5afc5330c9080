"""Answer extraction and grading, and the statistics of verdicts.

Extraction trusts, in order: the last "The final answer is ...", ``\\boxed{...}``, "answer
is ..."/"Answer: ...", then the last number, after cutting at a stop marker. Numbers compare
exactly as rationals; other answers through ``math-verify``. Accuracies carry 95% Wilson
intervals; paired comparisons use the exact McNemar test.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

from .._optional import require

__all__ = [
    "Accuracy", "Extraction", "PairedComparison", "accuracy", "extract_answer", "grade",
    "is_equivalent", "last_boxed", "paired_comparison", "shows_steps", "truncate_at_stop",
    "wilson_interval"
]  # fmt: skip

# Where a continuation stops being an answer to this question.
STOPS = ("\nQuestion:", "\nQ:", "\nProblem:", "\n\n\n", "<|im_end|>", "<end_of_turn>", "</s>")

_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?(?:\s?/\s?\d+)?%?"
_NUM_RE = re.compile(r"(?<![\w.])" + _NUM)
_FINAL_RE = re.compile(r"final\s+answer\s*(?:is|:)\s*:?\s*", re.IGNORECASE)
_ANSWER_RE = re.compile(r"answer\s*(?:is|:)\s*:?\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Extraction:
    """An answer and the rule that found it: final, boxed, answer, number or none."""

    answer: str | None
    method: str


def truncate_at_stop(text: str, markers: tuple[str, ...] = STOPS) -> str:
    """Cut ``text`` at the first stop marker."""
    return text[: min([i for i in map(text.find, markers) if i >= 0], default=len(text))]


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start : i - 1].strip()
    return None


def _strip_answer(span: str) -> str:
    """The answer part of the text after "The final answer is": up to the end of the line
    or sentence, without $ delimiters, trailing period or a unit word."""
    span = span.strip().split("\n", 1)[0]
    boxed = last_boxed(span)
    if boxed is not None:
        return boxed
    if span.startswith("$") and span.count("$") >= 2 and not re.match(r"\$\s?\d", span):
        return span[1 : span.index("$", 1)].strip()  # $...$ math
    if span.startswith(("\\(", "\\[")):
        end = span.find("\\)" if span.startswith("\\(") else "\\]")
        if end > 0:
            return span[2:end].strip()
    # a sentence ends at ". " or at a final "."; "3.5" is not an end
    m = re.match(r"(.*?)(?:\.\s|\.$|$)", span)
    out = (m.group(1) if m else span).strip()
    num = _NUM_RE.match(out)
    if num and re.fullmatch(r"[\s\w]*", out[num.end() :] or ""):
        return num.group(0).strip()  # "42 apples" -> "42"
    return out.rstrip(".").strip()


def extract_answer(text: str, *, stop_markers: tuple[str, ...] = STOPS) -> Extraction:
    """Find the final answer in a model output (see the module doc for the order)."""
    text = truncate_at_stop(text, stop_markers)
    finals = list(_FINAL_RE.finditer(text))
    if finals:
        ans = _strip_answer(text[finals[-1].end() :])
        if ans:
            return Extraction(ans, "final")
    boxed = last_boxed(text)
    if boxed:
        return Extraction(boxed, "boxed")
    for m in reversed(list(_ANSWER_RE.finditer(text))):
        ans = _strip_answer(text[m.end() :])
        if ans and _NUM_RE.search(ans):
            return Extraction(ans, "answer")
    nums = _NUM_RE.findall(text)
    if nums:
        return Extraction(nums[-1].strip(), "number")
    return Extraction(None, "none")


def parse_number(text: str) -> Fraction | None:
    """A number written plainly (``-1,234.5``, ``$5``, ``3/4``, ``50%``, ``\\frac{3}{4}``)."""
    t = text.strip().rstrip(".").strip()
    t = t.replace("\\$", "").replace("$", "").replace(",", "").replace("\\!", "").strip()
    t = re.sub(r"^\\text\{(.*)\}$", r"\1", t)
    m = re.fullmatch(r"\\d?frac\{(-?\d+)\}\{(-?\d+)\}", t)
    if m:
        return Fraction(int(m.group(1)), int(m.group(2))) if int(m.group(2)) else None
    pct = t.endswith("%") or t.endswith("\\%")
    t = t.removesuffix("\\%").removesuffix("%").strip()
    try:
        if "/" in t:
            a, b = t.split("/", 1)
            val = Fraction(int(a.strip()), int(b.strip()))
        else:
            val = Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None
    return val / 100 if pct else val


def _math_verify(pred: str, ref: str) -> bool:
    mv = require("math_verify", "eval", "Grading LaTeX answers")
    try:
        gold = mv.parse(f"${ref}$")
        got = mv.parse(f"${pred}$")
        if not gold or not got:
            return False
        return bool(mv.verify(gold, got))
    except Exception:  # the parser raises on malformed LaTeX; that is just "not equal"
        return False


def is_equivalent(pred: str | None, reference: str) -> bool:
    """Whether an extracted answer equals the reference answer."""
    if pred is None:
        return False
    a, b = parse_number(pred), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    if b is not None and a is None:  # "42 dollars", "x = 42"
        nums = _NUM_RE.findall(pred)
        if len(nums) == 1:
            got = parse_number(nums[0])
            if got is not None and got == b:
                return True
    return _math_verify(pred, reference)


def grade(output: str, reference: str) -> tuple[Extraction, bool]:
    """Extract the answer of one output and grade it against the reference."""
    ext = extract_answer(output)
    return ext, is_equivalent(ext.answer, reference)


_EQUATION_RE = re.compile(
    r"\d[\d,.]*\s*(?:[-+*/x×÷]|\\times|\\cdot|\\div)\s*\$?\d[\d,.]*.{0,40}?=\s*\$?-?\d"
)
_STEP_WORDS_RE = re.compile(
    r"\b(?:first(?:ly)?|then|next|so|therefore|finally|second(?:ly)?)\b", re.IGNORECASE
)
_ENUMERATED_RE = re.compile(
    r"^\s*(?:step\s*\d+\s*[:.)]|\d+\s*[.)]\s+\S)", re.IGNORECASE | re.MULTILINE
)


def shows_steps(output: str) -> bool:
    """Whether an output shows intermediate reasoning steps: an arithmetic equation such as
    ``3 x 4 = 12``, at least two enumerated lines (``1. ...``, ``Step 2: ...``), or at least
    two step words (first, then, next, so, therefore, finally)."""
    text = truncate_at_stop(output)
    if _EQUATION_RE.search(text):
        return True
    if len(_ENUMERATED_RE.findall(text)) >= 2:
        return True
    return len(_STEP_WORDS_RE.findall(text)) >= 2


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
    low, high, p = max(-1.0, diff - half), min(1.0, diff + half), mcnemar_exact(only_a, only_b)
    return PairedComparison(name_a, name_b, n, diff, low, high, only_a, only_b, p)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def rate(flags: Sequence[bool]) -> float:
    return sum(bool(f) for f in flags) / len(flags) if flags else float("nan")
