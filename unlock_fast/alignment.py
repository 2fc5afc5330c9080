"""The alignment map from Source to Target activations, per target layer (METHOD.md §3).

Statistics: for each layer pair (s, t), one paired :class:`~unlock_fast.stats.Moments` of
Source rows H_s [N, d_s] and Target rows H_t [N, d_t], streamed batch by batch. They merge
and all-reduce, so N is not bounded by memory.

Estimator, in Gram form (exactly the per-sample formula of the paper):
    G_ss = H_sᵀH_s, G_tt = H_tᵀH_t, G_st = H_sᵀH_t      (centred Grams for centered=True)
    (λ_s, E_s) = top-k eigenpairs of G_ss, E_t = top-k eigenvectors of G_tt
    M = diag(1/λ_s) E_sᵀ G_st E_t     (1/λ → 0 below a tolerance, as pinv; or 1/(λ+ridge))
    T = E_s M E_tᵀ                     [d_s, d_t]
T is stored factored (E_s, M, E_t), O(k·d) per layer instead of O(d_s·d_t).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import ops
from .artifacts import ModelInfo, expect_shape, read_artifact, save_artifact
from .capture import paired_activations, plan_batches, progress_bar
from .distributed import rank_and_world, require_distributed, shard
from .stats import Moments

__all__ = [
    "AlignmentStats",
    "Alignment",
    "AlignmentReport",
    "proportional_layer_map",
    "collect_alignment_stats",
    "fit_alignment",
]

# Eigenvalues of G_ss below EIG_RTOL * tr(C_ss) are treated as zero, as pinv drops small
# singular values. C_ss is the centred Gram: the sums are kept in fp32 around a shift near
# the mean, so their rounding error scales with tr(C_ss), not with the (large) uncentred G_ss.
EIG_RTOL = 1e-6


def proportional_layer_map(num_source: int, num_target: int) -> list[tuple[int, int]]:
    """Pair each target layer t with source layer s = floor((Ls - 1) t / (Lt - 1))."""
    for name, v in (("num_source", num_source), ("num_target", num_target)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if num_target == 1:
        return [(num_source - 1, 0)]
    return [((num_source - 1) * t // (num_target - 1), t) for t in range(num_target)]


def _resolve_layer_map(
    layer_map: Sequence[tuple[int, int]] | Mapping[int, int] | None, ls: int, lt: int
) -> list[tuple[int, int]]:
    if layer_map is None:
        return proportional_layer_map(ls, lt)
    pairs = (
        [(s, t) for t, s in layer_map.items()]
        if isinstance(layer_map, Mapping)
        else [tuple(p) for p in layer_map]
    )
    out: list[tuple[int, int]] = []
    for p in pairs:
        if len(p) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            raise TypeError(f"layer_map entries must be (source, target) int pairs, got {p!r}")
        s, t = int(p[0]), int(p[1])
        s, t = s + ls if s < 0 else s, t + lt if t < 0 else t
        if not (0 <= s < ls and 0 <= t < lt):
            raise ValueError(
                f"layer pair {p} is out of range: the Source has {ls} layers, the Target {lt}"
            )
        out.append((s, t))
    targets = [t for _, t in out]
    if len(set(targets)) != len(targets):
        raise ValueError(f"each target layer may appear once in layer_map, got {out}")
    if not out:
        raise ValueError("layer_map must not be empty")
    return sorted(out, key=lambda p: p[1])


# -- statistics -----------------------------------------------------------------------------


@dataclass(repr=False)
class AlignmentStats:
    """Streaming statistics for the alignment: one paired Moments per (s, t) layer pair.

    moments[i] holds x = Source rows at layer layer_map[i][0] and y = Target rows at layer
    layer_map[i][1]. Cheap to refit at any rank (:meth:`fit`, :meth:`fit_ranks`).
    """

    layer_map: list[tuple[int, int]]
    moments: list[Moments]
    source: ModelInfo
    target: ModelInfo
    token_level: bool = False
    num_prompts: int = 0

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
        """Add ``other``'s rows to these statistics (in place); returns self."""
        self._check_compatible(other)
        self.moments = [_merged(a, b) for a, b in zip(self.moments, other.moments, strict=True)]
        self.num_prompts += other.num_prompts
        return self

    def all_reduce(self, group: Any = None) -> AlignmentStats:
        """Sum the statistics over the processes of ``group`` (torch.distributed), in place."""
        from .distributed import all_reduce_sum_

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
        oversample: int = 10,
        n_iter: int = 4,
        seed: int = 0,
    ) -> Alignment:
        """The alignment of rank k = min(rank, N, d_s, d_t) from these statistics."""
        return self.fit_ranks(
            [rank],
            centered,
            ridge,
            eig_rtol=eig_rtol,
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
        oversample: int = 10,
        n_iter: int = 4,
        seed: int = 0,
    ) -> dict[int, Alignment]:
        """Alignments for several ranks from one eigendecomposition per layer pair."""
        ranks = list(ranks)
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"rank must be a positive int, got {r!r}")
        if not ranks:
            raise ValueError("ranks must not be empty")
        if not isinstance(ridge, (int, float)) or ridge < 0 or not math.isfinite(ridge):
            raise ValueError(f"ridge must be a finite float >= 0, got {ridge!r}")
        if not 0 <= eig_rtol < 1:
            raise ValueError(f"eig_rtol must be in [0, 1), got {eig_rtol!r}")
        n = self.num_rows
        if n == 0:
            raise ValueError("these statistics hold no rows; collect some prompts first")
        ds, dt = self.source.hidden_size, self.target.hidden_size
        kmax = min(max(ranks), n, ds, dt)
        solver = dict(oversample=oversample, n_iter=n_iter, seed=seed)
        per_pair = []
        for m in self.moments:
            gss = m.gram("xx", centered=centered)
            gtt = m.gram("yy", centered=centered)
            gst = m.gram("xy", centered=centered)
            lam, es = ops.eigh_topk(gss, kmax, **solver)
            _, et = ops.eigh_topk(gtt, kmax, **solver)
            proj = es.T @ gst @ et  # [kmax, kmax]
            means = (m.mean("x"), m.mean("y")) if centered else None
            noise = float(torch.trace(gss if centered else m.gram("xx", centered=True)))
            per_pair.append((lam, es, et, proj, means, eig_rtol * noise))
        out: dict[int, Alignment] = {}
        for r in ranks:
            k = min(r, n, ds, dt)
            es_l, core_l, et_l, lam_l, ms_l, mt_l = [], [], [], [], [], []
            for lam, es, et, proj, means, floor in per_pair:
                lk = lam[:k].to(torch.float64)
                inv = _inverse_eigenvalues(lk, ridge, floor)
                core_l.append((inv[:, None] * proj[:k, :k].to(torch.float64)).float().cpu())
                es_l.append(es[:, :k].float().cpu())
                et_l.append(et[:, :k].float().cpu())
                lam_l.append(lk.cpu())
                if means is not None:
                    ms_l.append(means[0].float().cpu())
                    mt_l.append(means[1].float().cpu())
            out[r] = Alignment(
                layer_map=list(self.layer_map),
                source_basis=torch.stack(es_l),
                core=torch.stack(core_l),
                target_basis=torch.stack(et_l),
                eigenvalues=torch.stack(lam_l),
                source=self.source,
                target=self.target,
                rank=r,
                num_rows=n,
                num_prompts=self.num_prompts,
                centered=centered,
                ridge=float(ridge),
                token_level=self.token_level,
                source_mean=torch.stack(ms_l) if centered else None,
                target_mean=torch.stack(mt_l) if centered else None,
            )
        return out

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Save the raw statistics (to merge or refit later)."""
        tensors: dict[str, torch.Tensor] = {}
        states = []
        for i, m in enumerate(self.moments):
            state = m.state_dict()
            small = {}
            for key, val in state.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"pair{i}.{key}"] = val
                else:
                    small[key] = val
            states.append(small)
        meta = {
            "layer_map": [list(p) for p in self.layer_map],
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "token_level": self.token_level,
            "num_prompts": self.num_prompts,
            "moments": states,
        }
        save_artifact(path, "alignment_stats", tensors, meta)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> AlignmentStats:
        _, tensors, meta = read_artifact(path, "alignment_stats")
        moments = []
        for i, small in enumerate(meta["moments"]):
            prefix = f"pair{i}."
            state = dict(small)
            state.update({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            moments.append(Moments.from_state_dict(state))
        return cls(
            layer_map=[(int(s), int(t)) for s, t in meta["layer_map"]],
            moments=moments,
            source=ModelInfo.from_dict(meta["source"]),
            target=ModelInfo.from_dict(meta["target"]),
            token_level=bool(meta["token_level"]),
            num_prompts=int(meta["num_prompts"]),
        )


def _merged(a: Moments, b: Moments) -> Moments:
    res = a.merge(b)
    return res if isinstance(res, Moments) else a


def _inverse_eigenvalues(lam: torch.Tensor, ridge: float, floor: float) -> torch.Tensor:
    """1/λ for λ above ``floor`` (else 0), or 1/(λ + ridge) with a ridge."""
    if ridge > 0:
        return 1.0 / (lam.clamp_min(0) + ridge)
    keep = lam > floor
    return torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), 0.0)


# -- the fitted map -------------------------------------------------------------------------


@dataclass
class AlignmentReport:
    """Held-out diagnostics per target layer.

    rel_error[i] = ||H_t - Ĥ_t|| / ||H_t|| (Frobenius, as in the paper: the mean makes it
    look small); r2[i] = 1 - ||H_t - Ĥ_t||² / ||H_t - mean(H_t)||² (centred R², the honest
    one). Ĥ_t = H_s T (or the centred form) for pair layer_map[i].
    """

    layer_map: list[tuple[int, int]]
    rel_error: list[float]
    r2: list[float]
    num_rows: int
    rank: int
    centered: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer_map": [list(p) for p in self.layer_map],
            "rel_error": self.rel_error,
            "r2": self.r2,
            "num_rows": self.num_rows,
            "rank": self.rank,
            "centered": self.centered,
        }

    def __str__(self) -> str:
        head = f"alignment rank {self.rank} on {self.num_rows} held-out rows"
        lines = [head, "target  source  rel_error      R2"]
        for (s, t), e, r in zip(self.layer_map, self.rel_error, self.r2, strict=True):
            lines.append(f"{t:6d}  {s:6d}  {e:9.4f}  {r:7.4f}")
        return "\n".join(lines)


@dataclass(repr=False)
class Alignment:
    """Fitted Source→Target map, one factored T = E_s M E_tᵀ per layer pair.

    source_basis: [P, d_s, k], core: [P, k, k], target_basis: [P, d_t, k] (float32),
    eigenvalues: [P, k] (float64) of G_ss; source_mean [P, d_s] and target_mean [P, d_t]
    for the centred variant. P = len(layer_map).
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
    _index: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
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
        if self.centered:
            assert self.source_mean is not None and self.target_mean is not None
            x = x - self.source_mean[i]
        y = ((x @ self.source_basis[i]) @ self.core[i]) @ self.target_basis[i].T
        return y + self.target_mean[i] if self.centered else y  # type: ignore[index]

    def transfer(self, direction: Any, *, check_fingerprint: bool = True) -> Any:
        """The transferred key r_t = v_s @ T for every aligned target layer."""
        from .direction import Direction
        from .steering import SteeringKey

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
            rows.append(((v @ self.source_basis[i]) @ self.core[i]) @ self.target_basis[i].T)
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
        errs, r2s = [], []
        for i, p in enumerate(self.layer_map):
            m = heldout.moments[pos[p]]
            dev, f64 = m.device, torch.float64
            es = self.source_basis[i].to(dev, f64)
            et = self.target_basis[i].to(dev, f64)
            core = self.core[i].to(dev, f64)
            n = float(m.count)
            # Residual r_i = y_i - c_t - (x_i - c_s) T splits into its mean δ and the centred
            # part, so SSE = n·|δ|² + tr(C_yy) - 2 tr(Tᵀ C_xy) + tr(Tᵀ C_xx T) with the centred
            # held-out Grams C: no cancellation against the large activation means.
            cxx = m.gram("xx", centered=True)
            cyy = m.gram("yy", centered=True)
            cxy = m.gram("xy", centered=True)
            mx, my = m.mean("x"), m.mean("y")
            if self.centered:
                assert self.source_mean is not None and self.target_mean is not None
                cs, ct = self.source_mean[i].to(dev, f64), self.target_mean[i].to(dev, f64)
            else:
                cs, ct = torch.zeros_like(mx), torch.zeros_like(my)
            delta = my - ct - (((mx - cs) @ es) @ core) @ et.T
            cross = torch.trace(core.T @ (es.T @ cxy @ et))
            quad = torch.trace((es.T @ cxx @ es) @ core @ core.T)
            var = float(torch.trace(cyy))
            sse = max(n * float(delta @ delta) + var - 2 * float(cross) + float(quad), 0.0)
            total = var + n * float(my @ my)
            errs.append(math.sqrt(sse / total) if total > 0 else float("nan"))
            r2s.append(1.0 - sse / var if var > 0 else float("nan"))
        return AlignmentReport(
            layer_map=list(self.layer_map),
            rel_error=errs,
            r2=r2s,
            num_rows=heldout.num_rows,
            rank=self.k,
            centered=self.centered,
        )

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        tensors = {
            "source_basis": self.source_basis,
            "core": self.core,
            "target_basis": self.target_basis,
            "eigenvalues": self.eigenvalues,
        }
        if self.centered:
            assert self.source_mean is not None and self.target_mean is not None
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
        }
        save_artifact(path, "alignment", tensors, meta)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        source_model: nn.Module | None = None,
        target_model: nn.Module | None = None,
        *,
        check_fingerprint: bool = True,
    ) -> Alignment:
        """Load an alignment; with models given, refuse it unless it was made for them."""
        _, t, meta = read_artifact(path, "alignment")
        centered = bool(meta["centered"])
        out = cls(
            layer_map=[(int(s), int(tt)) for s, tt in meta["layer_map"]],
            source_basis=t["source_basis"],
            core=t["core"],
            target_basis=t["target_basis"],
            eigenvalues=t["eigenvalues"],
            source=ModelInfo.from_dict(meta["source"]),
            target=ModelInfo.from_dict(meta["target"]),
            rank=int(meta["rank"]),
            num_rows=int(meta["num_rows"]),
            num_prompts=int(meta.get("num_prompts", 0)),
            centered=centered,
            ridge=float(meta["ridge"]),
            token_level=bool(meta["token_level"]),
            source_mean=t.get("source_mean") if centered else None,
            target_mean=t.get("target_mean") if centered else None,
        )
        if int(meta["k"]) != out.k:
            raise ValueError(f"artifact rank k={meta['k']} does not match its tensors ({out.k})")
        if source_model is not None:
            out.source.check(
                source_model, what="this alignment's Source", check_fingerprint=check_fingerprint
            )
        if target_model is not None:
            out.target.check(
                target_model, what="this alignment's Target", check_fingerprint=check_fingerprint
            )
        return out


