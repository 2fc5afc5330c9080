"""The alignment estimator in Gram form (METHOD.md §3), on streamed moments.

For each layer pair, with Grams G_ss = H_sᵀH_s, G_tt = H_tᵀH_t and G_st = H_sᵀH_t (centred
Grams for the centred variant):

    (λ_s, E_s) = top-k eigenpairs of G_ss,  E_t = top-k eigenvectors of G_tt
    M = diag(1/λ_s) E_sᵀ G_st E_t     (1/λ → 0 below a tolerance, as pinv; or 1/(λ + ridge))
    T = E_s M E_tᵀ                     [d_s, d_t]

which equals the per-sample formula pinv(H_s V_sᵀ) H_t V_tᵀ. T is kept factored
(E_s, M, E_t). :func:`heldout_errors` scores a fitted map on held-out moments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import ops
from .stats import Moments

__all__ = ["EIG_RTOL", "Factors", "fit_factors", "heldout_errors"]

# Eigenvalues of G_ss below EIG_RTOL * tr(C_ss) are treated as zero, as pinv drops small
# singular values. C_ss is the centred Gram: the sums are kept in fp32 around a shift near
# the mean, so their rounding error scales with tr(C_ss), not with the (large) uncentred G_ss.
EIG_RTOL = 1e-6


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


def check_solver_settings(ranks: Sequence[int], ridge: float, eig_rtol: float) -> list[int]:
    """Validate the fit settings; returns the ranks as a list."""
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
    return ranks


def _inverse_eigenvalues(lam: torch.Tensor, ridge: float, floor: float) -> torch.Tensor:
    """1/λ for λ above ``floor`` (else 0), or 1/(λ + ridge) with a ridge."""
    if ridge > 0:
        return 1.0 / (lam.clamp_min(0) + ridge)
    keep = lam > floor
    return torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), 0.0)


def fit_factors(
    moments: Sequence[Moments],
    ranks: Sequence[int],
    *,
    centered: bool,
    ridge: float,
    eig_rtol: float,
    oversample: int,
    n_iter: int,
    seed: int,
) -> dict[int, Factors]:
    """The factored map of each rank in ``ranks``, from one eigendecomposition per pair.

    The effective rank of each is min(rank, N, d_s, d_t).
    """
    ranks = check_solver_settings(ranks, ridge, eig_rtol)
    if not moments or moments[0].rows == 0:
        raise ValueError("these statistics hold no rows; collect some prompts first")
    n = moments[0].rows
    ds, dt = moments[0].dim_x, moments[0].dim_y
    if dt is None:
        raise ValueError("the alignment needs paired moments (Source and Target rows)")
    kmax = min(max(ranks), n, ds, dt)
    solver = {"oversample": oversample, "n_iter": n_iter, "seed": seed}
    per_pair = []
    for m in moments:
        gss = m.gram("xx", centered=centered)
        gtt = m.gram("yy", centered=centered)
        gst = m.gram("xy", centered=centered)
        lam, es = ops.eigh_topk(gss, kmax, **solver)
        _, et = ops.eigh_topk(gtt, kmax, **solver)
        proj = es.T @ gst @ et  # [kmax, kmax]
        means = (m.mean("x"), m.mean("y")) if centered else None
        noise = float(torch.trace(gss if centered else m.gram("xx", centered=True)))
        per_pair.append((lam, es, et, proj, means, eig_rtol * noise))
    out: dict[int, Factors] = {}
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
        out[r] = Factors(
            source_basis=torch.stack(es_l),
            core=torch.stack(core_l),
            target_basis=torch.stack(et_l),
            eigenvalues=torch.stack(lam_l),
            source_mean=torch.stack(ms_l) if centered else None,
            target_mean=torch.stack(mt_l) if centered else None,
        )
    return out


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
        cxx = m.gram("xx", centered=True)
        cyy = m.gram("yy", centered=True)
        cxy = m.gram("xy", centered=True)
        mx, my = m.mean("x"), m.mean("y")
        if factors.source_mean is not None and factors.target_mean is not None:
            cs = factors.source_mean[i].to(dev, f64)
            ct = factors.target_mean[i].to(dev, f64)
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
    return errs, r2s
