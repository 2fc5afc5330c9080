"""Evaluation items: seeded arithmetic word problems, and JSONL or hub datasets.

Built-in problems (an offline stand-in for GSM8K) have one to three steps and a solution
ending "The final answer is N."; item i depends only on (seed, i). JSONL fields: GSM8K
(``question``, ``answer`` ending ``#### 42``), MATH (``problem``, ``solution`` with
``\\boxed{}``), SVAMP (``Body``, ``Question``, ``Answer``), else question/answer-like keys.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .grading import last_boxed

__all__ = [
    "PROBLEM_KINDS", "DatasetError", "Problem", "check_disjoint", "from_record",
    "generate_problems", "load_dataset_spec", "load_jsonl", "problem_splits"
]  # fmt: skip


@dataclass(frozen=True)
class Problem:
    """One evaluation item. ``answer`` is the reference final answer as text (a number, or
    LaTeX for MATH); ``solution`` a worked solution when the source has one."""

    id: str
    question: str
    answer: str
    solution: str | None = None
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_disjoint(**splits: Sequence[Problem]) -> None:
    """Raise ValueError when two named splits share a question."""
    seen: dict[str, str] = {}
    for name, items in splits.items():
        for p in items:
            other = seen.setdefault(p.question, name)
            if other != name:
                raise ValueError(
                    f"splits {other!r} and {name!r} share the question {p.question[:60]!r}; "
                    "held-out and test items must be disjoint from the training items"
                )


_NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Isla", "Jack", "Kira"]
_NAMES += ["Leo", "Maya", "Noah", "Olive", "Paul", "Rosa", "Sam", "Tara", "Omar"]
_THINGS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells"]
_THINGS += ["cards", "balloons", "oranges", "coins"]
_CONTAINERS = ["boxes", "bags", "packs", "jars", "baskets", "crates"]
_ITEMS = ["notebooks", "pens", "toy cars", "cupcakes", "tickets", "plants", "mugs"]


# Each kind returns (question, solution steps, answer, number of arithmetic steps).
_Gen = Callable[[random.Random], tuple[str, list[str], int, int]]


def _add(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, _ = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    a, b = rng.randint(5, 60), rng.randint(3, 40)
    q = f"{name} has {a} {thing}. {name} gets {b} more {thing}. "
    q += f"How many {thing} does {name} have now?"
    return q, [f"{name} has {a} + {b} = {a + b} {thing}."], a + b, 1


def _sub(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, friend = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    a = rng.randint(20, 90)
    b = rng.randint(3, a - 5)
    q = f"{name} had {a} {thing} and gave {b} of them to {friend}. "
    q += f"How many {thing} does {name} have left?"
    return q, [f"{name} has {a} - {b} = {a - b} {thing} left."], a - b, 1


def _mul(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, _ = rng.sample(_NAMES, 2)
    thing, box = rng.choice(_THINGS), rng.choice(_CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(3, 12)
    q = f"{name} buys {a} {box} of {thing}. Each of the {box} holds {b} {thing}. "
    q += f"How many {thing} does {name} buy?"
    return q, [f"{name} buys {a} x {b} = {a * b} {thing}."], a * b, 1


def _div(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, _ = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    k, each = rng.randint(2, 8), rng.randint(2, 12)
    total = k * each
    q = f"{name} shares {total} {thing} equally among {k} friends. "
    q += f"How many {thing} does each friend get?"
    return q, [f"Each friend gets {total} / {k} = {each} {thing}."], each, 1


def _add_sub(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, friend = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    a, b = rng.randint(10, 50), rng.randint(5, 30)
    c = rng.randint(2, a + b - 2)
    q = f"{name} has {a} {thing}. {name} finds {b} more, then gives {c} to {friend}. "
    q += f"How many {thing} does {name} have now?"
    steps = [f"After finding more, {name} has {a} + {b} = {a + b} {thing}."]
    steps.append(f"After giving some away, {name} has {a + b} - {c} = {a + b - c} {thing}.")
    return q, steps, a + b - c, 2


def _change(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, _ = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    n, price = rng.randint(2, 6), rng.randint(2, 9)
    cost = n * price
    bill = rng.choice([b for b in (10, 20, 50, 100) if b > cost])
    q = f"{name} buys {n} {item} that cost ${price} each and pays with a ${bill} bill. "
    q += f"How many dollars of change does {name} get?"
    steps = [f"The {item} cost {n} x {price} = {cost} dollars."]
    steps.append(f"The change is {bill} - {cost} = {bill - cost} dollars.")
    return q, steps, bill - cost, 2


def _mul_add(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, friend = rng.sample(_NAMES, 2)
    thing, box = rng.choice(_THINGS), rng.choice(_CONTAINERS)
    a, b, c = rng.randint(2, 8), rng.randint(3, 10), rng.randint(2, 25)
    q = f"{name} has {a} {box} with {b} {thing} in each. {friend} gives {name} {c} more {thing}. "
    q += f"How many {thing} does {name} have in total?"
    steps = [f"The {box} hold {a} x {b} = {a * b} {thing}."]
    steps.append(f"With the gift, {name} has {a * b} + {c} = {a * b + c} {thing}.")
    return q, steps, a * b + c, 2


def _compare(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, friend = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    a, d = rng.randint(5, 40), rng.randint(2, 20)
    q = f"{name} has {a} {thing}. {friend} has {d} more {thing} than {name}. "
    q += f"How many {thing} do they have together?"
    steps = [f"{friend} has {a} + {d} = {a + d} {thing}."]
    steps.append(f"Together they have {a} + {a + d} = {2 * a + d} {thing}.")
    return q, steps, 2 * a + d, 2


def _three_step(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    days, per_day = rng.randint(2, 6), rng.randint(2, 9)
    made = days * per_day
    sold = rng.randint(1, made - 2)
    given = rng.randint(1, made - sold - 1)
    q = f"{name} makes {per_day} {item} a day for {days} days. {name} sells {sold} of them "
    q += f"and gives {given} to {friend}. How many {item} does {name} have left?"
    steps = [
        f"{name} makes {per_day} x {days} = {made} {item}.",
        f"After selling, {made} - {sold} = {made - sold} are left.",
        f"After the gift, {made - sold} - {given} = {made - sold - given} are left.",
    ]
    return q, steps, made - sold - given, 3


PROBLEM_KINDS: dict[str, _Gen] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "div": _div,
    "add_sub": _add_sub,
    "change": _change,
    "mul_add": _mul_add,
    "compare": _compare,
    "three_step": _three_step,
}
_BY_STEPS: dict[int, list[str]] = {}
for _kind, _gen in PROBLEM_KINDS.items():
    _BY_STEPS.setdefault(_gen(random.Random(0))[3], []).append(_kind)


def _one(seed: int, index: int, kinds: Sequence[str]) -> Problem:
    # Item i depends only on (seed, i): a string seed hashes stably across runs and platforms.
    rng = random.Random(f"unlock-fast/{seed}/{index}")
    kind = kinds[rng.randrange(len(kinds))]
    question, steps, answer, n_steps = PROBLEM_KINDS[kind](rng)
    solution = " ".join(steps) + f" The final answer is {answer}."
    return Problem(
        id=f"arith-{seed}-{index}",
        question=question,
        answer=str(answer),
        solution=solution,
        source=f"builtin:{kind}:{n_steps}",
    )


def _kinds_for(steps: Sequence[int] | None, kinds: Sequence[str] | None) -> list[str]:
    if kinds is not None:
        bad = [k for k in kinds if k not in PROBLEM_KINDS]
        if bad or not kinds:
            raise ValueError(
                f"kinds must be a non-empty subset of {sorted(PROBLEM_KINDS)}, got {list(kinds)}"
            )
        return list(kinds)
    steps = (1, 2) if steps is None else steps
    bad_steps = [s for s in steps if s not in _BY_STEPS]
    if bad_steps or not steps:
        raise ValueError(
            f"steps must be a non-empty subset of {sorted(_BY_STEPS)}, got {list(steps)}"
        )
    return [k for s in sorted(set(steps)) for k in _BY_STEPS[s]]


def generate_problems(
    n: int,
    *,
    seed: int = 0,
    start: int = 0,
    steps: Sequence[int] | None = None,
    kinds: Sequence[str] | None = None,
) -> list[Problem]:
    """Items ``start .. start+n-1`` of the stream for ``seed``, of ``steps`` arithmetic steps
    (a subset of 1, 2, 3; default 1 and 2) or of the given :data:`PROBLEM_KINDS`."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    ks = _kinds_for(steps, kinds)
    return [_one(seed, i, ks) for i in range(start, start + n)]


