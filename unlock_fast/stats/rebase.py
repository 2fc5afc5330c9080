"""Moments re-expressed around another shift (for merging and all-reduce), in float64."""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["rebased", "symmetric"]


class Sums(Protocol):
    """What :func:`rebased` reads of a :class:`~.moments.Moments`."""

    dim_x: int
    dim_y: int | None
    device: torch.device
    count: float
    shift_x: torch.Tensor | None
    shift_y: torch.Tensor | None

    @property
    def paired(self) -> bool: ...
    @property
    def sum_x(self) -> torch.Tensor: ...
    @property
    def sum_y(self) -> torch.Tensor: ...
    @property
    def gram_xx_s(self) -> torch.Tensor: ...
    @property
    def gram_yy_s(self) -> torch.Tensor: ...
    @property
    def gram_xy_s(self) -> torch.Tensor: ...


def symmetric(g: torch.Tensor) -> torch.Tensor:
    """The full matrix whose upper triangle (diagonal included) is that of ``g``."""
    return torch.triu(g) + torch.triu(g, 1).T


def _moved(
    g: torch.Tensor,
    ta: torch.Tensor,
    da: torch.Tensor,
    tb: torch.Tensor,
    db: torch.Tensor,
    n: float,
) -> torch.Tensor:
    # Σw(a-new)(b-new')ᵀ = G + t_a δ_bᵀ + δ_a t_bᵀ + n δ_a δ_bᵀ, with δ = old shift - new.
    return g.double() + torch.outer(ta, db) + torch.outer(da, tb) + n * torch.outer(da, db)


def rebased(
    m: Sums, shift_x: torch.Tensor, shift_y: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The sums and full Grams of ``m`` around new shifts (sum_x, gram_xx and, paired,
    sum_y, gram_yy, gram_xy), float64 on ``m``'s device; zeros for an empty ``m``."""
    if m.shift_x is None:  # empty: everything is zero around any shift
        nx, ny = m.dim_x, m.dim_y
        shapes = {"sum_x": (nx,), "gram_xx": (nx, nx)}
        if ny is not None:
            shapes.update(sum_y=(ny,), gram_yy=(ny, ny), gram_xy=(nx, ny))
        return {k: torch.zeros(v, dtype=torch.float64, device=m.device) for k, v in shapes.items()}
    n = m.count
    dx = m.shift_x.double() - shift_x.double()
    tx = m.sum_x.double()
    out = {"sum_x": tx + n * dx, "gram_xx": _moved(symmetric(m.gram_xx_s), tx, dx, tx, dx, n)}
    if m.paired:
        assert m.shift_y is not None
        assert shift_y is not None
        dy = m.shift_y.double() - shift_y.double()
        ty = m.sum_y.double()
        out["sum_y"] = ty + n * dy
        out["gram_yy"] = _moved(symmetric(m.gram_yy_s), ty, dy, ty, dy, n)
        out["gram_xy"] = _moved(m.gram_xy_s, tx, dx, ty, dy, n)
    return out
