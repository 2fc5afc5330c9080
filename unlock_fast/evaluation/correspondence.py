"""Where to steer: which Source layer feeds each Target layer, and which layers to steer.

Proportional depth pairs Target layer t with Source layer floor((L_s - 1) t / (L_t - 1)).
:func:`select_layer_map` pairs each Target layer with the Source layer whose activations
predict it best instead, judged on a held-out split by one of two criteria:

- ``"r2"``: held-out centred R² of the rank-k map fitted on the training statistics (the
  alignment's estimator: the same map as ``AlignmentStats.fit``, scored by
  :func:`~unlock_fast.estimator.heldout_errors` as ``Alignment.diagnose`` does);
- ``"cka"``: linear CKA of the held-out statistics, ||C_st||²_F / (||C_ss||_F ||C_tt||_F)
  with the centred Grams C (no fit).

Both come from streaming statistics (:class:`CorrespondenceStats`): float64
:class:`~unlock_fast.stats.Moments` of every candidate layer of each model, and one cross
sum Σ (x - a_s)(y - a_t)ᵀ per candidate pair (``cross_dtype``, float32 by default: for
all 30 x 18 pairs of SmolLM2-135M and Gemma-3-270M that is 0.8 GB).

The rank-k maps of all candidate pairs share one eigendecomposition per layer (the
estimator's formula and eigenvalue floor with a dense eigensolver), so scoring every pair
costs about as much as fitting one map per layer. Layer subsets: :mod:`.layer_subset`.
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
from ..estimator import Factors, eigen_floor, heldout_errors
from ..stats import Moments

__all__ = [
    "CRITERIA",
    "CorrespondenceStats",
    "LayerCorrespondence",
    "collect_correspondence_stats",
    "compare_layer_maps",
    "pair_scores",
    "select_layer_map",
]

CRITERIA = ("r2", "cka")
Pair = tuple[int, int]


@dataclass(repr=False)
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

    def __repr__(self) -> str:
        return (
            f"CorrespondenceStats(source={self.source.name!r}, target={self.target.name!r}, "
            f"pairs={len(self.pairs)}, rows={self.num_rows})"
        )

    @property
    def num_rows(self) -> int:
        return int(next(iter(self.source_moments.values())).rows) if self.source_moments else 0

    @property
    def source_layers(self) -> list[int]:
        return sorted({s for s, _ in self.pairs})

    @property
    def target_layers(self) -> list[int]:
        return sorted({t for _, t in self.pairs})

    @classmethod
    def empty(
        cls,
        pairs: Sequence[Pair],
        source: ModelInfo,
        target: ModelInfo,
        cross_dtype: torch.dtype = torch.float32,
    ) -> CorrespondenceStats:
        """Statistics of no rows yet for the candidate ``pairs`` of two models."""
        f64, ds, dt = torch.float64, source.hidden_size, target.hidden_size
        pairs = [(int(s), int(t)) for s, t in pairs]
        return cls(
            pairs=pairs,
            source_moments={s: Moments(ds, dtype=f64) for s in sorted({s for s, _ in pairs})},
            target_moments={t: Moments(dt, dtype=f64) for t in sorted({t for _, t in pairs})},
            cross={p: torch.zeros(ds, dt, dtype=cross_dtype) for p in pairs},
            source=source,
            target=target,
        )

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
        xs, ys = ms.state_dict(), mt.state_dict()
        state = {
            "dim_x": ms.dim_x,
            "dim_y": mt.dim_x,
            "count": ms.count,
            "rows": ms.rows,
            "shift_x": xs["shift_x"],
            "sum_x": xs["sum_x"],
            "gram_xx": xs["gram_xx"],
            "shift_y": ys["shift_x"],
            "sum_y": ys["sum_x"],
            "gram_yy": ys["gram_xx"],
            "gram_xy": self.cross[(s, t)].double(),
        }
        return Moments.from_state_dict(state)

    def alignment_stats(self, layer_map: Sequence[Pair]) -> AlignmentStats:
        """AlignmentStats of a layer map made of collected pairs (one pair per Target layer),
        ready to :meth:`~unlock_fast.AlignmentStats.fit`."""
        pairs = sorted(((int(s), int(t)) for s, t in layer_map), key=lambda p: p[1])
        targets = [t for _, t in pairs]
        if len(set(targets)) != len(targets) or not pairs:
            raise ValueError(f"layer_map must pair each Target layer once, got {pairs}")
        moments = [self.pair(s, t) for s, t in pairs]
        return AlignmentStats(pairs, moments, self.source, self.target, False, self.num_rows)

    def _norm(self, side: str, layer: int) -> float:
        """||C||_F of one layer's centred Gram (kept: it does not change between pairs)."""
        if (side, layer) not in self._norms:
            m = (self.source_moments if side == "s" else self.target_moments)[layer]
            self._norms[(side, layer)] = float(m.gram("xx", centered=True).norm())
        return self._norms[(side, layer)]

    def cross_gram(self, s: int, t: int, *, centered: bool = False) -> torch.Tensor:
        """Σ x yᵀ of Source layer ``s`` and Target layer ``t`` (centred: around the means),
        float64; the same as ``pair(s, t).gram("xy", centered=...)``."""
        if (s, t) not in self.cross:
            raise KeyError(f"layer pair ({s}, {t}) was not collected")
        ms, mt = self.source_moments[s], self.target_moments[t]
        if ms.shift_x is None or mt.shift_x is None:
            raise ValueError("these statistics hold no rows; collect some prompts first")
        tx, ty, n = ms.sum_x.double(), mt.sum_x.double(), ms.count
        g = self.cross[(s, t)].double()
        if centered:
            return g - torch.outer(tx, ty) / n
        ax, ay = ms.shift_x.double(), mt.shift_x.double()
        return g + torch.outer(ax, ty) + torch.outer(tx, ay) + n * torch.outer(ax, ay)

    def cka(self, s: int, t: int) -> float:
        """Linear CKA of layers ``s`` and ``t`` from the centred Grams (nan without spread)."""
        cxy = self.cross_gram(s, t, centered=True)
        den = self._norm("s", s) * self._norm("t", t)
        return float(cxy.norm() ** 2) / den if den > 0 else float("nan")