def problem_splits(
    sizes: dict[str, int],
    *,
    seed: int = 0,
    steps: Sequence[int] | None = None,
    kinds: Sequence[str] | None = None,
) -> dict[str, list[Problem]]:
    """Disjoint named splits (e.g. ``{"train": 64, "test": 100}``): consecutive runs of one
    stream, repeated questions skipped, so no question appears twice in or across splits."""
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"split {name!r} size must be a non-negative int, got {size!r}")
    ks = _kinds_for(steps, kinds)
    seen: set[str] = set()
    out: dict[str, list[Problem]] = {}
    index = 0
    budget = 50 * (sum(sizes.values()) + 10)  # the spaces are large; this never binds in practice
    for name, size in sizes.items():
        items: list[Problem] = []
        while len(items) < size:
            if index >= budget:
                raise ValueError("could not draw enough distinct problems; widen steps or kinds")
            p = _one(seed, index, ks)
            index += 1
            if p.question not in seen:
                seen.add(p.question)
                items.append(p)
        out[name] = items
    return out


class DatasetError(ValueError):
    """A dataset that cannot be read or understood."""


def _clean_number(text: str) -> str:
    t = text.strip().replace(",", "").rstrip(".")
    try:
        f = float(t)
    except ValueError:
        return text.strip()
    return str(int(f)) if f.is_integer() else t


