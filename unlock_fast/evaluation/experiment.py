"""The transfer experiment on evaluation items, and its representational evidence.

:func:`run_transfer` renders problems in the paper's two prompt forms for each model,
extracts the Source's CoT direction, fits the Source→Target alignment on the locked form,
diagnoses it on held-out items and transfers the direction into a Target key.

The evidence that does not depend on generation:

- :func:`rank_sweep`: held-out relative error and centred R² per layer for several ranks;
- :func:`key_cosines`: cosine, per Target layer, between the transferred key and the
  Target's own CoT direction (extracted on held-out items), against random Source directions
  sent through the same alignment (the control for "any vector mapped by T looks alike").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..alignment import check_fit_options, collect_alignment_stats, fit_options
from ..artifacts import Alignment, AlignmentReport, AlignmentStats, Direction, SteeringKey
from ..direction import extract_direction
from ..transfer import collect_transfer
from .problem import Problem
from .prompts import format_prompts

__all__ = [
    "CosineEvidence",
    "TransferRun",
    "check_disjoint",
    "key_cosines",
    "rank_sweep",
    "run_transfer",
    "target_direction",
]


def check_disjoint(**splits: Sequence[Problem]) -> None:
    """Raise ValueError when two named splits share a question."""
    seen: dict[str, str] = {}
    for name, items in splits.items():
        for p in items:
            other = seen.get(p.question)
            if other is not None and other != name:
                raise ValueError(
                    f"splits {other!r} and {name!r} share the question {p.question[:60]!r}; "
                    "held-out and test items must be disjoint from the training items"
                )
            seen[p.question] = name


@dataclass
class TransferRun:
    """Everything :func:`run_transfer` made.

    direction: the Source's CoT direction [L_s, d_s]; stats: alignment statistics of the
    training items; alignment: fitted at ``rank``; key: the transferred Target key
    [L_t, d_t]; heldout_stats / diagnostics: held-out statistics and their report (None
    without held-out items).
    """

    direction: Direction | None
    stats: AlignmentStats
    alignment: Alignment
    key: SteeringKey | None
    heldout_stats: AlignmentStats | None = None
    diagnostics: AlignmentReport | None = None


def run_transfer(
    source_model: Any,
    source_tokenizer: Any,
    target_model: Any,
    target_tokenizer: Any,
    train: Sequence[Problem],
    heldout: Sequence[Problem] | None = None,
    *,
    rank: int = 64,
    method: str = "mean",
    centered: bool = False,
    ridge: float = 0.0,
    layer_map: Any = None,
    source_chat: bool | str = False,
    target_chat: bool | str = False,
    batch_size: int = 8,
    progress: bool = True,
    with_direction: bool = True,
    accumulate: torch.dtype = torch.float64,
    solver: str | None = None,
    oversample: int | None = None,
    n_iter: int | None = None,
) -> TransferRun:
    """Direction on the Source (direct vs CoT prompt), alignment on the direct prompt,
    transfer, and held-out diagnostics when ``heldout`` is given.

    The Source's direct-prompt pass feeds the direction and the alignment at once
    (:func:`~unlock_fast.collect_transfer`). With ``with_direction=False`` only the
    alignment is made (the run's ``direction`` and ``key`` are None). ``accumulate`` is the
    dtype of the alignment's sums; ``solver``, ``oversample`` and ``n_iter`` choose the
    eigensolver of the fit (None: its defaults). The rank and these settings are checked
    before any forward pass.
    """
    options = fit_options(solver, oversample, n_iter)
    check_fit_options(rank, ridge, options)
    if not train:
        raise ValueError("train must hold at least one problem")
    if heldout:
        check_disjoint(train=train, heldout=heldout)
    q = [p.question for p in train]
    s_locked = format_prompts(q, "direct", tokenizer=source_tokenizer, chat=source_chat)
    s_unlocked = format_prompts(q, "cot", tokenizer=source_tokenizer, chat=source_chat)
    t_locked = format_prompts(q, "direct", tokenizer=target_tokenizer, chat=target_chat)
    direction: Direction | None = None
    key: SteeringKey | None = None
    if with_direction:
        direction, stats = collect_transfer(
            source_model,
            source_tokenizer,
            target_model,
            target_tokenizer,
            s_locked,
            s_unlocked,
            target_prompts=t_locked,
            method=method,
            layer_map=layer_map,
            batch_size=batch_size,
            progress=progress,
            accumulate=accumulate,
        )
    else:
        stats = collect_alignment_stats(
            source_model,
            source_tokenizer,
            target_model,
            target_tokenizer,
            s_locked,
            target_prompts=t_locked,
            layer_map=layer_map,
            batch_size=batch_size,
            progress=progress,
            accumulate=accumulate,
        )
    alignment = stats.fit(rank=rank, centered=centered, ridge=ridge, **options)
    if direction is not None:
        key = alignment.transfer(direction)
    run = TransferRun(direction, stats, alignment, key)
    if heldout:
        hq = [p.question for p in heldout]
        run.heldout_stats = collect_alignment_stats(
            source_model,
            source_tokenizer,
            target_model,
            target_tokenizer,
            format_prompts(hq, "direct", tokenizer=source_tokenizer, chat=source_chat),
            target_prompts=format_prompts(
                hq, "direct", tokenizer=target_tokenizer, chat=target_chat
            ),
            layer_map=alignment.layer_map,
            batch_size=batch_size,
            progress=progress,
            accumulate=accumulate,
        )
        run.diagnostics = alignment.diagnose(run.heldout_stats)
    return run


def target_direction(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    chat: bool | str = False,
    method: str = "mean",
    batch_size: int = 8,
    progress: bool = True,
) -> Direction:
    """A model's own CoT direction (direct vs CoT prompt) on ``problems``."""
    q = [p.question for p in problems]
    return extract_direction(
        model,
        tokenizer,
        format_prompts(q, "direct", tokenizer=tokenizer, chat=chat),
        format_prompts(q, "cot", tokenizer=tokenizer, chat=chat),
        method=method,
        batch_size=batch_size,
        progress=progress,
    )


def rank_sweep(
    stats: AlignmentStats,
    heldout_stats: AlignmentStats,
    ranks: Sequence[int],
    **fit: Any,  # keywords of AlignmentStats.fit_ranks
) -> dict[int, AlignmentReport]:
    """Held-out diagnostics (AlignmentReport) of the alignment at each rank."""
    ranks = sorted({int(r) for r in ranks})
    fitted = stats.fit_ranks(ranks, **fit)
    return {r: fitted[r].diagnose(heldout_stats) for r in ranks}


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of a [..., d] against b [d] (float64)."""
    a, b = a.double(), b.double()
    return (a @ b) / (a.norm(dim=-1) * b.norm()).clamp_min(1e-300)


@dataclass
class CosineEvidence:
    """Per Target layer: cosine of the transferred key with the Target's own direction, and
    the same cosine for ``num_random`` random Source directions sent through the alignment.

    random_low/high: the 2.5% and 97.5% quantiles of the random cosines; exceed: share of
    random cosines at least as large as the key's (an empirical one-sided p-value);
    chance: 1.96/sqrt(d_t), the 95% band of a direction drawn at random in the Target space.
    """

    layers: list[int]
    cosine: list[float]
    random_mean: list[float]
    random_low: list[float]
    random_high: list[float]
    exceed: list[float]
    chance: float
    num_random: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def layers_above_band(self) -> list[int]:
        return [
            layer
            for layer, c, hi in zip(self.layers, self.cosine, self.random_high, strict=True)
            if c > hi
        ]


def key_cosines(
    key: SteeringKey,
    own: Direction,
    *,
    alignment: Alignment | None = None,
    num_random: int = 200,
    seed: int = 0,
) -> CosineEvidence:
    """Compare a transferred key with the Target's own direction, layer by layer.

    With ``alignment``, random controls are Gaussian Source directions mapped by the same
    per-layer map (so they live in the same subspace as the key); without it, Gaussian
    Target directions.
    """
    if not isinstance(num_random, int) or num_random < 1:
        raise ValueError(f"num_random must be a positive int, got {num_random!r}")
    if key.model.hidden_size != own.model.hidden_size:
        raise ValueError(
            f"the key (hidden size {key.model.hidden_size}) and the own direction (hidden size "
            f"{own.model.hidden_size}) belong to different models"
        )
    gen = torch.Generator().manual_seed(seed)
    layers = [layer for layer in key.layers if layer in own.layers]
    if not layers:
        raise ValueError(f"no common layers: key {key.layers}, own direction {own.layers}")
    cos, rmean, rlo, rhi, exceed = [], [], [], [], []
    for layer in layers:
        v = own.vector(layer)
        c = float(_cos(key.vector(layer), v))
        if alignment is not None:
            i = alignment.target_layers.index(layer)
            ds = alignment.source.hidden_size
            noise = torch.randn(num_random, ds, generator=gen)
            rand = (
                (noise @ alignment.source_basis[i]) @ alignment.core[i]
            ) @ alignment.target_basis[i].T
        else:
            rand = torch.randn(num_random, key.model.hidden_size, generator=gen)
        rc = _cos(rand, v)
        q = torch.quantile(rc, torch.tensor([0.025, 0.975], dtype=rc.dtype))
        cos.append(c)
        rmean.append(float(rc.mean()))
        rlo.append(float(q[0]))
        rhi.append(float(q[1]))
        exceed.append(float((rc >= c).double().mean()))
    return CosineEvidence(
        layers=layers,
        cosine=cos,
        random_mean=rmean,
        random_low=rlo,
        random_high=rhi,
        exceed=exceed,
        chance=1.96 / math.sqrt(key.model.hidden_size),
        num_random=num_random,
    )
