"""Run the evaluation conditions side by side on the same items.

The four conditions of a capability-transfer evaluation, all on the Target model:

- ``baseline``: the direct prompt (p0);
- ``cot``: the chain-of-thought prompt (p1), the behaviour the key should unlock;
- ``unlock``: the direct prompt, steered with the transferred key;
- ``random``: the direct prompt, steered with a random key of the same per-layer norm.

Generation is greedy and batched (prompts sorted by length to waste little padding); every
item of every condition is written to a JSONL file with its prompt, output, extracted
answer and verdict.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteriaList

from ..artifacts import KeyLike, SteeringKey
from ..capture import progress_bar
from ..steering import steer
from .grading import (
    DEFAULT_STOP_MARKERS,
    extract_answer,
    is_equivalent,
    shows_steps,
    truncate_at_stop,
)
from .metrics import Accuracy, PairedComparison, accuracy, mean, paired_comparison, rate
from .problem import Problem
from .prompts import format_prompts

__all__ = [
    "CONDITIONS",
    "ConditionResult",
    "EvaluationResult",
    "Generated",
    "ItemResult",
    "evaluate_conditions",
    "generate",
    "grade_outputs",
    "random_key_like",
]

CONDITIONS = ("baseline", "cot", "unlock", "random")
_DESCRIPTIONS = {
    "baseline": "Target, direct prompt",
    "cot": "Target, CoT prompt",
    "unlock": "Target, direct prompt + transferred key (UNLOCK)",
    "random": "Target, direct prompt + random key of equal norm",
}
# Strings that end a continuation early (the grader cuts at the same markers).
GENERATION_STOP_STRINGS = ["\nQuestion:", "\nProblem:", "\n\n\n"]


def random_key_like(key: SteeringKey, *, seed: int = 0) -> SteeringKey:
    """A SteeringKey with Gaussian random vectors of the same per-layer norms as ``key``."""
    if not isinstance(key, SteeringKey):
        raise TypeError(f"key must be a SteeringKey, got {type(key).__name__}")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(key.vectors.shape, generator=gen, dtype=torch.float64)
    norms = key.vectors.double().norm(dim=-1, keepdim=True)
    vecs = noise / noise.norm(dim=-1, keepdim=True) * norms
    origin = {"kind": "random_control", "seed": seed, "like": dict(key.origin)}
    return SteeringKey(vecs.float(), list(key.layers), key.model, origin)


class _StopOnText:
    """Stopping criterion: a row is done once its generated text contains a stop string.

    Decodes only the last few generated tokens of unfinished rows each step (cheap next to a
    forward pass), and works with any tokenizer, unlike vocabulary-embedding approaches.
    """

    def __init__(self, tokenizer: Any, prompt_len: int, stops: Sequence[str], window: int = 16):
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, list(stops)
        self.window = window
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, _scores: Any = None, **_: Any) -> torch.Tensor:
        b = input_ids.shape[0]
        if self.done is None or self.done.shape[0] != b:
            self.done = torch.zeros(b, dtype=torch.bool)
        new = input_ids[:, self.prompt_len :]
        for r in range(b):
            if self.done[r]:
                continue
            tail = self.tokenizer.decode(new[r, -self.window :], skip_special_tokens=True)
            if any(s in tail for s in self.stops):
                self.done[r] = True
        return self.done.to(input_ids.device)


@dataclass(frozen=True)
class Generated:
    """One greedy continuation: its text and number of generated tokens."""

    text: str
    num_tokens: int


def _row_tokens(row: torch.Tensor, pad_id: int | None, eos_ids: set[int]) -> list[int]:
    """The generated ids of one row, up to its first eos (finished rows are padded)."""
    out = []
    for t in row.tolist():
        if t in eos_ids or t == pad_id:
            break
        out.append(t)
    return out


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    key: KeyLike | None = None,
    alpha: float = 0.1,
    mode: str = "rotate",
    positions: str = "last_prompt",
    stop_strings: Sequence[str] | None = tuple(GENERATION_STOP_STRINGS),
    progress: Callable[[int], None] | None = None,
) -> list[Generated]:
    """Greedy continuations of ``prompts``, optionally steered with ``key``.

    Returns one :class:`Generated` per prompt, in the order given. ``progress`` is called
    with the number of prompts finished after each batch.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of str, not one str")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    out: list[Generated | None] = [None] * len(prompts)
    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        # Left padding (decoder-only batches generate from the right edge), for this call only.
        enc = tokenizer(
            [prompts[i] for i in idx], return_tensors="pt", padding=True, padding_side="left"
        )
        enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
        if stop_strings:
            stop = _StopOnText(tokenizer, enc["input_ids"].shape[1], stop_strings)
            gen_kwargs["stopping_criteria"] = StoppingCriteriaList([stop])
        with torch.inference_mode():
            if key is None:
                seqs = model.generate(**enc, **gen_kwargs)
            else:
                with steer(model, key, alpha=alpha, mode=mode, positions=positions):
                    seqs = model.generate(**enc, **gen_kwargs)
        new = seqs[:, enc["input_ids"].shape[1] :].cpu()
        for row, i in zip(new, idx, strict=True):
            ids = _row_tokens(row, tokenizer.pad_token_id, eos_ids)
            out[i] = Generated(tokenizer.decode(ids, skip_special_tokens=True), len(ids))
        if progress is not None:
            progress(len(idx))
    return [g for g in out if g is not None]


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