# -- collection -----------------------------------------------------------------------------


def _same_tokenizer(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a.get_vocab() == b.get_vocab())
    except (AttributeError, NotImplementedError):
        return False


def collect_alignment_stats(
    source_model: nn.Module,
    source_tokenizer: Any,
    target_model: nn.Module,
    target_tokenizer: Any,
    prompts: Sequence[str],
    *,
    target_prompts: Sequence[str] | None = None,
    layer_map: Sequence[tuple[int, int]] | Mapping[int, int] | None = None,
    token_level: bool = False,
    source_layer_path: str | None = None,
    target_layer_path: str | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_length: int | None = None,
    progress: bool = True,
    distributed: bool = False,
    group: Any = None,
) -> AlignmentStats:
    """Stream paired Source/Target activations of ``prompts`` into Gram statistics.

    Each prompt goes through both models (``target_prompts`` gives the Target its own
    rendering of the same items, e.g. its chat template). Rows are the last real prompt
    token, or with ``token_level=True`` every real token (the two tokenizers must then
    tokenize identically). ``layer_map``: (source, target) pairs or {target: source};
    default proportional depth. ``distributed=True`` shards the prompts over the
    processes of ``group`` and all-reduces the result.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of str")
    tprompts = list(prompts) if target_prompts is None else list(target_prompts)
    if len(tprompts) != len(prompts):
        raise ValueError(
            f"target_prompts must pair with prompts: got {len(tprompts)} and {len(prompts)}"
        )
    src = ModelInfo.of(source_model, source_layer_path)
    tgt = ModelInfo.of(target_model, target_layer_path)
    pairs = _resolve_layer_map(layer_map, src.num_layers, tgt.num_layers)
    if token_level:
        if target_prompts is not None and list(target_prompts) != list(prompts):
            raise ValueError("token_level=True needs the same prompts for Source and Target")
        if not _same_tokenizer(source_tokenizer, target_tokenizer):
            raise ValueError(
                "token_level=True needs Source and Target to share one tokenizer (identical "
                "vocabularies); these differ. Use token_level=False to pair last tokens only"
            )
    if distributed:
        require_distributed(group)
    rank, _ = rank_and_world(group if distributed else None)
    idx = shard(list(range(len(prompts))), group) if distributed else list(range(len(prompts)))
    sp = [prompts[i] for i in idx]
    tp = [tprompts[i] for i in idx]
    s_layers = sorted({s for s, _ in pairs})
    t_layers = sorted({t for _, t in pairs})
    moments: dict[tuple[int, int], Moments] = {}
    batches = plan_batches(source_tokenizer, sp, batch_size, max_length) if idx else []
    first = dict(
        model=source_model,
        tokenizer=source_tokenizer,
        prompts=sp,
        layers=s_layers,
        layer_path=source_layer_path,
    )
    second = dict(
        model=target_model,
        tokenizer=target_tokenizer,
        prompts=tp,
        layers=t_layers,
        layer_path=target_layer_path,
    )
    bar = progress_bar(len(idx), "alignment", progress and rank == 0)
    n_prompts = 0
    try:
        with paired_activations(
            first,
            second,
            batches,
            token_level=token_level,
            device=device,
            dtype=dtype,
            max_length=max_length,
        ) as it:
            for a, b in it:
                if token_level and not torch.equal(a.token_ids, b.token_ids):
                    raise ValueError(
                        "token_level=True: Source and Target tokenized a batch differently "
                        f"(prompts {a.indices[:4]}...); the tokenizers are not identical"
                    )
                for s, t in pairs:
                    x, y = a.rows[s], b.rows[t]
                    m = moments.get((s, t))
                    if m is None:
                        m = moments[(s, t)] = Moments(
                            src.hidden_size, tgt.hidden_size, device=x.device
                        )
                    m.update(x, y)
                n_prompts += len(a.indices)
                bar.update(len(a.indices))
    finally:
        bar.close()
    dev = torch.device(device) if device is not None else None
    out_moments = []
    for p in pairs:
        m = moments.get(p)
        if m is None:  # no rows here (an empty shard)
            m = Moments(src.hidden_size, tgt.hidden_size, device=dev or "cpu")
        out_moments.append(m)
    stats = AlignmentStats(
        layer_map=pairs,
        moments=out_moments,
        source=src,
        target=tgt,
        token_level=token_level,
        num_prompts=n_prompts,
    )
    if distributed:
        stats.all_reduce(group)
    return stats


def fit_alignment(
    source_model: nn.Module,
    source_tokenizer: Any,
    target_model: nn.Module,
    target_tokenizer: Any,
    prompts: Sequence[str],
    *,
    rank: int = 64,
    centered: bool = False,
    ridge: float = 0.0,
    **collect_kwargs: Any,
) -> Alignment:
    """collect_alignment_stats(...) then .fit(rank, centered, ridge)."""
    stats = collect_alignment_stats(
        source_model,
        source_tokenizer,
        target_model,
        target_tokenizer,
        prompts,
        **collect_kwargs,
    )
    return stats.fit(rank=rank, centered=centered, ridge=ridge)
