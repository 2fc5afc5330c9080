"""The alignment's artifacts: streamed statistics, the fitted map, and its diagnostics.

:class:`AlignmentStats` holds one paired :class:`~unlock_fast.stats.Moments` of Source rows
H_s [N, d_s] and Target rows H_t [N, d_t] per layer pair; they merge and all-reduce, so N
is not bounded by memory. :class:`Alignment` is the map fitted from them in Gram form
(:mod:`unlock_fast.estimator`), stored factored as T = E_s M E_tᵀ per pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed import ProcessGroup

from ..distributed import all_reduce_sum_
from ..estimator import EIG_RTOL, Factors, fit_factors, heldout_errors
from ..stats import Moments
from .data import merge_origins, read_origin
from .direction import Direction
from .key import SteeringKey
from .model_info import ModelInfo
from .moments_io import read_moments, store_moments
from .report import AlignmentReport
from .schema import TensorSpec, check_finite, check_layer_map
from .store import PathLike, expect_shape, open_artifact, register_kind, save_artifact

__all__ = ["Alignment", "AlignmentReport", "AlignmentStats"]


@dataclass(repr=False)
class AlignmentStats:
    """Streaming statistics for the alignment: one paired Moments per (s, t) layer pair.

    moments[i] holds x = Source rows at layer layer_map[i][0] and y = Target rows at layer
    layer_map[i][1]. Cheap to refit at any rank (:meth:`fit`, :meth:`fit_ranks`). origin:
    how the rows were chosen (``origin["alignment_data"]``, :mod:`.data`).
    """

    layer_map: list[tuple[int, int]]
    moments: list[Moments]
    source: ModelInfo
    target: ModelInfo
    token_level: bool = False
    num_prompts: int = 0
    origin: dict[str, object] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"AlignmentStats(source={self.source.name!r}, target={self.target.name!r}, "
            f"pairs={len(self.layer_map)}, num_rows={self.num_rows}, "
            f"token_level={self.token_level})"
        )

    @property
    def num_rows(self) -> int:
        """Number of paired rows N (prompts, or tokens when token_level)."""
        return int(self.moments[0].rows) if self.moments else 0

    def _check_compatible(self, other: AlignmentStats) -> None:
        if not isinstance(other, AlignmentStats):
            raise TypeError(f"expected AlignmentStats, got {type(other).__name__}")
        mine = (self.layer_map, self.source, self.target, self.token_level)
        theirs = (other.layer_map, other.source, other.target, other.token_level)
        if mine != theirs:
            raise ValueError(
                "these statistics cannot be merged: layer map, models or token level differ "
                f"({mine} vs {theirs})"
            )

    def merge(self, other: AlignmentStats) -> AlignmentStats:
        """Add ``other``'s rows (in place; other alignment data is refused); returns self."""
        self._check_compatible(other)
        self.origin = merge_origins(self.origin, other.origin)  # first: it may refuse
        self.moments = [_merged(a, b) for a, b in zip(self.moments, other.moments, strict=True)]
        self.num_prompts += other.num_prompts
        return self

    def all_reduce(self, group: ProcessGroup | None = None) -> AlignmentStats:
        """Sum the statistics over the processes of ``group`` (torch.distributed), in place."""
        for m in self.moments:
            m.all_reduce(group)
        n = torch.tensor([float(self.num_prompts)], dtype=torch.float64)
        if self.moments:
            n = n.to(self.moments[0].device)
        all_reduce_sum_(n, group)
        self.num_prompts = int(round(float(n)))
        return self

    def fit(
        self,
        rank: int = 64,
        centered: bool = False,
        ridge: float = 0.0,
        *,
        eig_rtol: float = EIG_RTOL,
        solver: str = "auto",
        oversample: int | None = None,
        n_iter: int | None = None,
        seed: int = 0,
    ) -> Alignment:
        """The alignment of rank k = min(rank, N, d_s, d_t) from these statistics."""
        return self.fit_ranks(
            [rank],
            centered,
            ridge,
            eig_rtol=eig_rtol,
            solver=solver,
            oversample=oversample,
            n_iter=n_iter,
            seed=seed,
        )[rank]

    def fit_ranks(
        self,
        ranks: Sequence[int],
        centered: bool = False,
        ridge: float = 0.0,
        *,
        eig_rtol: float = EIG_RTOL,
        solver: str = "auto",
        oversample: int | None = None,
        n_iter: int | None = None,
        seed: int = 0,
    ) -> dict[int, Alignment]:
        """Alignments for several ranks from one eigendecomposition per layer pair."""
        factors = fit_factors(
            self.moments,
            ranks,
            centered=centered,
            ridge=ridge,
            eig_rtol=eig_rtol,
            solver=solver,
            oversample=oversample,
            n_iter=n_iter,
            seed=seed,
        )
        return {
            r: Alignment(
                layer_map=list(self.layer_map),
                source_basis=f.source_basis,
                core=f.core,
                target_basis=f.target_basis,
                eigenvalues=f.eigenvalues,
                source=self.source,
                target=self.target,
                rank=r,
                num_rows=self.num_rows,
                num_prompts=self.num_prompts,
                centered=centered,
                ridge=float(ridge),
                token_level=self.token_level,
                source_mean=f.source_mean,
                target_mean=f.target_mean,
                origin=dict(self.origin),
            )
            for r, f in factors.items()
        }

    def save_pretrained(self, path: PathLike) -> None:
        """Save the raw statistics (to merge or refit later)."""
        tensors, states = store_moments(self.moments)
        meta = {
            "layer_map": [list(p) for p in self.layer_map],
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "token_level": self.token_level,
            "num_prompts": self.num_prompts,
            "moments": states,
            "origin": self.origin,
        }
        save_artifact(path, "alignment_stats", tensors, meta)

    @classmethod
    def from_pretrained(cls, path: PathLike) -> AlignmentStats:
        """Load statistics saved by :meth:`save_pretrained`, checked entry by entry."""
        art = open_artifact(path, "alignment_stats")
        meta = art.meta
        source = ModelInfo.from_meta(meta.section("source"))
        target = ModelInfo.from_meta(meta.section("target"))
        layer_map = meta.layer_map("layer_map", source.num_layers, target.num_layers)
        token_level, num_prompts = meta.flag("token_level"), meta.integer("num_prompts", lo=0)
        moments = read_moments(art, len(layer_map), source.hidden_size, target.hidden_size)
        return cls(layer_map, moments, source, target, token_level, num_prompts, read_origin(meta))


