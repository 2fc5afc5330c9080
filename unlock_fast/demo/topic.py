"""The demo's topic part: a topic direction moved from the Source to the Target.

The Source's direction contrasts "Write a sentence." with "Write a sentence about <topic>."
(:mod:`.topic_items`); it goes through an alignment map fitted on one choice of data
(:data:`ALIGNMENT_DATA`) and steers the Target, which continues a neutral sentence start
under the locked instruction. The measure is the share of continuations on the topic. The
key is tested against random keys (Gaussian Source directions sent through the same map,
with the key's per-layer norms) and null-contrast keys; the Target's own direction is the
ceiling. Rank and alpha are chosen on held-out items only.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..alignment import collect_alignment_stats
from ..artifacts import Alignment, AlignmentStats, Direction, SteeringKey
from ..artifacts.data import ALIGNMENT_DATA, data_record
from ..corpus import corpus_hash, generic_corpus
from ..direction import extract_direction
from ..evaluation.conditions import Runner
from ..evaluation.grading import accuracy
from ..evaluation.null import holm, permutation_p_value
from ..evaluation.null_keys import (
    RepresentationalNull,
    null_contrast_directions,
    null_contrast_keys,
    random_keys,
    representational_null,
)
from .topic_items import TOPICS, TopicItem, TopicSpec, first_line, prompts, topic_splits

__all__ = [
    "TopicChoice", "TopicCondition", "TopicConfig", "TopicOutput",
    "TopicResult", "mapped_random_keys", "run_topic"
]  # fmt: skip

# The data the alignment map is fitted on (METHOD.md, "What the map can carry").


@dataclass(frozen=True)
class TopicConfig:
    """Settings of the topic part. More than one rank or alpha: chosen on the held-out items
    (the key's on-topic rate minus the median of ``select_random`` random keys'); the own
    direction's alpha likewise, against Gaussian random keys in the Target space."""

    topic: str = "ocean"
    n_train: int = 64
    n_heldout: int = 0
    n_test: int = 48
    # The map fitted on the locked prompts and a generic corpus (evidence/topic/: it beat all
    # 19 random keys in both directions with 4096 sentences). 1024 sentences keep the part
    # near 3 minutes on one CPU thread; at that size held-out items chose rank 256, alpha 0.3.
    alignment_data: tuple[str, ...] = ("locked+corpus",)
    corpus_size: int = 1024
    ranks: tuple[int, ...] = (256,)
    alphas: tuple[float, ...] = (0.3,)
    # The own direction's alpha when alphas holds one value (else chosen on held-out items):
    # Gemma's own direction breaks at 0.3 (held-out: 91% on topic at 0.1, 31% at 0.3).
    own_alpha: float | None = 0.1
    select_random: int = 3
    random_keys: int = 5
    null_contrasts: int = 1
    num_random: int = 200  # random Source directions for the cosine band (no generation)
    max_new_tokens: int = 12
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.topic not in TOPICS:
            raise ValueError(f"topic must be one of {sorted(TOPICS)}, got {self.topic!r}")
        if not self.alignment_data or any(d not in ALIGNMENT_DATA for d in self.alignment_data):
            raise ValueError(
                f"alignment_data must be a non-empty tuple of {ALIGNMENT_DATA}, got "
                f"{self.alignment_data!r}"
            )
        if len(set(self.alignment_data)) != len(self.alignment_data):
            raise ValueError(f"alignment_data names a choice twice: {self.alignment_data}")
        counts = {
            "n_train": (self.n_train, 2), "n_heldout": (self.n_heldout, 0),
            "n_test": (self.n_test, 1), "corpus_size": (self.corpus_size, 1),
            "select_random": (self.select_random, 1), "random_keys": (self.random_keys, 0),
            "null_contrasts": (self.null_contrasts, 0), "num_random": (self.num_random, 1),
            "max_new_tokens": (self.max_new_tokens, 1), "batch_size": (self.batch_size, 1),
        }  # fmt: skip
        for name, (v, least) in counts.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
        if not self.ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1
                                 for r in self.ranks):  # fmt: skip
            raise ValueError(f"ranks must be a non-empty tuple of ints >= 1, got {self.ranks!r}")
        if not self.alphas or any(not 0 < float(a) < 10 for a in self.alphas):
            raise ValueError(f"alphas must be a non-empty tuple in (0, 10), got {self.alphas!r}")
        if self.own_alpha is not None and not 0 < float(self.own_alpha) < 10:
            raise ValueError(f"own_alpha must be None or in (0, 10), got {self.own_alpha!r}")
        if self.selects and self.n_heldout < 1:
            raise ValueError("choosing among several ranks or alphas needs n_heldout >= 1")

    @property
    def selects(self) -> bool:
        """Whether rank or alpha is chosen on the held-out items."""
        return len(self.ranks) > 1 or len(self.alphas) > 1

    @property
    def spec(self) -> TopicSpec:
        return TOPICS[self.topic]


