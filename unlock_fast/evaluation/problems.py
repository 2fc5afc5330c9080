"""A seeded generator of grade-school arithmetic word problems with exact answers.

Offline stand-in for GSM8K/SVAMP: one- to three-step problems over whole numbers, each with
a worked solution that ends in "The final answer is N." Item ``i`` of a stream depends only
on ``(seed, i)``, so a longer list extends a shorter one, and splits built by
:func:`problem_splits` never share a question.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from .problem import Problem

__all__ = ["generate_problems", "problem_splits", "PROBLEM_KINDS"]

_NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dan",
    "Emma",
    "Finn",
    "Grace",
    "Hugo",
    "Isla",
    "Jack",
    "Kira",
    "Leo",
    "Maya",
    "Noah",
    "Olive",
    "Paul",
    "Rosa",
    "Sam",
    "Tara",
    "Omar",
]
_THINGS = [
    "apples",
    "marbles",
    "stickers",
    "pencils",
    "cookies",
    "books",
    "stamps",
    "shells",
    "cards",
    "balloons",
    "oranges",
    "coins",
]
_CONTAINERS = ["boxes", "bags", "packs", "jars", "baskets", "crates"]
_ITEMS = ["notebooks", "pens", "toy cars", "cupcakes", "tickets", "plants", "mugs"]


def _pick_pair(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(_NAMES, 2)
    return a, b


# Each kind returns (question, solution steps, answer, number of arithmetic steps).
_Gen = Callable[[random.Random], tuple[str, list[str], int, int]]


def _add(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, _ = _pick_pair(rng)
    thing = rng.choice(_THINGS)
    a, b = rng.randint(5, 60), rng.randint(3, 40)
    q = (
        f"{name} has {a} {thing}. {name} gets {b} more {thing}. "
        f"How many {thing} does {name} have now?"
    )
    return q, [f"{name} has {a} + {b} = {a + b} {thing}."], a + b, 1


def _sub(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, friend = _pick_pair(rng)
    thing = rng.choice(_THINGS)
    a = rng.randint(20, 90)
    b = rng.randint(3, a - 5)
    q = (
        f"{name} had {a} {thing} and gave {b} of them to {friend}. "
        f"How many {thing} does {name} have left?"
    )
    return q, [f"{name} has {a} - {b} = {a - b} {thing} left."], a - b, 1


def _mul(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, _ = _pick_pair(rng)
    thing, box = rng.choice(_THINGS), rng.choice(_CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(3, 12)
    q = (
        f"{name} buys {a} {box} of {thing}. Each of the {box} holds {b} {thing}. "
        f"How many {thing} does {name} buy?"
    )
    return q, [f"{name} buys {a} x {b} = {a * b} {thing}."], a * b, 1


def _div(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, _ = _pick_pair(rng)
    thing = rng.choice(_THINGS)
    k, each = rng.randint(2, 8), rng.randint(2, 12)
    total = k * each
    q = (
        f"{name} shares {total} {thing} equally among {k} friends. "
        f"How many {thing} does each friend get?"
    )
    return q, [f"Each friend gets {total} / {k} = {each} {thing}."], each, 1


def _add_sub(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, friend = _pick_pair(rng)
    thing = rng.choice(_THINGS)
    a, b = rng.randint(10, 50), rng.randint(5, 30)
    c = rng.randint(2, a + b - 2)
    q = (
        f"{name} has {a} {thing}. {name} finds {b} more, then gives {c} to {friend}. "
        f"How many {thing} does {name} have now?"
    )
    steps = [
        f"After finding more, {name} has {a} + {b} = {a + b} {thing}.",
        f"After giving some away, {name} has {a + b} - {c} = {a + b - c} {thing}.",
    ]
    return q, steps, a + b - c, 2


def _change(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, _ = _pick_pair(rng)
    item = rng.choice(_ITEMS)
    n, price = rng.randint(2, 6), rng.randint(2, 9)
    cost = n * price
    bill = rng.choice([b for b in (10, 20, 50, 100) if b > cost])
    q = (
        f"{name} buys {n} {item} that cost ${price} each and pays with a ${bill} bill. "
        f"How many dollars of change does {name} get?"
    )
    steps = [
        f"The {item} cost {n} x {price} = {cost} dollars.",
        f"The change is {bill} - {cost} = {bill - cost} dollars.",
    ]
    return q, steps, bill - cost, 2


def _mul_add(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, friend = _pick_pair(rng)
    thing, box = rng.choice(_THINGS), rng.choice(_CONTAINERS)
    a, b, c = rng.randint(2, 8), rng.randint(3, 10), rng.randint(2, 25)
    q = (
        f"{name} has {a} {box} with {b} {thing} in each. {friend} gives {name} {c} more {thing}. "
        f"How many {thing} does {name} have in total?"
    )
    steps = [
        f"The {box} hold {a} x {b} = {a * b} {thing}.",
        f"With the gift, {name} has {a * b} + {c} = {a * b + c} {thing}.",
    ]
    return q, steps, a * b + c, 2


def _compare(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, friend = _pick_pair(rng)
    thing = rng.choice(_THINGS)
    a, d = rng.randint(5, 40), rng.randint(2, 20)
    q = (
        f"{name} has {a} {thing}. {friend} has {d} more {thing} than {name}. "
        f"How many {thing} do they have together?"
    )
    steps = [
        f"{friend} has {a} + {d} = {a + d} {thing}.",
        f"Together they have {a} + {a + d} = {2 * a + d} {thing}.",
    ]
    return q, steps, 2 * a + d, 2


def _three_step(rng: random.Random) -> tuple[str, list[str], int, int]:
    name, friend = _pick_pair(rng)
    item = rng.choice(_ITEMS)
    days, per_day = rng.randint(2, 6), rng.randint(2, 9)
    made = days * per_day
    sold = rng.randint(1, made - 2)
    given = rng.randint(1, made - sold - 1)
    q = (
        f"{name} makes {per_day} {item} a day for {days} days. {name} sells {sold} of them "
        f"and gives {given} to {friend}. How many {item} does {name} have left?"
    )
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
    """``n`` problems, items ``start .. start+n-1`` of the stream for ``seed``.

    Args:
        steps: numbers of arithmetic steps to draw from (subset of 1, 2, 3; default 1 and 2).
        kinds: explicit problem kinds (see :data:`PROBLEM_KINDS`); overrides ``steps``.
    """
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
    """Disjoint named splits (e.g. ``{"train": 64, "heldout": 32, "test": 100}``).

    Splits are consecutive runs of one stream with repeated questions skipped, so no question
    appears twice in or across splits; the same arguments always give the same splits.
    """
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
