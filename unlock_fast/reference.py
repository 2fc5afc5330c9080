"""Pure-torch reference of every compiled kernel.

These functions define what the kernels compute. Tests and benchmarks compare the
compiled backends against them; they favour clarity over speed and compute in float64.
"""

from __future__ import annotations

import torch

__all__ = [
    "moments_reference",
    "eigh_topk_reference",
    "svd_topk_reference",
    "fix_signs",
    "steer_reference",
    "steer_tokens_reference",
]


def moments_reference(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted first and second moments of rows, in float64.

    x: [n, dx], y: [n, dy] or None, weight: [n] (non-negative) or None (all ones).
    Returns ``count`` (sum of weights, 0-d), ``sum_x`` [dx], ``gram_xx`` = Xᵀ W X [dx, dx]
    and, when y is given, ``sum_y`` [dy], ``gram_yy`` [dy, dy], ``gram_xy`` = Xᵀ W Y [dx, dy].
    """
    xd = x.detach().to(torch.float64)
    w = (
        torch.ones(xd.shape[0], dtype=torch.float64, device=xd.device)
        if weight is None
        else weight.detach().to(torch.float64)
    )
    out = {
        "count": w.sum(),
        "sum_x": w @ xd,
        "gram_xx": xd.T @ (w[:, None] * xd),
    }
    if y is not None:
        yd = y.detach().to(torch.float64)
        out["sum_y"] = w @ yd
        out["gram_yy"] = yd.T @ (w[:, None] * yd)
        out["gram_xy"] = xd.T @ (w[:, None] * yd)
    return out


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its entry of largest magnitude is positive.

    vectors: [d, k]. Ties go to the lowest index. This is the sign convention of every
    eigenvector and left singular vector the kernels return.
    """
    idx = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors.gather(0, idx[None, :])).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return vectors * signs


def eigh_topk_reference(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of a symmetric matrix by a full decomposition.

    a: [d, d]. Returns eigenvalues [k] in descending order and eigenvectors [d, k] with
    the sign convention of :func:`fix_signs`.
    """
    evals, evecs = torch.linalg.eigh(a.detach().to(torch.float64))
    order = torch.argsort(evals, descending=True)[:k]
    return evals[order], fix_signs(evecs[:, order])


def svd_topk_reference(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets by a full SVD.

    m: [r, c]. Returns U [r, k], S [k] descending, Vh [k, c], signs fixed on the columns of
    U (and carried to the rows of Vh) so that U diag(S) Vh is unchanged.
    """
    u, s, vh = torch.linalg.svd(m.detach().to(torch.float64), full_matrices=False)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    fixed = fix_signs(u)
    signs = (fixed * u).sum(0).sign()
    return fixed, s, vh * signs[:, None]


def steer_reference(
    hidden: torch.Tensor,
    vector: torch.Tensor,
    alpha: float,
    *,
    positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    mode: str = "rotate",
) -> torch.Tensor:
    """Return a steered copy of ``hidden``.

    hidden: [B, S, d]. vector: [d] (shared by the batch) or [B, d] (one per row).
    Exactly one of ``positions`` ([B] int, one position per row, -1 for "leave this row
    alone") and ``mask`` ([B, S] bool) selects where to steer.

    mode ``rotate`` (the paper's rule): h <- normalize(h/|h| + alpha * r/|r|) * |h|.
    mode ``add``: h <- h + alpha * r.
    Math is done in float32 and the result cast back to ``hidden.dtype``.
    """
    if (positions is None) == (mask is None):
        raise ValueError("give exactly one of positions or mask")
    b, s, d = hidden.shape
    if mask is None:
        assert positions is not None
        pos = positions.to(torch.long)
        mask = torch.zeros(b, s, dtype=torch.bool, device=hidden.device)
        rows = torch.nonzero(pos >= 0).squeeze(1)
        mask[rows, pos[rows]] = True
    h = hidden.to(torch.float32)
    r = vector.to(torch.float32)
    r = r.expand(b, d) if r.dim() == 1 else r
    r = r[:, None, :]
    if mode == "rotate":
        hn = h.norm(dim=-1, keepdim=True)
        u = h / hn.clamp_min(1e-12) + alpha * r / r.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        new = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12) * hn
    elif mode == "add":
        new = h + alpha * r
    else:
        raise ValueError(f"mode must be 'rotate' or 'add', got {mode!r}")
    out = torch.where(mask[:, :, None], new, h)
    return out.to(hidden.dtype)


def steer_tokens_reference(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    table: torch.Tensor,
    layer: int,
    slots: torch.Tensor,
    alphas: torch.Tensor,
    modes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steered copies of (hidden, residual): the serving engine's per-row steering.

    Row i of hidden [N, d] is steered when 0 <= slots[i] < K (table: [K, L, d]) with
    ``table[slots[i], layer]``, alphas[i] and modes[i] (0 rotate, 1 add). With a residual,
    the stream hidden + residual (rounded to the dtype) is steered into hidden and the
    residual row becomes 0. add is h + (alpha·r), alpha·r rounded to fp32 first.
    """
    h, res = hidden.clone(), None if residual is None else residual.clone()
    n = hidden.shape[0]
    for i in range(n):
        slot = int(slots[i])
        if not 0 <= slot < table.shape[0]:
            continue
        if res is not None:
            h[i] = h[i] + res[i]
            res[i] = 0
        r = table[slot, layer].to(torch.float32)
        alpha = float(alphas[i])
        if int(modes[i]) == 1:
            h[i] = (h[i].to(torch.float32) + alpha * r).to(h.dtype)
        else:
            row = steer_reference(
                h[i][None, None], r, alpha, positions=torch.zeros(1, dtype=torch.long)
            )
            h[i] = row[0, 0]
    return h, res
