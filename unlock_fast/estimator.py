"""The alignment estimator in Gram form (METHOD.md §3), on streamed moments.

For each layer pair, with Grams G_ss = H_sᵀH_s, G_tt = H_tᵀH_t and G_st = H_sᵀH_t (centred
Grams for the centred variant):

    (λ_s, E_s) = top-k eigenpairs of G_ss,  E_t = top-k eigenvectors of G_tt
    M = diag(1/λ_s) E_sᵀ G_st E_t     (1/λ → 0 below pinv's floor; or 1/(λ + ridge))
    T = E_s M E_tᵀ [d_s, d_t] = pinv(H_s V_sᵀ) H_t V_tᵀ (the per-sample formula), factored

The eigensolver (``solver``):

- ``"auto"`` (the default) decomposes each Gram at k = min(N, d), whatever ranks are asked
  for, so a map of rank r does not depend on the other ranks fitted with it. With N < d the
  Gram has rank N and a randomized range finder of width N + ``oversample`` (default 10)
  captures it whole, with ``n_iter`` power iterations (default 0 for float64 sums, 1 for
  fp32 sums); every kept eigenpair is then checked by its Ritz residual
  ||G e - λ e|| <= RITZ_TOL·λ, and the dense decomposition runs when the check fails (or
  when it is about as cheap: N near d).
- ``"exact"``: the dense decomposition at k = min(N, d).
- ``"randomized"``: the sketch at the largest rank only (``oversample`` default max(10, k),
  ``n_iter`` 4), unchecked: fast for large d, approximate, ranks fitted together interact.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import ops
from .stats import Moments

__all__ = [
    "EIG_RTOL", "RITZ_TOL", "SOLVERS", "Eigenbasis", "Factors", "RankClampedWarning",
    "check_fit_settings", "eigen_floor", "eigenbasis", "fit_factors", "heldout_errors",
    "pair_factors"
]  # fmt: skip

# An extra floor on the Source eigenvalues, relative to tr(C_ss) (0: pinv's rule alone).
EIG_RTOL = 0.0
# Largest accepted Ritz residual ||G e - λ e|| / λ of a kept eigenpair from the sketch; the
# relative error of T is within a small factor of it.
RITZ_TOL = 1e-6
SOLVERS = ("auto", "exact", "randomized")
# Rounding of the streamed sums, in units of eps·tr(C): fp32 sums around a shift near the
# mean have an error that scales with the centred trace, not with the uncentred Gram.
_SUM_NOISE = 8.0
_EPS64 = torch.finfo(torch.float64).eps
# Sketch settings of the auto solver when none are given: the Gram has rank <= N, so a few
# columns beyond N capture it; with float64 sums no power iteration is needed, fp32 sums
# leave a noise floor over every direction that one iteration pushes down.
_AUTO_OVERSAMPLE = 10
_AUTO_N_ITER = {torch.float64: 0, torch.float32: 1}
_RANDOMIZED_N_ITER = 4
# Columns per product when the fit reads kept rows.
_BLOCK = 256


class RankClampedWarning(UserWarning):
    """A requested rank exceeded min(N, d_s, d_t) and was lowered to it."""


@dataclass
class Factors:
    """A fitted map per layer pair, stacked over P pairs: T_i = E_s[i] M[i] E_t[i]ᵀ.

    source_basis [P, d_s, k], core [P, k, k], target_basis [P, d_t, k] (float32, CPU);
    eigenvalues [P, k] (float64); means [P, d] for the centred variant, else None.
    """

    source_basis: torch.Tensor
    core: torch.Tensor
    target_basis: torch.Tensor
    eigenvalues: torch.Tensor
    source_mean: torch.Tensor | None
    target_mean: torch.Tensor | None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_fit_settings(
    ranks: Sequence[int],
    ridge: float = 0.0,
    *,
    eig_rtol: float = EIG_RTOL,
    solver: str = "auto",
    oversample: int | None = None,
    n_iter: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Validate every setting of a fit (before any forward pass); returns the ranks."""
    ranks = list(ranks)
    for r in ranks:
        if not _is_int(r) or r < 1:
            raise ValueError(f"rank must be a positive int, got {r!r}")
    if not ranks:
        raise ValueError("ranks must not be empty")
    if (
        isinstance(ridge, bool)
        or not isinstance(ridge, (int, float))
        or ridge < 0
        or not math.isfinite(ridge)
    ):
        raise ValueError(f"ridge must be a finite float >= 0, got {ridge!r}")
    if (
        isinstance(eig_rtol, bool)
        or not isinstance(eig_rtol, (int, float))
        or not 0 <= eig_rtol < 1
    ):
        raise ValueError(f"eig_rtol must be in [0, 1), got {eig_rtol!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    for name, v in (("oversample", oversample), ("n_iter", n_iter)):
        if v is not None and (not _is_int(v) or v < 0):
            raise ValueError(f"{name} must be an int >= 0 or None, got {v!r}")
    if not _is_int(seed) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return ranks


def eigen_floor(lam1: float, trace_c: float, rows: int, dim: int, eps: float) -> float:
    """Eigenvalues of a Gram at or below this count as zero, as pinv drops them.

    pinv(H) drops singular values below rcond·σ_1 with rcond = max(N, d)·eps (eps of the
    dtype the sums are kept in); for eigenvalues λ = σ² of G = HᵀH that is (rcond·σ_1)² =
    rcond²·λ_1. The Gram form cannot resolve eigenvalues below its own rounding, which is
    added as a floor of its own: d·eps64·λ_1 for the float64 decomposition and
    8·eps·tr(C) for the streamed sums (C the centred Gram).
    """
    rcond = max(rows, dim) * eps
    return max(rcond * rcond * lam1, dim * _EPS64 * lam1, _SUM_NOISE * eps * trace_c)


def _inverse_eigenvalues(lam: torch.Tensor, ridge: float, floor: float) -> torch.Tensor:
    """1/λ for λ above ``floor`` (else 0), or 1/(λ + ridge) with a ridge."""
    if ridge > 0:
        return 1.0 / (lam.clamp_min(0) + ridge)
    keep = lam > floor
    return torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), 0.0)