def _layers(given: Sequence[int] | None, total: int, who: str) -> list[int]:
    sel = list(range(total)) if given is None else sorted({int(x) for x in given})
    bad = [x for x in sel if not 0 <= x < total]
    if bad or not sel:
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
    source_layers: Sequence[int] | None = None,
    target_layers: Sequence[int] | None = None,
    source_layer_path: str | None = None,
    target_layer_path: str | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    cross_dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> CorrespondenceStats:
    """Stream the last-prompt-token rows of ``prompts`` (Source) and ``target_prompts``
    (Target; default the same) into :class:`CorrespondenceStats`.

    ``pairs``: the candidate (s, t) pairs; default every pair of ``source_layers`` x
    ``target_layers`` (each default: every layer).
    """
    src = ModelInfo.of(source_model, source_layer_path)
    tgt = ModelInfo.of(target_model, target_layer_path)
    sp = check_prompts("prompts", prompts)
    tp = sp if target_prompts is None else check_prompts("target_prompts", target_prompts)
    if len(tp) != len(sp):
        raise ValueError(f"target_prompts must pair with prompts: got {len(tp)} and {len(sp)}")
    if cross_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"cross_dtype must be torch.float32 or torch.float64, got {cross_dtype}")
    if pairs is None:
        ss = _layers(source_layers, src.num_layers, "source")
        ts = _layers(target_layers, tgt.num_layers, "target")
        cand = [(s, t) for t in ts for s in ss]
    else:
        cand = sorted({(int(s), int(t)) for s, t in pairs}, key=lambda p: (p[1], p[0]))
        _layers([s for s, _ in cand], src.num_layers, "source")
        _layers([t for _, t in cand], tgt.num_layers, "target")
    stats = CorrespondenceStats.empty(cand, src, tgt, cross_dtype)
    sides = [
        Side(source_model, source_tokenizer, sp, stats.source_layers, source_layer_path),
        Side(target_model, target_tokenizer, tp, stats.target_layers, target_layer_path),
    ]
    with lockstep(
        sides,
        desc="layer correspondence",
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        progress=progress,
    ) as batches:
        for a, b in batches:
            stats.update(a.rows, b.rows)
    return stats