@dataclass(frozen=True)
class TopicOutput:
    """One item under one condition."""

    condition: str
    id: str
    prompt: str
    output: str
    words: list[str]
    on_topic: bool
    num_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TopicCondition:
    """The items of one condition: ``family`` is unsteered, own, key, random or
    null_contrast; ``data`` the alignment data of a transferred or null key."""

    name: str
    family: str
    items: list[TopicOutput]
    alpha: float | None = None
    data: str | None = None
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return sum(it.on_topic for it in self.items) / len(self.items)

    def summary(self) -> dict[str, Any]:
        acc = accuracy([it.on_topic for it in self.items])
        return {
            "condition": self.name, "family": self.family, "data": self.data,
            "alpha": self.alpha, "on_topic": acc.correct, "n": acc.n, "rate": acc.value,
            "ci95": [acc.low, acc.high], "seconds": self.seconds,
        }  # fmt: skip


@dataclass
class TopicChoice:
    """One alignment data choice: its map, its key against its null keys on the test items,
    the held-out selection and the key's cosine with the Target's own direction."""

    data: str
    num_rows: int
    rank: int
    k: int
    alpha: float
    selection: list[dict[str, Any]]
    key: TopicCondition | None = None
    random: list[TopicCondition] = field(default_factory=list)
    null_contrast: list[TopicCondition] = field(default_factory=list)
    cosine: RepresentationalNull | None = None
    steering_key: SteeringKey | None = None  # the transferred key itself (not in to_dict)

    @property
    def p_random(self) -> float:
        """(1 + #{random >= key}) / (1 + n), on the test items."""
        if self.key is None:
            return float("nan")
        return permutation_p_value(self.key.rate, [c.rate for c in self.random])

    @property
    def p_null_contrast(self) -> float:
        if self.key is None:
            return float("nan")
        return permutation_p_value(self.key.rate, [c.rate for c in self.null_contrast])

    def to_dict(self) -> dict[str, Any]:
        conds = [c for c in (self.key, *self.random, *self.null_contrast) if c is not None]
        return {
            "data": self.data, "num_rows": self.num_rows, "rank": self.rank, "k": self.k,
            "alpha": self.alpha, "selection": self.selection,
            "conditions": [c.summary() for c in conds],
            "p_random": self.p_random, "p_null_contrast": self.p_null_contrast,
            "cosine": None if self.cosine is None else self.cosine.to_dict(),
        }  # fmt: skip


@dataclass
class TopicResult:
    """What the topic part measured (``choices`` fills in as the run goes)."""

    config: TopicConfig
    source: str
    target: str
    corpus_rows: int = 0
    corpus_dropped: int = 0
    corpus_hash: str = ""
    unsteered: TopicCondition | None = None
    own: TopicCondition | None = None
    own_selection: list[dict[str, Any]] = field(default_factory=list)
    choices: dict[str, TopicChoice] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def conditions(self) -> list[TopicCondition]:
        out = [c for c in (self.unsteered, self.own) if c is not None]
        for ch in self.choices.values():
            out += [c for c in (ch.key, *ch.random, *ch.null_contrast) if c is not None]
        return out

    @property
    def holm_h1(self) -> dict[str, float]:
        """Holm over the corpus-based choices' random-key p (the transfer hypotheses)."""
        ps = {d: c.p_random for d, c in self.choices.items() if "corpus" in d and c.key}
        return holm(ps) if ps else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config), "source": self.source, "target": self.target,
            "words": list(self.config.spec.words), "corpus_rows": self.corpus_rows,
            "corpus_dropped": self.corpus_dropped, "corpus_hash": self.corpus_hash,
            "unsteered": None if self.unsteered is None else self.unsteered.summary(),
            "own": None if self.own is None else self.own.summary(),
            "own_selection": self.own_selection,
            "choices": {k: v.to_dict() for k, v in self.choices.items()},
            "holm_h1": self.holm_h1, "timings_s": self.timings,
        }  # fmt: skip


