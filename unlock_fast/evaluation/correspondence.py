"""Where to steer: which Source layer feeds each Target layer, and which layers to steer.

:func:`select_layer_map` pairs each Target layer with the Source layer that predicts it best
on held-out items (``"r2"``: centred R² of the rank-k map, one eigendecomposition per layer
for all pairs; ``"cka"``: linear CKA of the centred Grams), against proportional depth.
:func:`select_layer_subset` keeps the layers above a held-out R² cut (given, or 1-D
two-means). The cross sums of all 30 x 18 pairs of SmolLM2 and Gemma-3 take 0.8 GB in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..alignment import proportional_layer_map
from ..artifacts import AlignmentStats, ModelInfo
from ..collect import Side, check_prompts, lockstep
from ..estimator import Eigenbasis, check_fit_settings, eigenbasis, heldout_errors, pair_factors
from ..stats import Moments

__all__ = [
    "CRITERIA", "CorrespondenceStats", "LayerCorrespondence", "LayerSubset",
    "collect_correspondence_stats", "compare_layer_maps", "pair_scores", "select_layer_map",
    "select_layer_subset"
]  # fmt: skip

CRITERIA = ("r2", "cka")
Pair = tuple[int, int]


@dataclass
class CorrespondenceStats:
    """Per-layer Moments of both models and the cross sums of candidate (s, t) pairs, from
    the same items (one row per item: the last prompt token)."""

    pairs: list[Pair]
    source_moments: dict[int, Moments]
    target_moments: dict[int, Moments]
    cross: dict[Pair, torch.Tensor]
    source: ModelInfo
    target: ModelInfo
    _norms: dict[tuple[str, int], float] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def empty(
        cls,
        pairs: Sequence[Pair],
        source: ModelInfo,
        target: ModelInfo,
        cross_dtype: torch.dtype = torch.float32,
    ) -> CorrespondenceStats:
        """Statistics of no rows yet for the candidate ``pairs`` of two models."""
        pairs = sorted({(int(s), int(t)) for s, t in pairs}, key=lambda p: (p[1], p[0]))
        f64, ds, dt = torch.float64, source.hidden_size, target.hidden_size
        ms = {s: Moments(ds, dtype=f64) for s in sorted({s for s, _ in pairs})}
        mt = {t: Moments(dt, dtype=f64) for t in sorted({t for _, t in pairs})}
        cross = {p: torch.zeros(ds, dt, dtype=cross_dtype) for p in pairs}
        return cls(pairs, ms, mt, cross, source, target)

    @property
    def num_rows(self) -> int:
        return int(next(iter(self.source_moments.values())).rows) if self.source_moments else 0

    def update(self, x: dict[int, torch.Tensor], y: dict[int, torch.Tensor]) -> None:
        """Add one batch of rows per layer: Source ``x`` and Target ``y`` of the same items."""
        self._norms.clear()
        dtype = next(iter(self.cross.values())).dtype
        shifted: dict[tuple[str, int], torch.Tensor] = {}
        for side, rows, moments in (("s", x, self.source_moments), ("t", y, self.target_moments)):
            for layer, m in moments.items():
                r = rows[layer].detach().to("cpu", torch.float64)
                if r.shape[0] == 0:
                    return
                m.update(r)  # the first batch fixes the shift the cross sums use too
                assert m.shift_x is not None
                shifted[(side, layer)] = (r - m.shift_x).to(dtype)
        for s, t in self.pairs:
            self.cross[(s, t)].addmm_(shifted[("s", s)].T, shifted[("t", t)])

    def pair(self, s: int, t: int) -> Moments:
        """The paired float64 Moments of Source layer ``s`` and Target layer ``t``."""
        if (s, t) not in self.cross:
            raise KeyError(f"layer pair ({s}, {t}) was not collected")
        ms, mt = self.source_moments[s], self.target_moments[t]
        if ms.rows == 0:
            raise ValueError("these statistics hold no rows; collect some prompts first")
        x, y = ms.state_dict(), mt.state_dict()
        state = {k: x[k] for k in ("dim_x", "count", "rows", "shift_x", "sum_x", "gram_xx")}
        state |= {"dim_y": mt.dim_x, "shift_y": y["shift_x"], "sum_y": y["sum_x"]}
        state |= {"gram_yy": y["gram_xx"], "gram_xy": self.cross[(s, t)].double()}
        return Moments.from_state_dict(state)

    def alignment_stats(self, layer_map: Sequence[Pair]) -> AlignmentStats:
        """AlignmentStats of a layer map of collected pairs (one per Target layer)."""
        pairs = sorted(((int(s), int(t)) for s, t in layer_map), key=lambda p: p[1])
        if not pairs or len({t for _, t in pairs}) != len(pairs):
            raise ValueError(f"layer_map must pair each Target layer once, got {pairs}")
        moments = [self.pair(s, t) for s, t in pairs]
        return AlignmentStats(pairs, moments, self.source, self.target, False, self.num_rows)

    def cka(self, s: int, t: int) -> float:
        """Linear CKA of layers ``s`` and ``t`` from the centred Grams (nan without spread)."""
        for side, layer in (("s", s), ("t", t)):  # ||C||_F of each layer, kept across pairs
            if (side, layer) not in self._norms:
                m = (self.source_moments if side == "s" else self.target_moments)[layer]
                self._norms[(side, layer)] = float(m.gram("xx", centered=True).norm())
        den = self._norms[("s", s)] * self._norms[("t", t)]
        cxy = self.pair(s, t).gram("xy", centered=True)
        return float(cxy.norm() ** 2) / den if den > 0 else float("nan")


def _layers(given: Sequence[int], total: int, who: str) -> list[int]:
    sel = sorted({int(x) for x in given})
    if not sel or any(not 0 <= x < total for x in sel):
        raise ValueError(f"{who} layers must be in [0, {total}), got {sel}")
    return sel


def collect_correspondence_stats(
    source_model: nn.Module,
    source_tokenizer: Any,
    target_model: nn.Module,
    target_tokenizer: Any,
    prompts: Sequence[str],
    *,
    target_prompts: Sequence[str] | None = None,
    pairs: Sequence[Pair] | None = None,
    batch_size: int = 8,
    cross_dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> CorrespondenceStats:
    """Stream the last-prompt-token rows of ``prompts`` (Source) and ``target_prompts``
    (Target; default the same) into statistics of the candidate ``pairs`` (default: every
    Source layer with every Target layer)."""
    src, tgt = ModelInfo.of(source_model), ModelInfo.of(target_model)
    sp = check_prompts("prompts", prompts)
    tp = sp if target_prompts is None else check_prompts("target_prompts", target_prompts)
    if len(tp) != len(sp):
        raise ValueError(f"target_prompts must pair with prompts: got {len(tp)} and {len(sp)}")
    if cross_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"cross_dtype must be torch.float32 or torch.float64, got {cross_dtype}")
    if pairs is None:
        pairs = [(s, t) for t in range(tgt.num_layers) for s in range(src.num_layers)]
    stats = CorrespondenceStats.empty(pairs, src, tgt, cross_dtype)
    ss = _layers(list(stats.source_moments), src.num_layers, "source")
    ts = _layers(list(stats.target_moments), tgt.num_layers, "target")
    sides = [
        Side(source_model, source_tokenizer, sp, ss),
        Side(target_model, target_tokenizer, tp, ts),
    ]
    with lockstep(
        sides, desc="layer correspondence", batch_size=batch_size, progress=progress
    ) as batches:
        for a, b in batches:
            stats.update(a.rows, b.rows)
    return stats


class _Fitter:
    """Rank-k maps of candidate pairs of ``train``, one eigendecomposition per layer."""

    def __init__(self, train: CorrespondenceStats, rank: int, centered: bool, ridge: float):
        check_fit_settings([rank], ridge)
        if train.num_rows == 0:
            raise ValueError("the training statistics hold no rows")
        self.train, self.centered, self.ridge = train, centered, float(ridge)
        self.k = min(rank, train.num_rows, train.source.hidden_size, train.target.hidden_size)
        self.bases: dict[tuple[str, int], Eigenbasis] = {}

    def _basis(self, side: str, layer: int) -> Eigenbasis:
        if (side, layer) not in self.bases:
            m = (self.train.source_moments if side == "s" else self.train.target_moments)[layer]
            self.bases[(side, layer)] = eigenbasis(m, self.k, centered=self.centered)
        return self.bases[(side, layer)]

    def r2(self, heldout: CorrespondenceStats, s: int, t: int) -> float:
        """Held-out centred R² of the map of pair (s, t)."""
        train = self.train.pair(s, t)
        means = (train.mean("x"), train.mean("y")) if self.centered else None
        cross = train.gram("xy", centered=self.centered)
        f = pair_factors(
            self._basis("s", s), self._basis("t", t), cross, ridge=self.ridge, means=means
        )
        return heldout_errors(f, [0], [heldout.pair(s, t)])[1][0]


def pair_scores(
    train: CorrespondenceStats,
    heldout: CorrespondenceStats,
    *,
    criterion: str = "r2",
    rank: int = 32,
    centered: bool = False,
    ridge: float = 0.0,
) -> dict[Pair, float]:
    """The criterion of every candidate pair present in both (CKA reads ``heldout`` only)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    common = [p for p in heldout.pairs if p in train.cross]
    if not common:
        raise ValueError("the training and held-out statistics share no layer pair")
    if criterion == "cka":
        return {p: heldout.cka(*p) for p in common}
    fitter = _Fitter(train, rank, centered, ridge)
    return {p: fitter.r2(heldout, *p) for p in common}