@dataclass
class ConditionResult:
    """All items of one condition and their summary."""

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
        return mean([it.num_tokens for it in self.items])

    @property
    def step_rate(self) -> float:
        return rate([it.shows_steps for it in self.items])

    @property
    def mean_answer_words(self) -> float:
        """Mean length in words of the outputs up to their first stop marker (the part the
        grader reads; the token count often just hits the generation budget)."""
        return mean([len(truncate_at_stop(it.output).split()) for it in self.items])

    @property
    def final_rate(self) -> float:
        """Share of outputs that state "The final answer is ..." (the CoT prompt's form)."""
        return rate([it.extraction == "final" for it in self.items])

    @property
    def answered_rate(self) -> float:
        """Share of outputs with an extracted answer."""
        return rate([it.extracted is not None for it in self.items])

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


@dataclass
class EvaluationResult:
    """The conditions of one evaluation, on the same items, with paired comparisons."""

    conditions: dict[str, ConditionResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def comparisons(self, outcome: str = "correct") -> list[PairedComparison]:
        """Each condition against the baseline, and UNLOCK against the random control, on
        ``outcome``: ``"correct"`` (accuracy) or ``"shows_steps"``."""
        if outcome not in ("correct", "shows_steps"):
            raise ValueError(f"outcome must be 'correct' or 'shows_steps', got {outcome!r}")
        out = []
        base = self.conditions.get("baseline")
        for name, cond in self.conditions.items():
            if base is not None and name != "baseline":
                out.append(_compare(base, cond, outcome))
        if "unlock" in self.conditions and "random" in self.conditions:
            out.append(_compare(self.conditions["random"], self.conditions["unlock"], outcome))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "conditions": [c.summary() for c in self.conditions.values()],
            "comparisons": [c.to_dict() for c in self.comparisons()],
            "step_comparisons": [c.to_dict() for c in self.comparisons("shows_steps")],
        }

    def write_items(self, path: str | os.PathLike[str]) -> Path:
        """Per-item JSONL: one line per condition and item."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("w", encoding="utf-8") as f:
            for cond in self.conditions.values():
                for it in cond.items:
                    f.write(json.dumps(it.to_dict(), ensure_ascii=False) + "\n")
        return p


def _compare(a: ConditionResult, b: ConditionResult, outcome: str) -> PairedComparison:
    va = {it.id: bool(getattr(it, outcome)) for it in a.items}
    vb = {it.id: bool(getattr(it, outcome)) for it in b.items}
    ids = [i for i in va if i in vb]
    return paired_comparison(
        [va[i] for i in ids], [vb[i] for i in ids], name_a=a.name, name_b=b.name
    )


def grade_outputs(
    condition: str,
    problems: Sequence[Problem],
    prompts: Sequence[str],
    outputs: Sequence[Generated],
) -> list[ItemResult]:
    """Grade the generated ``outputs`` of ``problems`` (same order) under ``condition``."""
    items = []
    for p, prompt, g in zip(problems, prompts, outputs, strict=True):
        ext = extract_answer(g.text, stop_markers=DEFAULT_STOP_MARKERS)
        items.append(
            ItemResult(
                condition=condition,
                id=p.id,
                question=p.question,
                reference=p.answer,
                prompt=prompt,
                output=g.text,
                extracted=ext.answer,
                extraction=ext.method,
                correct=is_equivalent(ext.answer, p.answer),
                num_tokens=g.num_tokens,
                shows_steps=shows_steps(g.text),
            )
        )
    return items


def evaluate_conditions(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    key: SteeringKey | None = None,
    alpha: float = 0.1,
    conditions: Sequence[str] = CONDITIONS,
    chat: bool | str = False,
    mode: str = "rotate",
    positions: str = "last_prompt",
    max_new_tokens: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    random_key: SteeringKey | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Run ``conditions`` (any of :data:`CONDITIONS`) on ``problems`` with the Target.

    ``key`` (a SteeringKey for this model) is needed by ``unlock`` and ``random``; the random
    control draws a key of the same per-layer norms with ``seed`` unless ``random_key`` is
    given.
    """
    conditions = list(conditions)
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not conditions:
        raise ValueError(f"conditions must be a non-empty subset of {CONDITIONS}, got {conditions}")
    if not problems:
        raise ValueError("problems must not be empty")
    if key is None and any(c in ("unlock", "random") for c in conditions):
        raise ValueError("the unlock and random conditions need a steering key (key=...)")
    questions = [p.question for p in problems]
    prompts = {
        "direct": format_prompts(questions, "direct", tokenizer=tokenizer, chat=chat),
        "cot": format_prompts(questions, "cot", tokenizer=tokenizer, chat=chat),
    }
    if "random" in conditions and random_key is None and key is not None:
        random_key = random_key_like(key, seed=seed)
    results: dict[str, ConditionResult] = {}
    bar = progress_bar(len(problems) * len(conditions), "evaluate", progress)
    try:
        for name in conditions:
            style = "cot" if name == "cot" else "direct"
            use_key = {"unlock": key, "random": random_key}.get(name)
            bar.set_description(f"evaluate {name}")
            t0 = time.perf_counter()
            gens = generate(
                model,
                tokenizer,
                prompts[style],
                key=use_key,
                alpha=alpha,
                mode=mode,
                positions=positions,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=bar.update,
            )
            seconds = time.perf_counter() - t0
            results[name] = ConditionResult(
                name,
                _DESCRIPTIONS[name],
                grade_outputs(name, problems, prompts[style], gens),
                alpha=alpha if use_key is not None else None,
                seconds=seconds,
            )
    finally:
        bar.close()
    settings = {
        "num_items": len(problems),
        "alpha": alpha,
        "mode": mode,
        "positions": positions,
        "max_new_tokens": max_new_tokens,
        "chat": chat,
        "seed": seed,
    }
    return EvaluationResult(results, settings)
