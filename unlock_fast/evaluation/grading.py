"""Answer extraction and grading.

Extraction, in order of trust: the last "The final answer is ...", the last ``\\boxed{...}``,
the last "answer is ..." / "Answer: ...", and finally the last number in the text. Text after
a stop marker (a new "Question:" a base model starts on its own, for example) is cut first.

Grading: exact rational comparison when both sides are numbers (``1,000``, ``$5``, ``2.50``,
``3/4``, ``50%`` are understood); otherwise ``math-verify`` on the LaTeX forms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from .._optional import require

__all__ = [
    "DEFAULT_STOP_MARKERS",
    "Extraction",
    "extract_answer",
    "grade",
    "is_equivalent",
    "last_boxed",
    "parse_number",
    "shows_steps",
    "truncate_at_stop",
]

# Where a continuation stops being an answer to this question.
DEFAULT_STOP_MARKERS: tuple[str, ...] = (
    "\nQuestion:",
    "\nQ:",
    "\nProblem:",
    "\n\n\n",
    "<|im_end|>",
    "<end_of_turn>",
    "</s>",
)

_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?(?:\s?/\s?\d+)?%?"
_NUM_RE = re.compile(r"(?<![\w.])" + _NUM)
_FINAL_RE = re.compile(r"final\s+answer\s*(?:is|:)\s*:?\s*", re.IGNORECASE)
_ANSWER_RE = re.compile(r"answer\s*(?:is|:)\s*:?\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Extraction:
    """An extracted answer and the rule that found it (``final``, ``boxed``, ``answer``,
    ``number`` or ``none``)."""

    answer: str | None
    method: str


def truncate_at_stop(text: str, markers: tuple[str, ...] = DEFAULT_STOP_MARKERS) -> str:
    """Cut ``text`` at the first stop marker."""
    cut = len(text)
    for m in markers:
        i = text.find(m)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


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


def extract_answer(
    text: str, *, stop_markers: tuple[str, ...] = DEFAULT_STOP_MARKERS
) -> Extraction:
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
