"""The evidence that decides whether a transferred key beats chance, and where to steer.

Pieces the demo and ``unlock-fast evaluate`` put together:

- :func:`choose_rank`: the rank chosen on the held-out split only (alpha:
  :func:`~unlock_fast.evaluation.alphas.choose_alpha`);
- :func:`null_contrast_keys_for`: null-contrast keys of a transfer run (:mod:`.null_keys`);
- :func:`behavioural_evidence`: the key's test-split measures against many random keys and
  null-contrast keys (:mod:`.behaviour`);
- :func:`correspondence_evidence`: a Source layer per Target layer chosen on the held-out
  split, compared with proportional depth on the test split's R² and on the key's cosine
  with the Target's own direction (:mod:`.correspondence`);
- :func:`subset_evidence`: steering only the well-aligned layers against steering all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..artifacts import Alignment, AlignmentReport, Direction, SteeringKey
from .behaviour import BehaviouralNull, behavioural_null, evaluate_keys
from .correspondence import (
    LayerCorrespondence,
    collect_correspondence_stats,
    compare_layer_maps,
    select_layer_map,
)
from .layer_subset import LayerSubset, restrict_key, select_layer_subset
from .metrics import PairedComparison, paired_comparison
from .null_keys import (
    RepresentationalNull,
    null_contrast_directions,
    null_contrast_keys,
    random_keys,
    representational_null,
)
from .problem import Problem
from .prompts import format_prompts
from .runner import ConditionResult, EvaluationResult

__all__ = [
    "CorrespondenceEvidence",
    "Evidence",
    "SubsetEvidence",
    "behavioural_evidence",
    "choose_rank",
    "correspondence_evidence",
    "null_contrast_keys_for",
    "subset_evidence",
]


def choose_rank(sweep: Mapping[int, AlignmentReport]) -> int:
    """The rank with the highest mean held-out centred R² (the smaller rank on a tie)."""
    if not sweep:
        raise ValueError("the rank sweep is empty")
    return max(sorted(sweep), key=lambda r: sum(sweep[r].r2) / len(sweep[r].r2))


def null_contrast_keys_for(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    alignment: Alignment,
    key: SteeringKey,
    *,
    num: int,
    seed: int = 0,
    chat: bool | str = False,
    batch_size: int = 8,
    progress: bool = True,
) -> list[SteeringKey]:
    """``num`` null-contrast keys: Source directions from sign-flipped direct/CoT pairs of
    ``problems`` (the items the key's direction came from), sent through ``alignment`` and
    given ``key``'s per-layer norms."""
    if num == 0:
        return []
    q = [p.question for p in problems]
    dirs: list[Direction] = null_contrast_directions(
        model,
        tokenizer,
        format_prompts(q, "direct", tokenizer=tokenizer, chat=chat),
        format_prompts(q, "cot", tokenizer=tokenizer, chat=chat),
        num=num,
        seed=seed,
        layers=sorted({s for s, _ in alignment.layer_map}),
        batch_size=batch_size,
        progress=progress,
    )
    return null_contrast_keys(alignment, dirs, key)


def behavioural_evidence(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    evaluation: EvaluationResult,
    key: SteeringKey,
    *,
    num_random: int = 1,
    contrast_keys: Sequence[SteeringKey] = (),
    seed: int = 0,
    **generation: Any,  # alpha, chat, mode, positions, max_new_tokens, batch_size, progress
) -> tuple[BehaviouralNull | None, dict[str, list[ConditionResult]]]:
    """The key's condition against ``num_random`` random keys (seeds ``seed``, ``seed + 1``,
    ...; the evaluation's own random condition is the first and is not run again) and
    against ``contrast_keys``, on the evaluation's items. Returns the test (None without an
    unlock condition or null keys) and the null conditions per family."""
    unlock = evaluation.conditions.get("unlock")
    if unlock is None:
        return None, {}
    have = evaluation.conditions.get("random")
    first = 1 if have is not None else 0
    extra = random_keys(key, max(0, num_random - first), seed=seed + first)
    keys = {f"random_{seed + first + i}": k for i, k in enumerate(extra)}
    keys.update({f"null_contrast_{j}": k for j, k in enumerate(contrast_keys)})
    done = evaluate_keys(model, tokenizer, problems, keys, **generation) if keys else {}
    families: dict[str, list[ConditionResult]] = {
        "random": ([have] if have is not None and num_random > 0 else [])
        + [c for n, c in done.items() if n.startswith("random_")],
        "null_contrast": [c for n, c in done.items() if n.startswith("null_contrast_")],
    }
    families = {k: v for k, v in families.items() if v}
    if not families:
        return None, {}
    return behavioural_null(unlock, families), families


@dataclass
class CorrespondenceEvidence:
    """The held-out choice of Source layers and its comparison with proportional depth.

    r2: per map ("proportional", "selected"), the test-split R² per Target layer of the
    rank-k map fitted on the training items; cosine: per map, the representational test of
    the key transferred through that map's alignment."""

    correspondence: LayerCorrespondence
    r2: dict[str, list[float]]
    cosine: dict[str, RepresentationalNull]

    def to_dict(self) -> dict[str, Any]:
        return {
            "correspondence": self.correspondence.to_dict(),
            "r2_test": self.r2,
            "cosine": {k: v.to_dict() for k, v in self.cosine.items()},
        }


def correspondence_evidence(
    source: tuple[Any, Any],
    target: tuple[Any, Any],
    splits: Mapping[str, Sequence[Problem]],
    direction: Direction,
    own: Direction,
    *,
    criterion: str = "r2",
    rank: int = 32,
    chats: tuple[bool | str, bool | str] = (False, False),
    num_random: int = 200,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> CorrespondenceEvidence:
    """Collect all-pairs statistics on ``splits["train"]`` and ``splits["heldout"]``, choose
    a Source layer per Target layer on the held-out split, and compare the chosen map with
    proportional depth on ``splits["test"]`` (R²) and on the key's cosine with ``own``."""

    def prompts(model: tuple[Any, Any], chat: bool | str, items: Sequence[Problem]) -> list[str]:
        return format_prompts([p.question for p in items], "direct", tokenizer=model[1], chat=chat)

    def collect(items: Sequence[Problem], pairs: Any = None) -> Any:
        return collect_correspondence_stats(
            source[0], source[1], target[0], target[1], prompts(source, chats[0], items),
            target_prompts=prompts(target, chats[1], items), pairs=pairs,
            batch_size=batch_size, progress=progress,
        )  # fmt: skip

    train, heldout = collect(splits["train"]), collect(splits["heldout"])
    corr = select_layer_map(train, heldout, criterion=criterion, rank=rank)
    maps = {"proportional": corr.proportional, "selected": corr.layer_map}
    test = collect(splits["test"], pairs=sorted(set(corr.proportional) | set(corr.layer_map)))
    r2 = compare_layer_maps(train, test, maps, rank=rank)
    cosine = {}
    for name, layer_map in maps.items():
        alignment = train.alignment_stats(layer_map).fit(rank=rank)
        key = alignment.transfer(direction)
        cosine[name] = representational_null(
            key, own, alignment=alignment, num_random=num_random, seed=seed
        )
    return CorrespondenceEvidence(corr, r2, cosine)


@dataclass
class SubsetEvidence:
    """Steering only the well-aligned layers (``subset``) against steering every layer."""

    subset: LayerSubset
    condition: ConditionResult
    comparisons: dict[str, list[PairedComparison]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "subset": self.subset.to_dict(),
            "condition": self.condition.summary(),
            "comparisons": {k: [c.to_dict() for c in v] for k, v in self.comparisons.items()},
        }


def _paired(a: ConditionResult, b: ConditionResult, outcome: str) -> PairedComparison:
    va = {it.id: bool(getattr(it, outcome)) for it in a.items}
    vb = {it.id: bool(getattr(it, outcome)) for it in b.items}
    ids = [i for i in va if i in vb]
    return paired_comparison(
        [va[i] for i in ids], [vb[i] for i in ids], name_a=a.name, name_b=b.name
    )


def subset_evidence(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    evaluation: EvaluationResult,
    key: SteeringKey,
    diagnostics: AlignmentReport,
    *,
    threshold: float | None = None,
    **generation: Any,  # alpha, chat, mode, positions, max_new_tokens, batch_size, progress
) -> SubsetEvidence:
    """Choose the layers by held-out R² (``diagnostics``), steer only them on ``problems``
    and compare with steering every layer (and with the baseline), item by item."""
    subset = select_layer_subset(
        [t for _, t in diagnostics.layer_map], diagnostics.r2, threshold=threshold
    )
    cond = evaluate_keys(
        model,
        tokenizer,
        problems,
        {"unlock_subset": restrict_key(key, subset.layers)},
        description="Target, direct prompt + the key on the well-aligned layers only",
        **generation,
    )["unlock_subset"]
    others = [
        evaluation.conditions[n] for n in ("unlock", "baseline") if n in evaluation.conditions
    ]
    comps = {
        label: [_paired(other, cond, outcome) for other in others]
        for label, outcome in (("accuracy", "correct"), ("shows steps", "shows_steps"))
    }
    return SubsetEvidence(subset, cond, comps)


@dataclass
class Evidence:
    """Everything beyond the four conditions: settings chosen on held-out, the null tests,
    the layer correspondence and the layer subset (each None when not run)."""

    representation: RepresentationalNull
    behaviour: BehaviouralNull | None = None
    null_conditions: dict[str, list[ConditionResult]] = field(default_factory=dict)
    correspondence: CorrespondenceEvidence | None = None
    subset: SubsetEvidence | None = None
    selection: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "selection": self.selection,
            "representational_null": self.representation.to_dict(),
            "behavioural_null": None if self.behaviour is None else self.behaviour.to_dict(),
            "null_conditions": {
                k: [c.summary() for c in v] for k, v in self.null_conditions.items()
            },
            "layer_correspondence": None
            if self.correspondence is None
            else self.correspondence.to_dict(),
            "layer_subset": None if self.subset is None else self.subset.to_dict(),
        }
