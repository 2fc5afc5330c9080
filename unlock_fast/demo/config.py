"""The demo's settings and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .topic import TopicConfig

__all__ = ["DEFAULTS", "QUICK", "DemoConfig", "DemoResult"]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (see the README for why these defaults)."""

    source: str = "smollm2-135m-instruct"
    target: str = "gemma-3-270m"
    source_chat: bool = False
    target_chat: bool = False
    n_train: int = 64
    n_heldout: int = 32
    n_test: int = 48
    rank: int = 32
    alpha: float = 0.1
    alphas: tuple[float, ...] = ()
    sweep_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    max_new_tokens: int = 48
    batch_size: int = 16
    num_random: int = 200
    seed: int = 0
    random_keys: int = 1  # behavioural null: random keys (the random condition is the first)
    null_contrasts: int = 0  # behavioural null: null-contrast keys
    null_directions: int = 200  # representational null: null-contrast directions
    correspondence: str | None = None  # "r2" or "cka": choose Source layers on held-out
    layer_subset: bool = False  # also steer only the layers with good held-out R²
    select_rank: bool = False  # rank with the best mean held-out R² of sweep_ranks
    select_alpha: bool = False  # alpha of alphas with the best held-out unlock - random steps
    # The alignment's rows: "locked" (paper), "locked+unlocked" (the CoT part's direction is a
    # prompt contrast, so the Target's CoT prompts can join: a ceiling), "corpus",
    # "locked+corpus"; corpus: a text/JSONL file or "generic", corpus_limit: texts of it.
    alignment_data: str = "locked"
    corpus: str | None = None
    corpus_limit: int | None = None
    topic: bool = True  # also the topic part (demo/topic.py)
    topic_config: TopicConfig = TopicConfig()


DEFAULTS = DemoConfig()
# Reduced size for CI (2 cores): same pipeline, fewer items and tokens.
QUICK = replace(
    DEFAULTS, n_train=16, n_heldout=8, n_test=8, max_new_tokens=16, rank=8,
    sweep_ranks=(1, 2, 4, 8), topic_config=replace(
        DEFAULTS.topic_config, n_train=16, n_heldout=0, n_test=8, corpus_size=64, ranks=(8,),
        random_keys=2, null_contrasts=1, max_new_tokens=8,
    ),
)  # fmt: skip


@dataclass
class DemoResult:
    """What the demo measured; ``files`` maps names to the paths written."""

    config: DemoConfig
    diagnostics: Any
    rank_sweep: dict[int, Any]
    evaluation: Any
    alpha_curves: dict[str, dict[str, list[tuple[float, float, float, float]]]]
    timings: dict[str, float]
    files: dict[str, Path]
    evidence: Any = None
    topic: Any = None  # TopicResult when the topic part ran