def _detect(row: dict[str, Any]) -> str:
    if "Body" in row and "Question" in row and "Answer" in row:
        return "svamp"
    if "problem" in row and ("solution" in row or "answer" in row):
        return "math"
    if "question" in row and isinstance(row.get("answer"), str) and "####" in row["answer"]:
        return "gsm8k"
    return "generic"


_Q_KEYS = ("question", "problem", "input", "prompt")
_A_KEYS = ("answer", "target", "output", "final_answer")


def from_record(row: dict[str, Any], *, format: str = "auto", index: int = 0) -> Problem:
    """One JSON record as a :class:`Problem` (formats: the module doc)."""
    if not isinstance(row, dict):
        raise DatasetError(f"record {index} must be a JSON object, got {type(row).__name__}")
    fmt = _detect(row) if format == "auto" else format
    rid = str(row.get("id", row.get("ID", row.get("unique_id", index))))
    if fmt == "gsm8k":
        sol, _, final = str(row["answer"]).rpartition("####")
        return Problem(
            rid, str(row["question"]), _clean_number(final), sol.strip() or None, "gsm8k"
        )
    if fmt == "math":
        solution, ans = row.get("solution"), row.get("answer")
        ans = last_boxed(str(solution)) if ans is None and solution is not None else ans
        if ans is None:
            raise DatasetError(
                f"MATH record {index} has no answer field and no \\boxed{{}} solution"
            )
        return Problem(rid, str(row["problem"]), str(ans).strip(), solution, "math")
    if fmt == "svamp":
        body, q = str(row["Body"]).strip(), str(row["Question"]).strip()
        answer = _clean_number(str(row["Answer"]))
        return Problem(rid, f"{body} {q}" if body else q, answer, row.get("Equation"), "svamp")
    if fmt != "generic":
        raise DatasetError(f"format must be auto, gsm8k, math, svamp or generic, got {format!r}")
    qk = next((k for k in _Q_KEYS if k in row), None)
    ak = next((k for k in _A_KEYS if k in row), None)
    if qk is None or ak is None:
        raise DatasetError(
            f"record {index} needs a question field ({'/'.join(_Q_KEYS)}) and an answer "
            f"field ({'/'.join(_A_KEYS)}); it has {sorted(row)}"
        )
    return Problem(rid, str(row[qk]), _clean_number(str(row[ak])), row.get("solution"), "jsonl")


def load_jsonl(
    path: str | os.PathLike[str], *, format: str = "auto", limit: int | None = None
) -> list[Problem]:
    """Problems from a JSONL file (one JSON object per line; blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file not found: {p}")
    out: list[Problem] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(from_record(json.loads(line), format=format, index=len(out)))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            except KeyError as e:
                raise DatasetError(f"{p}:{lineno}: missing field {e}") from None
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise DatasetError(f"{p} holds no records")
    return out


# name -> (hub repo, config, default split, format)
HUB_DATASETS: dict[str, tuple[str, str | None, str, str]] = {
    "gsm8k": ("openai/gsm8k", "main", "test", "gsm8k"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "math"),
    "svamp": ("ChilleD/SVAMP", None, "test", "svamp"),
}


def load_dataset_spec(
    spec: str, *, limit: int | None = None, seed: int = 0, split: str | None = None
) -> list[Problem]:
    """Problems from a user's ``--dataset``: ``builtin`` (``limit`` generated problems,
    default 100), a ``.jsonl`` file, or a hub dataset (a known benchmark of
    :data:`HUB_DATASETS` or any ``owner/name``; needs ``datasets`` and the hub)."""
    if spec in ("builtin", "arith", "arithmetic"):
        return generate_problems(100 if limit is None else limit, seed=seed)
    if spec.endswith((".jsonl", ".json")) or Path(spec).exists():
        return load_jsonl(spec, limit=limit)
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"loading {spec!r} from the hub needs the datasets package (pip install datasets); "
            "offline, pass a local .jsonl file or 'builtin'"
        ) from None
    repo, config, default_split, fmt = HUB_DATASETS.get(spec.lower(), (spec, None, "test", "auto"))
    try:
        ds = datasets.load_dataset(repo, config, split=split or default_split)
    except Exception as e:  # network, auth, missing split: one message for the user
        raise DatasetError(
            f"could not load {repo!r} from the hub: {type(e).__name__}: {e}"
        ) from None
    rows = (from_record(dict(row), format=fmt, index=i) for i, row in enumerate(ds))
    return list(rows if limit is None else itertools.islice(rows, limit))