@dataclass
class LayerCorrespondence:
    """The chosen Source layer per Target layer (``layer_map``: the best held-out score per
    t), the proportional-depth pairs of the same Target layers, and every score {"s,t": v}."""

    criterion: str
    rank: int
    layer_map: list[Pair]
    proportional: list[Pair]
    scores: dict[str, float]

    def score(self, s: int, t: int) -> float:
        return self.scores[f"{s},{t}"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_layer_map(
    train: CorrespondenceStats,
    heldout: CorrespondenceStats,
    *,
    criterion: str = "r2",
    rank: int = 32,
) -> LayerCorrespondence:
    """Pair each Target layer with its best-scoring Source layer on the held-out split."""
    scores = pair_scores(train, heldout, criterion=criterion, rank=rank)
    best: dict[int, Pair] = {}
    for (s, t), v in scores.items():
        if math.isfinite(v) and (t not in best or v > scores[best[t]]):
            best[t] = (s, t)
    if not best:
        raise ValueError("no layer pair has a finite score")
    prop = {
        t: s for s, t in proportional_layer_map(train.source.num_layers, train.target.num_layers)
    }
    targets = sorted(best)
    layer_map, proportional = [best[t] for t in targets], [(prop[t], t) for t in targets]
    all_scores = {f"{s},{t}": v for (s, t), v in scores.items()}
    return LayerCorrespondence(criterion, rank, layer_map, proportional, all_scores)


def compare_layer_maps(
    train: CorrespondenceStats,
    evaluation: CorrespondenceStats,
    maps: Mapping[str, Sequence[Pair]],
    *,
    rank: int = 32,
) -> dict[str, list[float]]:
    """Centred R² on ``evaluation`` of the rank-k map fitted on ``train``, per pair of each
    named layer map (in Target-layer order)."""
    fitter = _Fitter(train, rank, False, 0.0)
    return {
        name: [fitter.r2(evaluation, s, t) for s, t in sorted(layer_map, key=lambda p: p[1])]
        for name, layer_map in maps.items()
    }


@dataclass
class LayerSubset:
    """The layers to steer: those whose held-out R² is above ``threshold``."""

    layers: list[int]
    threshold: float
    rule: str
    all_layers: list[int]
    r2: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _two_group_split(values: list[float]) -> float:
    """The threshold between the two groups of ``values`` with the smallest total
    within-group variance (1-D two-means, exact over the sorted cut points)."""
    v = sorted(values)
    best, cut = math.inf, v[0] - 1.0
    for i in range(1, len(v)):
        lo, hi = v[:i], v[i:]
        cost = sum((x - sum(lo) / len(lo)) ** 2 for x in lo) + sum(
            (x - sum(hi) / len(hi)) ** 2 for x in hi
        )
        if cost < best - 1e-15:
            best, cut = cost, (v[i - 1] + v[i]) / 2
    return cut


def _descending(v: float) -> float:
    return -v if math.isfinite(v) else math.inf


def select_layer_subset(
    layers: Sequence[int],
    r2: Sequence[float],
    *,
    threshold: float | None = None,
    min_layers: int = 1,
) -> LayerSubset:
    """The layers with held-out R² > ``threshold``; with no threshold, the two-group split
    of the held-out R² values (module docstring). At least ``min_layers`` layers (the best
    ones) are kept."""
    names, vals = [int(x) for x in layers], [float(x) for x in r2]
    if len(names) != len(vals) or not names:
        raise ValueError(f"layers and r2 must be non-empty and equal in length, got "
                         f"{len(names)} and {len(vals)}")  # fmt: skip
    if isinstance(min_layers, bool) or not isinstance(min_layers, int) or min_layers < 1:
        raise ValueError(f"min_layers must be a positive int, got {min_layers!r}")
    finite = [v for v in vals if math.isfinite(v)]
    if threshold is not None:
        cut, rule = float(threshold), "given threshold"
    elif len(set(finite)) < 2:
        cut, rule = -math.inf, "all layers (the held-out R² values do not split)"
    else:
        cut, rule = _two_group_split(finite), "two-group split of the held-out R²"
    chosen = [n for n, v in zip(names, vals, strict=True) if math.isfinite(v) and v > cut]
    if len(chosen) < min_layers:
        ranked = sorted(zip(vals, names, strict=True), key=lambda p: _descending(p[0]))
        chosen = sorted(n for _, n in ranked[:min_layers])
    return LayerSubset(sorted(chosen), cut, rule, names, vals)
