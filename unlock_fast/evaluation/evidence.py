"""The transfer run on evaluation items, and the evidence built on it.

:func:`run_transfer`: the Source's CoT direction and the alignment in one pass, the key and
the held-out diagnostics. Then the key against null keys (:func:`behavioural_evidence`),
the Source layer per Target layer chosen on held-out items against proportional depth
(:func:`correspondence_evidence`), and steering only the well-aligned layers
(:func:`subset_evidence`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..alignment import collect_alignment_stats
from ..artifacts import Alignment, AlignmentReport, AlignmentStats, Direction, SteeringKey
from ..direction import extract_direction
from ..estimator import check_fit_settings
from ..transfer import collect_transfer
from .conditions import ConditionResult, EvaluationResult, Runner, compare
from .correspondence import (
    LayerCorrespondence,
    LayerSubset,
    collect_correspondence_stats,
    compare_layer_maps,
    select_layer_map,
    select_layer_subset,
)
from .grading import PairedComparison
from .null import BehaviouralNull, behavioural_null
from .null_keys import (
    RepresentationalNull,
    null_contrast_directions,
    null_contrast_keys,
    random_keys,
    representational_null,
)
from .problems import Problem, check_disjoint

__all__ = [
    "CorrespondenceEvidence", "Evidence", "SubsetEvidence", "TransferRun",
    "behavioural_evidence", "correspondence_evidence", "null_contrast_keys_for",
    "run_transfer", "subset_evidence", "target_direction"
]  # fmt: skip


@dataclass
class TransferRun:
    """What :func:`run_transfer` made; direction and key are None when not asked for, the
    held-out statistics and diagnostics without held-out items."""

    direction: Direction | None
    stats: AlignmentStats
    alignment: Alignment
    key: SteeringKey | None
    heldout_stats: AlignmentStats | None = None
    diagnostics: AlignmentReport | None = None


def run_transfer(
    source: Runner,
    target: Runner,
    train: Sequence[Problem],
    heldout: Sequence[Problem] | None = None,
    *,
    rank: int = 64,
    method: str = "mean",
    centered: bool = False,
    ridge: float = 0.0,
    layer_map: Any = None,
    with_direction: bool = True,
    accumulate: torch.dtype = torch.float64,
    solver: str = "auto",
    oversample: int | None = None,
    n_iter: int | None = None,
    data: Mapping[str, Any] | None = None,
) -> TransferRun:
    """Source direction (direct vs CoT prompt) and alignment (direct prompt) in one pass, the
    key, and held-out diagnostics; settings checked before any forward pass. ``accumulate``:
    the dtype of the sums; ``solver``, ``oversample``, ``n_iter``: the eigensolver; ``data``:
    the fit's rows (``alignment_data``, ``corpus``, ``corpus_limit`` of collect_transfer)."""
    fit: dict[str, Any] = dict(solver=solver, oversample=oversample, n_iter=n_iter)
    check_fit_settings([rank], ridge, **fit)
    if not train:
        raise ValueError("train must hold at least one problem")
    if heldout:
        check_disjoint(train=train, heldout=heldout)
    models = (source.model, source.tokenizer, target.model, target.tokenizer)
    kw: dict[str, Any] = dict(
        batch_size=target.batch_size, progress=target.progress, accumulate=accumulate
    )
    prompts, unlocked = (source.prompts(train), target.prompts(train)), source.prompts(train, "cot")
    rows: dict[str, Any] = {**(data or {}), "target_prompts_unlocked": target.prompts(train, "cot")}
    if with_direction:
        direction, stats = collect_transfer(
            *models, prompts[0], unlocked, target_prompts=prompts[1], method=method,
            layer_map=layer_map, **{**kw, **rows},
        )  # fmt: skip
    else:
        direction = None
        stats = collect_alignment_stats(
            *models, prompts[0], prompts_unlocked=unlocked, target_prompts=prompts[1],
            layer_map=layer_map, **{**kw, **rows},
        )  # fmt: skip
    alignment = stats.fit(rank, centered, ridge, **fit)
    key = None if direction is None else alignment.transfer(direction)
    run = TransferRun(direction, stats, alignment, key)
    if heldout:
        run.heldout_stats = collect_alignment_stats(
            *models, source.prompts(heldout), target_prompts=target.prompts(heldout),
            layer_map=alignment.layer_map, **kw,
        )  # fmt: skip
        run.diagnostics = alignment.diagnose(run.heldout_stats)
    return run


def target_direction(
    target: Runner, problems: Sequence[Problem], *, method: str = "mean"
) -> Direction:
    """A model's own CoT direction (direct vs CoT prompt) on ``problems``."""
    return extract_direction(
        target.model, target.tokenizer, target.prompts(problems, "direct"),
        target.prompts(problems, "cot"), method=method, batch_size=target.batch_size,
        progress=target.progress,
    )  # fmt: skip


def null_contrast_keys_for(
    source: Runner,
    problems: Sequence[Problem],
    alignment: Alignment,
    key: SteeringKey,
    *,
    num: int,
    seed: int = 0,
) -> list[SteeringKey]:
    """``num`` null-contrast keys from the items the key's direction came from."""
    if num == 0:
        return []
    dirs = null_contrast_directions(
        source.model, source.tokenizer, source.prompts(problems, "direct"),
        source.prompts(problems, "cot"), num=num, seed=seed,
        layers=sorted({s for s, _ in alignment.layer_map}), batch_size=source.batch_size,
        progress=source.progress,
    )  # fmt: skip
    return null_contrast_keys(alignment, dirs, key)