class _Fitter:
    """Rank-k maps of candidate pairs of ``train``, one eigendecomposition per layer:
    T = E_s diag(1/λ) E_sᵀ G_st E_t E_tᵀ, λ at or below the estimator's floor dropped."""

    def __init__(self, train: CorrespondenceStats, rank: int, centered: bool, ridge: float):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if ridge < 0 or not math.isfinite(ridge):
            raise ValueError(f"ridge must be a finite float >= 0, got {ridge!r}")
        self.train, self.centered, self.ridge = train, centered, float(ridge)
        n = train.num_rows
        if n == 0:
            raise ValueError("the training statistics hold no rows")
        self.k = min(rank, n, train.source.hidden_size, train.target.hidden_size)
        self.eig: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, float]] = {}

    def _eigen(self, side: str, layer: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        if (side, layer) not in self.eig:
            m = (self.train.source_moments if side == "s" else self.train.target_moments)[layer]
            lam, vec = torch.linalg.eigh(m.gram("xx", centered=self.centered))
            lam, vec = lam.flip(0)[: self.k], vec.flip(1)[:, : self.k]
            eps = torch.finfo(m.dtype).eps
            floor = eigen_floor(float(lam[0]), m.trace("xx", centered=True), m.rows, m.dim_x, eps)
            self.eig[(side, layer)] = (lam, vec, floor)
        return self.eig[(side, layer)]

    def factors(self, s: int, t: int) -> Factors:
        lam, es, floor = self._eigen("s", s)
        _, et, _ = self._eigen("t", t)
        if self.ridge > 0:
            inv = 1.0 / (lam.clamp_min(0) + self.ridge)
        else:
            keep = lam > floor
            inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), 0.0)
        core = inv[:, None] * (es.T @ self.train.cross_gram(s, t, centered=self.centered) @ et)
        ms, mt = self.train.source_moments[s], self.train.target_moments[t]
        means = (ms.mean("x")[None].float(), mt.mean("x")[None].float())
        return Factors(
            es[None].float(), core[None].float(), et[None].float(), lam[None],
            *(means if self.centered else (None, None)),
        )  # fmt: skip

    def heldout_r2(self, heldout: CorrespondenceStats, s: int, t: int) -> float:
        return heldout_errors(self.factors(s, t), [0], [heldout.pair(s, t)])[1][0]


def pair_scores(
    train: CorrespondenceStats,
    heldout: CorrespondenceStats,
    *,
    criterion: str = "r2",
    rank: int = 32,
    centered: bool = False,
    ridge: float = 0.0,
) -> dict[Pair, float]:
    """The criterion of every candidate pair present in both statistics (CKA reads only
    ``heldout``)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    common = [p for p in heldout.pairs if p in train.cross]
    if not common:
        raise ValueError("the training and held-out statistics share no layer pair")
    if criterion == "cka":
        return {p: heldout.cka(*p) for p in common}
    fitter = _Fitter(train, rank, centered, ridge)
    return {p: fitter.heldout_r2(heldout, *p) for p in common}


@dataclass
class LayerCorrespondence:
    """The chosen Source layer per Target layer, and the score of every candidate.

    layer_map: (s, t) with the best held-out score per t; proportional: the
    proportional-depth pairs of the same Target layers; scores: {"s,t": score}.
    """

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
    centered: bool = False,
    ridge: float = 0.0,
) -> LayerCorrespondence:
    """Pair each Target layer with its best-scoring Source layer on the held-out split."""
    scores = pair_scores(
        train, heldout, criterion=criterion, rank=rank, centered=centered, ridge=ridge
    )
    best: dict[int, Pair] = {}
    for (s, t), v in scores.items():
        if not math.isfinite(v):
            continue
        if t not in best or v > scores[best[t]]:
            best[t] = (s, t)
    if not best:
        raise ValueError("no layer pair has a finite score")
    prop = {
        t: s for s, t in proportional_layer_map(train.source.num_layers, train.target.num_layers)
    }
    targets = sorted(best)
    return LayerCorrespondence(
        criterion=criterion,
        rank=rank,
        layer_map=[best[t] for t in targets],
        proportional=[(prop[t], t) for t in targets],
        scores={f"{s},{t}": v for (s, t), v in scores.items()},
    )


def compare_layer_maps(
    train: CorrespondenceStats,
    evaluation: CorrespondenceStats,
    maps: Mapping[str, Sequence[Pair]],
    *,
    rank: int = 32,
    centered: bool = False,
    ridge: float = 0.0,
) -> dict[str, list[float]]:
    """Centred R² on ``evaluation`` of the rank-k map fitted on ``train``, per pair of each
    named layer map (in the map's Target-layer order)."""
    fitter, out = _Fitter(train, rank, centered, ridge), {}
    for name, layer_map in maps.items():
        pairs = sorted(((int(s), int(t)) for s, t in layer_map), key=lambda p: p[1])
        out[name] = [fitter.heldout_r2(evaluation, s, t) for s, t in pairs]
    return out