def mapped_random_keys(
    alignment: Alignment, like: SteeringKey, num: int, *, seed: int = 0
) -> list[SteeringKey]:
    """``num`` Gaussian Source directions (seeds ``seed``, ``seed + 1``, ...; one vector per
    Source layer of the layer map) sent through ``alignment``, with ``like``'s per-layer
    norms: null keys that live where the map sends any Source direction."""
    layers = sorted({s for s, _ in alignment.layer_map})
    dirs = []
    for j in range(num):
        gen = torch.Generator().manual_seed(seed + j)
        noise = torch.randn(len(layers), alignment.source.hidden_size, generator=gen)
        dirs.append(Direction(noise, layers, "random", 0, alignment.source))
    keys = null_contrast_keys(alignment, dirs, like)
    origin = {"kind": "random_via_alignment", "like": dict(like.origin)}
    return [
        SteeringKey(k.vectors, k.layers, k.model, {**origin, "seed": seed + j})
        for j, k in enumerate(keys)
    ]


def _generate(
    target: Runner,
    items: Sequence[TopicItem],
    spec: TopicSpec,
    name: str,
    family: str,
    key: SteeringKey | None = None,
    alpha: float | None = None,
    data: str | None = None,
) -> TopicCondition:
    t0 = time.perf_counter()
    texts = prompts(items)
    runner = target if key is None or alpha is None else target.with_alpha(alpha)
    outs = []
    for it, p, (text, n) in zip(items, texts, runner.generate(texts, key), strict=True):
        words = spec.matches(first_line(text))
        outs.append(TopicOutput(name, it.id, p, text, words, bool(words), n))
    return TopicCondition(name, family, outs, alpha, data, time.perf_counter() - t0)


def _choose(
    target: Runner,
    items: Sequence[TopicItem],
    spec: TopicSpec,
    keys: Mapping[int, tuple[SteeringKey, list[SteeringKey]]],
    alphas: Sequence[float],
) -> tuple[int, float, list[dict[str, Any]]]:
    """The (rank, alpha) of ``keys`` (rank -> key and its random keys) with the best held-out
    score: the key's rate minus the median of its random keys' rates; ties to the smaller
    alpha, then the smaller rank."""
    table: list[dict[str, Any]] = []
    for rank, (key, nulls) in keys.items():
        for alpha in alphas:
            rate = _generate(target, items, spec, "heldout", "key", key, alpha).rate
            null = [_generate(target, items, spec, "heldout", "random", k, alpha).rate
                    for k in nulls]  # fmt: skip
            score = rate - statistics.median(null)
            table.append(dict(rank=rank, alpha=alpha, rate=rate, random=null, score=score))
    best = max(table, key=lambda r: (r["score"], -r["alpha"], -r["rank"]))
    return int(best["rank"]), float(best["alpha"]), table