def _merged(a: Moments, b: Moments) -> Moments:
    res = a.merge(b)
    return res if isinstance(res, Moments) else a


@dataclass(repr=False)
class Alignment:
    """Fitted Source→Target map, one factored T = E_s M E_tᵀ per layer pair.

    source_basis: [P, d_s, k], core: [P, k, k], target_basis: [P, d_t, k] (float32),
    eigenvalues: [P, k] (float64) of G_ss; source_mean [P, d_s] and target_mean [P, d_t]
    for the centred variant. P = len(layer_map). origin: what it was fitted on (as its
    statistics').
    """

    layer_map: list[tuple[int, int]]
    source_basis: torch.Tensor
    core: torch.Tensor
    target_basis: torch.Tensor
    eigenvalues: torch.Tensor
    source: ModelInfo
    target: ModelInfo
    rank: int
    num_rows: int
    num_prompts: int = 0
    centered: bool = False
    ridge: float = 0.0
    token_level: bool = False
    source_mean: torch.Tensor | None = None
    target_mean: torch.Tensor | None = None
    origin: dict[str, object] = field(default_factory=dict)
    _index: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_layer_map(self.layer_map, self.source.num_layers, self.target.num_layers)
        for name, least in (("rank", 1), ("num_rows", 0), ("num_prompts", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
        p, k = len(self.layer_map), self.core.shape[-1]
        ds, dt = self.source.hidden_size, self.target.hidden_size
        want = {
            "source_basis": (p, ds, k),
            "core": (p, k, k),
            "target_basis": (p, dt, k),
            "eigenvalues": (p, k),
        }
        if self.centered:
            want.update(source_mean=(p, ds), target_mean=(p, dt))
        for name, shape in want.items():
            t = getattr(self, name)
            if t is None:
                raise ValueError(f"{name} is required (centered={self.centered})")
            expect_shape(name, t, shape)
            check_finite(name, t)
        self._index = {t: i for i, (_, t) in enumerate(self.layer_map)}

    def __repr__(self) -> str:
        return (
            f"Alignment(source={self.source.name!r}, target={self.target.name!r}, "
            f"pairs={len(self.layer_map)}, rank={self.rank}, k={self.k}, "
            f"num_rows={self.num_rows}, centered={self.centered}, ridge={self.ridge})"
        )

    @property
    def k(self) -> int:
        """Effective rank min(rank, N, d_s, d_t)."""
        return int(self.core.shape[-1])

    @property
    def target_layers(self) -> list[int]:
        return [t for _, t in self.layer_map]

    def _pair(self, target_layer: int) -> int:
        if target_layer not in self._index:
            raise KeyError(
                f"target layer {target_layer} is not aligned (aligned: {self.target_layers})"
            )
        return self._index[target_layer]

    def matrix(self, target_layer: int) -> torch.Tensor:
        """The dense map T [d_s, d_t] of one target layer (float32)."""
        i = self._pair(target_layer)
        return self.source_basis[i] @ self.core[i] @ self.target_basis[i].T

    def map(self, h_source: torch.Tensor, target_layer: int) -> torch.Tensor:
        """Predict Target rows [n, d_t] from Source rows [n, d_s] at one target layer."""
        i = self._pair(target_layer)
        ds = self.source.hidden_size
        if h_source.shape[-1] != ds:
            raise ValueError(f"h_source must end in {ds}, got {tuple(h_source.shape)}")
        x = h_source.float().to(self.core.device)
        if self.source_mean is not None:
            x = x - self.source_mean[i]
        y = self._linear(i, x)
        return y + self.target_mean[i] if self.target_mean is not None else y

    def map_directions(self, v: torch.Tensor, target_layer: int) -> torch.Tensor:
        """Source directions v [n, d_s] (differences: no means) mapped to the Target at one
        target layer, v @ T [n, d_t], as :meth:`transfer` maps a direction."""
        ds = self.source.hidden_size
        if v.dim() != 2 or v.shape[1] != ds:
            raise ValueError(f"v must be [n, {ds}], got {list(v.shape)}")
        return self._linear(self._pair(target_layer), v.float())

    def _linear(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.source_basis[i]) @ self.core[i]) @ self.target_basis[i].T

    def _factors(self) -> Factors:
        means = (self.source_mean, self.target_mean) if self.centered else (None, None)
        return Factors(self.source_basis, self.core, self.target_basis, self.eigenvalues, *means)

    def transfer(self, direction: Direction, *, check_fingerprint: bool = True) -> SteeringKey:
        """The transferred key r_t = v_s @ T for every aligned target layer."""
        if not isinstance(direction, Direction):
            raise TypeError(f"direction must be a Direction, got {type(direction).__name__}")
        src, got = self.source, direction.model
        if (got.hidden_size, got.num_layers) != (src.hidden_size, src.num_layers):
            raise ValueError(
                f"the direction belongs to {got.name} (hidden size {got.hidden_size}, "
                f"{got.num_layers} layers) but this alignment's Source is {src.name} "
                f"(hidden size {src.hidden_size}, {src.num_layers} layers)"
            )
        if check_fingerprint and got.fingerprint != src.fingerprint:
            raise ValueError(
                f"the direction was extracted from {got.name} (fingerprint {got.fingerprint}) "
                f"but this alignment's Source is {src.name} (fingerprint {src.fingerprint}); "
                "pass check_fingerprint=False to transfer anyway"
            )
        missing = sorted({s for s, _ in self.layer_map} - set(direction.layers))
        if missing:
            raise ValueError(f"the direction lacks source layers {missing} that the layer map uses")
        rows = []
        for i, (s, _) in enumerate(self.layer_map):
            v = direction.vector(s).float()
            rows.append(self._linear(i, v))
        return SteeringKey(
            vectors=torch.stack(rows),
            layers=self.target_layers,
            model=self.target,
            origin={
                "kind": "transfer",
                "source": self.source.to_dict(),
                "direction_method": direction.method,
                "direction_prompts": direction.num_prompts,
                "layer_map": [list(p) for p in self.layer_map],
                "rank": self.rank,
                "k": self.k,
                "num_rows": self.num_rows,
                "centered": self.centered,
                "ridge": self.ridge,
                **{k: v for k, v in self.origin.items() if k == "alignment_data"},
            },
        )

    def diagnose(self, heldout: AlignmentStats) -> AlignmentReport:
        """Held-out relative error and centred R² per target layer, from Gram matrices."""
        if not isinstance(heldout, AlignmentStats):
            raise TypeError(f"heldout must be AlignmentStats, got {type(heldout).__name__}")
        if (heldout.source.hidden_size, heldout.target.hidden_size) != (
            self.source.hidden_size,
            self.target.hidden_size,
        ):
            raise ValueError("held-out statistics come from models of other hidden sizes")
        pos = {p: i for i, p in enumerate(heldout.layer_map)}
        missing = [p for p in self.layer_map if p not in pos]
        if missing:
            raise ValueError(f"held-out statistics lack layer pairs {missing}")
        if heldout.num_rows == 0:
            raise ValueError("held-out statistics hold no rows")
        errs, r2s = heldout_errors(
            self._factors(), [pos[p] for p in self.layer_map], heldout.moments
        )
        return AlignmentReport(
            layer_map=list(self.layer_map),
            rel_error=errs,
            r2=r2s,
            num_rows=heldout.num_rows,
            rank=self.k,
            centered=self.centered,
        )

    def save_pretrained(self, path: PathLike) -> None:
        tensors = {
            "source_basis": self.source_basis,
            "core": self.core,
            "target_basis": self.target_basis,
            "eigenvalues": self.eigenvalues,
        }
        if self.centered and self.source_mean is not None and self.target_mean is not None:
            tensors.update(source_mean=self.source_mean, target_mean=self.target_mean)
        meta = {
            "layer_map": [list(p) for p in self.layer_map],
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "rank": self.rank,
            "k": self.k,
            "num_rows": self.num_rows,
            "num_prompts": self.num_prompts,
            "centered": self.centered,
            "ridge": self.ridge,
            "token_level": self.token_level,
            "origin": self.origin,
        }
        save_artifact(path, "alignment", tensors, meta)

    @classmethod
    def from_pretrained(
        cls,
        path: PathLike,
        source_model: nn.Module | None = None,
        target_model: nn.Module | None = None,
        *,
        check_fingerprint: bool = True,
    ) -> Alignment:
        """Load an alignment; with models given, refuse it unless it was made for them."""
        art = open_artifact(path, "alignment")
        meta = art.meta
        source = ModelInfo.from_meta(meta.section("source"))
        target = ModelInfo.from_meta(meta.section("target"))
        layer_map = meta.layer_map("layer_map", source.num_layers, target.num_layers)
        ds, dt = source.hidden_size, target.hidden_size
        rank, num_rows = meta.integer("rank", lo=1), meta.integer("num_rows", lo=0)
        k = meta.integer("k", lo=0, hi=min(rank, num_rows, ds, dt))
        centered, p = meta.flag("centered"), len(layer_map)
        shapes = {
            "source_basis": (p, ds, k),
            "core": (p, k, k),
            "target_basis": (p, dt, k),
            "eigenvalues": (p, k),
        }
        if centered:
            shapes.update(source_mean=(p, ds), target_mean=(p, dt))
        t = art.check_tensors({name: TensorSpec(shape) for name, shape in shapes.items()})
        out = cls(
            layer_map=layer_map,
            source_basis=t["source_basis"],
            core=t["core"],
            target_basis=t["target_basis"],
            eigenvalues=t["eigenvalues"],
            source=source,
            target=target,
            rank=rank,
            num_rows=num_rows,
            num_prompts=meta.integer("num_prompts", lo=0, default=0),
            centered=centered,
            ridge=meta.number("ridge", lo=0.0),
            token_level=meta.flag("token_level"),
            source_mean=t.get("source_mean"),
            target_mean=t.get("target_mean"),
            origin=read_origin(meta),
        )
        checks = {"Source": (source_model, source), "Target": (target_model, target)}
        for role, (model, info) in checks.items():
            if model is not None:
                what, fp = f"this alignment's {role}", check_fingerprint
                info.check(model, what=what, check_fingerprint=fp)
        return out


register_kind("alignment_stats", AlignmentStats.from_pretrained)
register_kind("alignment", Alignment.from_pretrained)