def behavioural_evidence(
    target: Runner,
    problems: Sequence[Problem],
    evaluation: EvaluationResult,
    key: SteeringKey,
    *,
    num_random: int = 1,
    contrast_keys: Sequence[SteeringKey] = (),
    seed: int = 0,
) -> tuple[BehaviouralNull | None, dict[str, list[ConditionResult]]]:
    """The key's condition against ``num_random`` random keys (seeds ``seed``, ``seed + 1``,
    ...; the evaluation's random condition is the first) and ``contrast_keys``, on the same
    items: the test (None without unlock or null keys) and the null conditions per family."""
    unlock, have = evaluation.conditions.get("unlock"), evaluation.conditions.get("random")
    if unlock is None:
        return None, {}
    first = 1 if have is not None else 0
    extra = random_keys(key, max(0, num_random - first), seed=seed + first)
    keys = {f"random_{seed + first + i}": k for i, k in enumerate(extra)}
    keys.update({f"null_contrast_{j}": k for j, k in enumerate(contrast_keys)})
    done = target.evaluate_keys(problems, keys) if keys else {}
    families = {
        "random": ([have] if have is not None and num_random > 0 else [])
        + [c for n, c in done.items() if n.startswith("random_")],
        "null_contrast": [c for n, c in done.items() if n.startswith("null_contrast_")],
    }
    families = {k: v for k, v in families.items() if v}
    return (behavioural_null(unlock, families) if families else None), families


@dataclass
class CorrespondenceEvidence:
    """The held-out choice of Source layers against proportional depth: per map
    ("proportional", "selected"), the test-split R² per Target layer of the rank-k map
    fitted on the training items, and the representational test of the key through it."""

    correspondence: LayerCorrespondence
    r2: dict[str, list[float]]
    cosine: dict[str, RepresentationalNull]

    def to_dict(self) -> dict[str, Any]:
        return {"correspondence": self.correspondence, "r2_test": self.r2, "cosine": self.cosine}


def correspondence_evidence(
    source: Runner,
    target: Runner,
    splits: Mapping[str, Sequence[Problem]],
    direction: Direction,
    own: Direction,
    *,
    criterion: str = "r2",
    rank: int = 32,
    num_random: int = 200,
    seed: int = 0,
) -> CorrespondenceEvidence:
    """A Source layer per Target layer chosen on held-out items, against proportional depth
    on the test items' R² and on the key's cosine with ``own`` through each map."""

    def collect(items: Sequence[Problem], pairs: Any = None) -> Any:
        return collect_correspondence_stats(
            source.model, source.tokenizer, target.model, target.tokenizer,
            source.prompts(items), target_prompts=target.prompts(items), pairs=pairs,
            batch_size=target.batch_size, progress=target.progress,
        )  # fmt: skip

    train, heldout = collect(splits["train"]), collect(splits["heldout"])
    corr = select_layer_map(train, heldout, criterion=criterion, rank=rank)
    maps = {"proportional": corr.proportional, "selected": corr.layer_map}
    test = collect(splits["test"], pairs=sorted(set(corr.proportional) | set(corr.layer_map)))
    cosine = {}
    for name, layer_map in maps.items():
        alignment = train.alignment_stats(layer_map).fit(rank=rank)
        key = alignment.transfer(direction)
        cosine[name] = representational_null(
            key, own, alignment=alignment, num_random=num_random, seed=seed
        )
    return CorrespondenceEvidence(corr, compare_layer_maps(train, test, maps, rank=rank), cosine)


@dataclass
class SubsetEvidence:
    """Steering only the well-aligned layers (``subset``) against steering every layer."""

    subset: LayerSubset
    condition: ConditionResult
    comparisons: dict[str, list[PairedComparison]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "subset": self.subset,
            "condition": self.condition.summary(),
            "comparisons": self.comparisons,
        }


def subset_evidence(
    target: Runner,
    problems: Sequence[Problem],
    evaluation: EvaluationResult,
    key: SteeringKey,
    diagnostics: AlignmentReport,
    *,
    threshold: float | None = None,
) -> SubsetEvidence:
    """Steer only the layers of good held-out R² and compare, item by item, with steering
    every layer and with the baseline."""
    targets = [t for _, t in diagnostics.layer_map]
    subset = select_layer_subset(targets, diagnostics.r2, threshold=threshold)
    description = "Target, direct prompt + the key on the well-aligned layers only"
    cond = target.evaluate_keys(problems, {"unlock_subset": key.select(subset.layers)}, description)
    others = [c for n in ("unlock", "baseline") if (c := evaluation.conditions.get(n))]
    comps = {
        label: [compare(other, cond["unlock_subset"], outcome) for other in others]
        for label, outcome in (("accuracy", "correct"), ("shows steps", "shows_steps"))
    }
    return SubsetEvidence(subset, cond["unlock_subset"], comps)


@dataclass
class Evidence:
    """Everything beyond the four conditions (each part None when not run)."""

    representation: RepresentationalNull
    behaviour: BehaviouralNull | None = None
    null_conditions: dict[str, list[ConditionResult]] = field(default_factory=dict)
    correspondence: CorrespondenceEvidence | None = None
    subset: SubsetEvidence | None = None
    selection: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:  # nested objects: through report.write_json
        nulls = {k: [c.summary() for c in v] for k, v in self.null_conditions.items()}
        return {
            "selection": self.selection, "representational_null": self.representation,
            "behavioural_null": self.behaviour, "null_conditions": nulls,
            "layer_correspondence": self.correspondence, "layer_subset": self.subset,
        }  # fmt: skip
