"""Prompt forms and the conditions an evaluation runs on the Target, side by side.

The conditions: ``baseline`` and ``cot`` (the two prompt forms of :mod:`unlock_fast.prompts`),
``unlock`` (direct form, steered with the key) and ``random`` (direct form, steered with a
random key of the key's per-layer norms), generated greedily in batches by a :class:`Runner`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import StoppingCriteriaList

from ..artifacts import SteeringKey
from ..capture import progress_bar
from ..prompts import format_prompts
from ..steering import steer
from .grading import (
    Accuracy,
    PairedComparison,
    accuracy,
    extract_answer,
    is_equivalent,
    paired_comparison,
    shows_steps,
    truncate_at_stop,
)
from .problems import Problem

__all__ = [
    "CONDITIONS", "ConditionResult", "EvaluationResult", "ItemResult", "Runner",
    "compare", "write_items"
]  # fmt: skip

CONDITIONS = ("baseline", "cot", "unlock", "random")
_DESCRIPTIONS = {
    "baseline": "Target, direct prompt",
    "cot": "Target, CoT prompt",
    "unlock": "Target, direct prompt + transferred key (UNLOCK)",
    "random": "Target, direct prompt + random key of equal norm",
}


class _StopOnText:
    """A row is done once the text of its last few new tokens holds a stop string."""

    def __init__(self, tokenizer: Any, prompt_len: int, stops: Sequence[str], window: int = 16):
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, stops
        self.window = window
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, _scores: Any = None, **_: Any) -> torch.Tensor:
        if self.done is None or self.done.shape[0] != input_ids.shape[0]:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for r, row in enumerate(input_ids[:, self.prompt_len :]):
            if not self.done[r]:
                tail = self.tokenizer.decode(row[-self.window :], skip_special_tokens=True)
                self.done[r] = any(s in tail for s in self.stops)
        return self.done.to(input_ids.device)


@dataclass(frozen=True)
class ItemResult:
    """One item under one condition."""

    condition: str
    id: str
    question: str
    reference: str
    prompt: str
    output: str
    extracted: str | None
    extraction: str
    correct: bool
    num_tokens: int
    shows_steps: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rate(flags: Sequence[bool]) -> float:
    return sum(map(bool, flags)) / len(flags) if flags else float("nan")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@dataclass
class ConditionResult:
    """All items of one condition and their summary measures."""

    name: str
    description: str
    items: list[ItemResult]
    alpha: float | None = None
    seconds: float = 0.0

    @property
    def accuracy(self) -> Accuracy:
        return accuracy([it.correct for it in self.items])

    @property
    def mean_tokens(self) -> float:
        return _mean([it.num_tokens for it in self.items])

    @property
    def step_rate(self) -> float:
        return _rate([it.shows_steps for it in self.items])

    @property
    def mean_answer_words(self) -> float:
        """Mean length in words up to the first stop marker (the part the grader reads; the
        token count of a base model mostly hits the budget)."""
        return _mean([len(truncate_at_stop(it.output).split()) for it in self.items])

    @property
    def final_rate(self) -> float:
        """Share of outputs stating "The final answer is ..." (the CoT prompt's form)."""
        return _rate([it.extraction == "final" for it in self.items])

    @property
    def answered_rate(self) -> float:
        return _rate([it.extracted is not None for it in self.items])

    def summary(self) -> dict[str, Any]:
        return {
            "condition": self.name,
            "description": self.description,
            "alpha": self.alpha,
            "accuracy": self.accuracy.to_dict(),
            "mean_tokens": self.mean_tokens,
            "step_rate": self.step_rate,
            "answered_rate": self.answered_rate,
            "mean_answer_words": self.mean_answer_words,
            "final_answer_rate": self.final_rate,
            "seconds": self.seconds,
        }


def compare(a: ConditionResult, b: ConditionResult, outcome: str = "correct") -> PairedComparison:
    """``b`` against ``a`` on their common items, for ``outcome``: ``"correct"`` or
    ``"shows_steps"``."""
    if outcome not in ("correct", "shows_steps"):
        raise ValueError(f"outcome must be 'correct' or 'shows_steps', got {outcome!r}")
    va = {it.id: bool(getattr(it, outcome)) for it in a.items}
    vb = {it.id: bool(getattr(it, outcome)) for it in b.items}
    ids = [i for i in va if i in vb]
    return paired_comparison(
        [va[i] for i in ids], [vb[i] for i in ids], name_a=a.name, name_b=b.name
    )


@dataclass
class EvaluationResult:
    """The conditions of one evaluation, on the same items, with paired comparisons."""

    conditions: dict[str, ConditionResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def comparisons(self, outcome: str = "correct") -> list[PairedComparison]:
        """Each condition against the baseline, and UNLOCK against the random control."""
        c = self.conditions
        out = [
            compare(c["baseline"], v, outcome)
            for k, v in c.items()
            if "baseline" in c and k != "baseline"
        ]
        if "unlock" in c and "random" in c:
            out.append(compare(c["random"], c["unlock"], outcome))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "conditions": [c.summary() for c in self.conditions.values()],
            "comparisons": self.comparisons(),
            "step_comparisons": self.comparisons("shows_steps"),
        }


def write_items(conditions: Iterable[ConditionResult], path: str | os.PathLike[str]) -> Path:
    """One JSON line per item of each condition."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for cond in conditions:
            f.writelines(json.dumps(it.to_dict(), ensure_ascii=False) + "\n" for it in cond.items)
    return p


@dataclass(frozen=True)
class Runner:
    """The Target, its tokenizer and how it answers: prompt form (``chat``), greedy decoding
    of at most ``max_new_tokens`` in batches of ``batch_size`` (a row ends early at a stop
    string; the grader cuts at the same markers), and steering settings."""

    model: nn.Module
    tokenizer: Any
    chat: bool | str = False
    alpha: float = 0.1
    mode: str = "rotate"
    positions: str = "last_prompt"
    max_new_tokens: int = 128
    batch_size: int = 8
    progress: bool = True
    stop_strings: tuple[str, ...] = ("\nQuestion:", "\nProblem:", "\n\n\n")

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    def with_alpha(self, alpha: float) -> Runner:
        return replace(self, alpha=float(alpha))

    def prompts(self, problems: Sequence[Problem], style: str = "direct") -> list[str]:
        questions = [p.question for p in problems]
        return format_prompts(questions, style, tokenizer=self.tokenizer, chat=self.chat)

    def generate(
        self, prompts: Sequence[str], key: SteeringKey | None = None, bar: Any = None
    ) -> list[tuple[str, int]]:
        """Greedy continuations (text, number of new tokens) of ``prompts`` in their order,
        steered with ``key`` when given; prompts of similar length share a batch."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of str, not one str")
        tok, model = self.tokenizer, cast(Any, self.model)
        lengths = [len(ids) for ids in tok(list(prompts))["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        eos = model.generation_config.eos_token_id
        stops = {*(eos if isinstance(eos, list) else [eos]), tok.pad_token_id}
        device = next(model.parameters()).device
        gen = dict(
            max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        steering: dict[str, Any] = dict(alpha=self.alpha, mode=self.mode, positions=self.positions)
        out: dict[int, tuple[str, int]] = {}
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            # Left padding: decoder-only batches generate from the right edge.
            enc = tok(
                [prompts[i] for i in idx], return_tensors="pt", padding=True, padding_side="left"
            )
            enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
            width = enc["input_ids"].shape[1]
            stop = [_StopOnText(tok, width, self.stop_strings)] if self.stop_strings else []
            hooks = steer(model, key, **steering) if key is not None else contextlib.nullcontext()
            with torch.inference_mode(), hooks:
                seqs = model.generate(**enc, **gen, stopping_criteria=StoppingCriteriaList(stop))
            for row, i in zip(seqs[:, width:].cpu().tolist(), idx, strict=True):
                ids = row[: next((j for j, t in enumerate(row) if t in stops), len(row))]
                out[i] = (tok.decode(ids, skip_special_tokens=True), len(ids))
            if bar is not None:
                bar.update(len(idx))
        return [out[i] for i in range(len(prompts))]

    def run(
        self,
        problems: Sequence[Problem],
        plan: Mapping[str, tuple[str, SteeringKey | None, str]],
        label: str = "evaluate",
    ) -> dict[str, ConditionResult]:
        """Each condition of ``plan`` (name -> prompt style, key or None, description) on
        ``problems``, graded."""
        if not problems:
            raise ValueError("problems must not be empty")
        prompts = {s: self.prompts(problems, s) for s in {style for style, _, _ in plan.values()}}
        out = {}
        with progress_bar(len(problems) * len(plan), label, self.progress) as bar:
            for name, (style, key, description) in plan.items():
                bar.set_description(f"evaluate {name}")
                t0 = time.perf_counter()
                gens = self.generate(prompts[style], key, bar)
                items = [
                    _graded(name, p, prompt, text, n)
                    for p, prompt, (text, n) in zip(problems, prompts[style], gens, strict=True)
                ]
                alpha = None if key is None else self.alpha
                out[name] = ConditionResult(
                    name, description, items, alpha, time.perf_counter() - t0
                )
        return out

    def evaluate(
        self,
        problems: Sequence[Problem],
        key: SteeringKey | None = None,
        *,
        conditions: Sequence[str] = CONDITIONS,
        seed: int = 0,
        random_key: SteeringKey | None = None,
    ) -> EvaluationResult:
        """``conditions`` (any of :data:`CONDITIONS`) on ``problems``. ``unlock`` and
        ``random`` need ``key``; the random key is drawn with ``seed`` unless given."""
        conditions = list(conditions)
        if not conditions or any(c not in CONDITIONS for c in conditions):
            raise ValueError(
                f"conditions must be a non-empty subset of {CONDITIONS}, got {conditions}"
            )
        if key is None and {"unlock", "random"} & set(conditions):
            raise ValueError("the unlock and random conditions need a steering key (key=...)")
        if "random" in conditions and random_key is None and key is not None:
            random_key = SteeringKey.random_like(key, seed=seed)
        keys = {"unlock": key, "random": random_key}
        plan = {
            c: ("cot" if c == "cot" else "direct", keys.get(c), _DESCRIPTIONS[c])
            for c in conditions
        }
        names = ("alpha", "mode", "positions", "max_new_tokens", "chat")
        settings = {
            "num_items": len(problems),
            **{k: getattr(self, k) for k in names},
            "seed": seed,
        }
        return EvaluationResult(self.run(problems, plan), settings)

    def evaluate_keys(
        self,
        problems: Sequence[Problem],
        keys: Mapping[str, SteeringKey],
        description: str = "Target, direct prompt + {name}",
    ) -> dict[str, ConditionResult]:
        """The direct prompt steered with each of ``keys`` (name -> key)."""
        plan = {n: ("direct", k, description.format(name=n)) for n, k in keys.items()}
        return self.run(problems, plan, "null keys")


def _graded(condition: str, p: Problem, prompt: str, output: str, num_tokens: int) -> ItemResult:
    ext = extract_answer(output)
    return ItemResult(
        condition, p.id, p.question, p.answer, prompt, output, ext.answer, ext.method,
        is_equivalent(ext.answer, p.answer), num_tokens, shows_steps(output),
    )  # fmt: skip