def run_topic(
    source: Runner,
    target: Runner,
    config: TopicConfig = TopicConfig(),
    *,
    source_name: str = "source",
    target_name: str = "target",
    checkpoint: Callable[[TopicResult], None] | None = None,
) -> TopicResult:
    """Run the topic part on the Source and Target (only their models, tokenizers, batch
    size and progress setting are used); ``checkpoint`` is called with the result after each
    stage, so a report can be written while the run goes on."""
    cfg, spec = config, config.spec
    clock = [time.perf_counter()]
    result = TopicResult(cfg, source_name, target_name)

    def lap(name: str) -> None:
        now = time.perf_counter()
        result.timings[name] = result.timings.get(name, 0.0) + now - clock[0]
        clock[0] = now
        if checkpoint is not None:
            checkpoint(result)

    splits = topic_splits(
        {"train": cfg.n_train, "heldout": cfg.n_heldout, "test": cfg.n_test}, seed=cfg.seed
    )
    gen = replace(
        target, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
        stop_strings=("\n",),
    )  # fmt: skip
    kw: dict[str, Any] = dict(batch_size=cfg.batch_size, progress=target.progress)
    locked, unlocked = prompts(splits["train"]), prompts(splits["train"], spec)
    direction = extract_direction(source.model, source.tokenizer, locked, unlocked, **kw)
    own = extract_direction(target.model, target.tokenizer, locked, unlocked, **kw)
    corpus: list[str] = []
    if any("corpus" in d for d in cfg.alignment_data):
        drawn = generic_corpus(cfg.corpus_size, seed=cfg.seed)
        corpus = [s for s in drawn if not spec.matches(s)]
        result.corpus_rows, result.corpus_dropped = len(corpus), len(drawn) - len(corpus)
        result.corpus_hash = corpus_hash(corpus)
    lap("directions")

    parts: dict[str, AlignmentStats] = {}
    texts = {"locked": locked, "unlocked": unlocked, "corpus": corpus}

    def stats(data: str) -> AlignmentStats:
        # Each part is collected once; a choice's statistics are its parts merged (exactly
        # the concatenated rows), recorded as that choice.
        names = data.split("+")
        for part in names:
            if part not in parts:
                parts[part] = collect_alignment_stats(
                    source.model, source.tokenizer, target.model, target.tokenizer,
                    texts[part], **kw,
                )  # fmt: skip
        merged = copy.deepcopy(parts[names[0]])  # merge() adds in place
        for part in names[1:]:
            merged.merge(parts[part])
        n = {part: len(texts[part]) if part in names else 0 for part in texts}
        merged.origin["alignment_data"] = data_record(
            data, locked=n["locked"], unlocked=n["unlocked"], corpus=n["corpus"],
            corpus_source=f"generic_corpus({cfg.corpus_size}, seed={cfg.seed}) without "
            "topic words" if n["corpus"] else None, corpus_hash=result.corpus_hash,
        )  # fmt: skip
        return merged

    own_key = own.as_key()
    result.unsteered = _generate(gen, splits["test"], spec, "unsteered", "unsteered")
    own_alpha = cfg.alphas[0] if cfg.own_alpha is None else cfg.own_alpha
    if cfg.selects and len(cfg.alphas) > 1:
        nulls = random_keys(own_key, cfg.select_random, seed=cfg.seed)
        _, own_alpha, result.own_selection = _choose(
            gen, splits["heldout"], spec, {0: (own_key, nulls)}, cfg.alphas
        )
    result.own = _generate(gen, splits["test"], spec, "own", "own", own_key, own_alpha)
    lap("unsteered and own direction")

    contrast: list[Direction] = []
    if cfg.null_contrasts:
        contrast = null_contrast_directions(
            source.model, source.tokenizer, locked, unlocked, num=cfg.null_contrasts,
            seed=cfg.seed, batch_size=cfg.batch_size, progress=target.progress,
        )  # fmt: skip
    for data in cfg.alignment_data:
        st = stats(data)
        ceiling = min(st.num_rows, st.source.hidden_size, st.target.hidden_size)
        named: dict[int, int] = {}  # k -> the smallest rank that gives it
        for r in sorted(cfg.ranks):
            named.setdefault(min(r, ceiling), r)
        fits = st.fit_ranks(sorted(named))
        candidates = {named[k]: fits[k] for k in named}
        keys = {r: a.transfer(direction) for r, a in candidates.items()}
        rank, alpha = min(candidates), cfg.alphas[0]
        table: list[dict[str, Any]] = []
        if len(candidates) > 1 or len(cfg.alphas) > 1:
            null = {
                r: (keys[r], mapped_random_keys(a, keys[r], cfg.select_random, seed=cfg.seed))
                for r, a in candidates.items()
            }
            rank, alpha, table = _choose(gen, splits["heldout"], spec, null, cfg.alphas)
        alignment, key = candidates[rank], keys[rank]
        choice = TopicChoice(data, alignment.num_rows, rank, alignment.k, alpha, table)
        choice.steering_key = key
        result.choices[data] = choice
        lap(f"{data}: alignment and selection")
        choice.key = _generate(gen, splits["test"], spec, f"key[{data}]", "key", key, alpha, data)
        rnd = mapped_random_keys(alignment, key, cfg.random_keys, seed=cfg.seed)
        choice.random = [
            _generate(gen, splits["test"], spec, f"random_{cfg.seed + j}[{data}]", "random", k,
                      alpha, data)
            for j, k in enumerate(rnd)
        ]  # fmt: skip
        nc = null_contrast_keys(alignment, contrast, key)
        choice.null_contrast = [
            _generate(gen, splits["test"], spec, f"null_contrast_{j}[{data}]", "null_contrast",
                      k, alpha, data)
            for j, k in enumerate(nc)
        ]  # fmt: skip
        choice.cosine = representational_null(
            key, own, alignment=alignment, num_random=cfg.num_random, contrast_keys=nc,
            seed=cfg.seed,
        )  # fmt: skip
        lap(f"{data}: test")
    result.timings["total"] = sum(v for k, v in result.timings.items() if k != "total")
    if checkpoint is not None:
        checkpoint(result)
    return result