@dataclass
class _Solver:
    """Resolved settings: the method, and the sketch width and power iterations."""

    method: str
    oversample: int
    n_iter: int
    seed: int


def _dense(g: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs by the core's dense decomposition."""
    return ops.eigh_topk(g, k, seed=seed, method="exact")


def _ritz_ok(g: torch.Tensor, lam: torch.Tensor, vec: torch.Tensor, floor: float) -> bool:
    """Whether every kept eigenpair (λ > floor) has ||G e - λ e|| <= RITZ_TOL·λ."""
    keep = lam > floor
    if not bool(keep.any()):
        return True
    e, lk = vec[:, keep], lam[keep]
    resid = (g @ e - e * lk).norm(dim=0)
    return bool((resid <= RITZ_TOL * lk).all())


class _FloorFn:
    """The eigenvalue floor of one Gram as a function of its largest eigenvalue."""

    def __init__(self, m: Moments, which: str, eig_rtol: float) -> None:
        self.trace_c = m.trace(which, centered=True)
        self.rows = m.rows
        self.dim = m.dim_x if which == "xx" else int(m.dim_y or 0)
        self.eps = m.eps
        self.extra = eig_rtol * self.trace_c

    def __call__(self, lam1: float) -> float:
        base = eigen_floor(lam1, self.trace_c, self.rows, self.dim, self.eps)
        return max(base, self.extra)


def _eigenpairs(
    g: torch.Tensor, k: int, floor_of: _FloorFn, solver: _Solver
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(eigenvalues [k], eigenvectors [d, k], floor) of one Gram with the chosen solver."""
    if solver.method == "exact":
        lam, vec = _dense(g, k, solver.seed)
        return lam, vec, floor_of(float(lam[0]))
    lam, vec = ops.eigh_topk(
        g, k, oversample=solver.oversample, n_iter=solver.n_iter, seed=solver.seed
    )
    floor = floor_of(float(lam[0]))
    if solver.method == "auto" and not _ritz_ok(g, lam, vec, floor):
        lam, vec = _dense(g, k, solver.seed)
        floor = floor_of(float(lam[0]))
    return lam, vec, floor


class _NonFinite(Exception):  # NaN or Inf in the statistics of a layer pair
    pass


def _block_cols(n: int, keep: int) -> int:
    """How many of n columns to form so that the first ``keep`` are there: whole blocks."""
    return min(n, -(-keep // _BLOCK) * _BLOCK)


def _by_blocks(a: torch.Tensor, b: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """a[:, :rows]ᵀ b[:, :cols] by _BLOCK × _BLOCK products, each the same whatever rows
    and cols are: a rank's map does not depend on the other ranks fitted with it."""
    return torch.cat(
        [
            torch.cat(
                [a[:, i : i + _BLOCK].T @ b[:, j : j + _BLOCK] for j in range(0, cols, _BLOCK)],
                dim=1,
            )
            for i in range(0, rows, _BLOCK)
        ]
    )


def _side(
    m: Moments,
    which: str,
    k: int,
    floor_of: _FloorFn,
    solver: _Solver,
    centered: bool,
    keep: int,
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
    """(eigenvalues, eigenvectors E [d, >= keep], floor, R E or None) of the Gram of
    ``which`` ("x" or "y"), in the statistics' form. From kept rows R (G = RᵀR) with N <= d:
    the exact eigenpairs of the N×N kernel R Rᵀ = U Λ Uᵀ give G's as Λ and the normalised
    columns of Rᵀ U, formed only as far as the largest rank needs; R E is returned so that
    E_sᵀ G_st E_t = (R_s E_s)ᵀ (R_t E_t) needs no G_st."""
    r = m.row_factor(which, centered=centered)
    if r is None:
        g = m.gram(which * 2, centered=centered)
        if not bool(torch.isfinite(g).all()):
            raise _NonFinite
        return (*_eigenpairs(g, k, floor_of, solver), None)
    if not bool(torch.isfinite(r).all()):
        raise _NonFinite
    if r.shape[0] > r.shape[1]:
        lam, vec, floor = _eigenpairs(r.T @ r, k, floor_of, solver)
        return lam, vec, floor, r @ vec.to(r)
    kernel = r @ r.T
    lam, u = _dense(kernel, min(k, r.shape[0]), solver.seed)
    u = u.to(r)
    cols = _block_cols(u.shape[1], keep)
    vec = _by_blocks(r, u, r.shape[1], cols)  # Rᵀ U
    norms = vec.norm(dim=0)
    scale = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(r.dtype).tiny), 0.0)
    vec *= scale
    proj = _by_blocks(kernel, u, kernel.shape[1], cols) * scale  # R E = K U / |Rᵀ U|
    return lam, vec, floor_of(float(lam[0])), proj


def _resolve(
    solver: str, oversample: int | None, n_iter: int | None, seed: int, kmax: int, sums: torch.dtype
) -> _Solver:
    """The solver's settings, its defaults filled in (``sums``: the moments' dtype)."""
    randomized = solver == "randomized"
    width = (
        (max(10, kmax) if randomized else _AUTO_OVERSAMPLE) if oversample is None else oversample
    )
    power = (_RANDOMIZED_N_ITER if randomized else _AUTO_N_ITER[sums]) if n_iter is None else n_iter
    return _Solver(solver, width, power, seed)


def _clamped_ranks(ranks: list[int], n: int, ds: int, dt: int) -> dict[int, int]:
    """The effective rank of each requested one; warns once when any is lowered."""
    bound = min(n, ds, dt)
    ks = {r: min(r, bound) for r in ranks}
    lowered = sorted(r for r in ranks if r > bound)
    if lowered:
        why = next(
            text
            for value, text in ((n, f"N = {n} rows"), (ds, f"d_s = {ds}"), (dt, f"d_t = {dt}"))
            if value == bound
        )
        warnings.warn(
            f"rank {', '.join(map(str, lowered))} exceeds min(N, d_s, d_t) = {bound} "
            f"({why}); fitting rank {bound} instead",
            RankClampedWarning,
            stacklevel=3,
        )
    return ks


def fit_factors(
    moments: Sequence[Moments],
    ranks: Sequence[int],
    *,
    centered: bool,
    ridge: float,
    eig_rtol: float = EIG_RTOL,
    solver: str = "auto",
    oversample: int | None = None,
    n_iter: int | None = None,
    seed: int = 0,
) -> dict[int, Factors]:
    """The factored map of each rank in ``ranks``, one eigendecomposition per Gram.

    The effective rank of each is min(rank, N, d_s, d_t); a :class:`RankClampedWarning`
    says so once when a rank is lowered. ``solver`` is "auto", "exact" or "randomized"
    (module docstring); ``oversample`` and ``n_iter`` set its sketch (None: its defaults).
    Source eigenvalues at or below :func:`eigen_floor` (and below ``eig_rtol``·tr(C_ss)
    when that is given) are dropped, as pinv drops small singular values.
    """
    settings: dict[str, Any] = dict(
        eig_rtol=eig_rtol, solver=solver, oversample=oversample, n_iter=n_iter
    )
    ranks = check_fit_settings(ranks, ridge, seed=seed, **settings)
    if not moments or moments[0].rows == 0:
        raise ValueError("these statistics hold no rows; collect some prompts first")
    n = moments[0].rows
    ds, dt = moments[0].dim_x, moments[0].dim_y
    if dt is None:
        raise ValueError("the alignment needs paired moments (Source and Target rows)")
    ks = _clamped_ranks(ranks, n, ds, dt)
    kmax = max(ks.values())
    # The decomposition's rank: the same for every rank list unless the sketch is asked for.
    k_s = kmax if solver == "randomized" else min(n, ds)
    k_t = kmax if solver == "randomized" else min(n, dt)
    parts: dict[int, list[dict[str, torch.Tensor]]] = {r: [] for r in ranks}  # unique
    for i, m in enumerate(moments):
        how = _resolve(solver, oversample, n_iter, seed, kmax, m.dtype)
        try:
            floors = _FloorFn(m, "xx", eig_rtol), _FloorFn(m, "yy", eig_rtol)
            lam, es, floor, ps = _side(m, "x", k_s, floors[0], how, centered, kmax)
            _, et, _, pt = _side(m, "y", k_t, floors[1], how, centered, kmax)
            # E_sᵀ G_st E_t
            if ps is None or pt is None:
                cross = m.bilinear("xy", es, et, centered=centered)
            else:
                cross = _by_blocks(ps, pt, ps.shape[1], pt.shape[1])
            if not bool(torch.isfinite(cross).all()):
                raise _NonFinite
        except _NonFinite:
            raise ValueError(
                f"the statistics of layer pair {i} hold NaN or Inf (non-finite activations "
                "were accumulated); collect them again"
            ) from None
        means = (m.mean("x"), m.mean("y")) if centered else None
        for r in parts:  # the same operations on the same slices, whatever the other ranks
            parts[r].append(_rank_parts(lam, es, et, cross, floor, ks[r], ridge, means))
    return {r: _stack(p) for r, p in parts.items()}


def _rank_parts(
    lam: torch.Tensor,
    es: torch.Tensor,
    et: torch.Tensor,
    cross: torch.Tensor,
    floor: float,
    k: int,
    ridge: float,
    means: tuple[torch.Tensor, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """One layer pair's map at rank k from its eigenpairs and E_sᵀ G_st E_t (``cross``)."""
    lk = lam[:k].to(torch.float64)
    core = _inverse_eigenvalues(lk, ridge, floor)[:, None] * cross[:k, :k]  # [k, k]
    got = {"es": es[:, :k], "core": core, "et": et[:, :k]}
    if means is not None:
        got.update(ms=means[0], mt=means[1])
    return {name: t.float().cpu() for name, t in got.items()} | {"lam": lk.cpu()}


def _stack(parts: list[dict[str, torch.Tensor]]) -> Factors:
    def stack(name: str) -> torch.Tensor:
        return torch.stack([p[name] for p in parts])

    means = (stack("ms"), stack("mt")) if "ms" in parts[0] else (None, None)
    return Factors(stack("es"), stack("core"), stack("et"), stack("lam"), *means)


# Top-k eigenpairs of one model's Gram: values [k] descending, vectors [d, k], and the floor
# at or below which a Source eigenvalue counts as zero.
Eigenbasis = tuple[torch.Tensor, torch.Tensor, float]


def eigenbasis(m: Moments, k: int, *, centered: bool, eig_rtol: float = EIG_RTOL) -> Eigenbasis:
    """The top-``k`` eigenpairs of the Gram of one model's moments ``m`` by the dense solver
    :func:`fit_factors` uses: one decomposition serves every map that reads it."""
    check_fit_settings([k], eig_rtol=eig_rtol)
    if m.rows == 0:
        raise ValueError("these statistics hold no rows; collect some prompts first")
    lam, vec = _dense(m.gram("xx", centered=centered), min(k, m.rows, m.dim_x), 0)
    return lam, vec, _FloorFn(m, "xx", eig_rtol)(float(lam[0]))


def pair_factors(
    source: Eigenbasis,
    target: Eigenbasis,
    cross: torch.Tensor,
    *,
    ridge: float = 0.0,
    means: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Factors:
    """One layer pair's map (P = 1) from both sides' :func:`eigenbasis` and the cross Gram
    G_st [d_s, d_t]: M = diag(1/λ_s) E_sᵀ G_st E_t, as :func:`fit_factors` forms it; ``means``
    (Source, Target) for the centred variant."""
    (lam, es, floor), (_, et, _) = source, target
    k = min(es.shape[1], et.shape[1])
    es, et = es[:, :k].to(cross), et[:, :k].to(cross)
    return _stack([_rank_parts(lam, es, et, es.T @ cross @ et, floor, k, ridge, means)])


def heldout_errors(
    factors: Factors, pair_index: Sequence[int], moments: Sequence[Moments]
) -> tuple[list[float], list[float]]:
    """Relative error and centred R² of each fitted pair i on ``moments[pair_index[i]]``.

    rel_error = ||H_t - Ĥ_t|| / ||H_t|| (Frobenius, as in the paper) and
    R² = 1 - ||H_t - Ĥ_t||² / ||H_t - mean(H_t)||², both from held-out Grams.
    """
    errs, r2s = [], []
    for i, j in enumerate(pair_index):
        m = moments[j]
        dev, f64 = m.device, torch.float64
        es = factors.source_basis[i].to(dev, f64)
        et = factors.target_basis[i].to(dev, f64)
        core = factors.core[i].to(dev, f64)
        n = float(m.count)
        # Residual r_i = y_i - c_t - (x_i - c_s) T splits into its mean δ and the centred
        # part, so SSE = n·|δ|² + tr(C_yy) - 2 tr(Tᵀ C_xy) + tr(Tᵀ C_xx T) with the centred
        # held-out Grams C: no cancellation against the large activation means.
        mx, my = m.mean("x"), m.mean("y")
        if factors.source_mean is not None and factors.target_mean is not None:
            cs = factors.source_mean[i].to(dev, f64)
            ct = factors.target_mean[i].to(dev, f64)
        else:
            cs, ct = torch.zeros_like(mx), torch.zeros_like(my)
        delta = my - ct - (((mx - cs) @ es) @ core) @ et.T
        cross = torch.trace(core.T @ m.bilinear("xy", es, et, centered=True))
        quad = torch.trace(m.bilinear("xx", es, es, centered=True) @ core @ core.T)
        var = m.trace("yy", centered=True)
        sse = max(n * float(delta @ delta) + var - 2 * float(cross) + float(quad), 0.0)
        total = var + n * float(my @ my)
        errs.append(math.sqrt(sse / total) if total > 0 else float("nan"))
        r2s.append(1.0 - sse / var if var > 0 else float("nan"))
    return errs, r2s
