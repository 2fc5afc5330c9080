"""Streaming sufficient statistics: counts, means and Gram matrices of activation rows.

``Moments`` keeps fp32 running sums of rows shifted by a fixed reference point (the mean of
the first batch), so centred covariances of residual-stream activations, whose means are
large, are free of catastrophic cancellation. Finalisation is in float64.
"""

from __future__ import annotations

import torch

from . import ops

__all__ = ["Moments"]


class Moments:
    """Running moments of rows ``x`` [n, dim_x] and optional paired rows ``y`` [n, dim_y].

    Accumulators with the same dimensions merge exactly (:meth:`merge`, :meth:`all_reduce`),
    so batches, threads and processes can each hold one. Memory is O(d²), not O(n·d).
    """

    def __init__(
        self, dim_x: int, dim_y: int | None = None, *, device: torch.device | str = "cpu"
    ) -> None:
        if not isinstance(dim_x, int) or dim_x <= 0:
            raise ValueError(f"dim_x must be a positive int, got {dim_x!r}")
        if dim_y is not None and (not isinstance(dim_y, int) or dim_y <= 0):
            raise ValueError(f"dim_y must be a positive int or None, got {dim_y!r}")
        self.dim_x, self.dim_y = dim_x, dim_y
        self.device = torch.device(device)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.count = 0.0  # sum of weights
        self.rows = 0
        self.shift_x: torch.Tensor | None = None
        self.shift_y: torch.Tensor | None = None
        self.sum_x = torch.zeros(dim_x, **f32)
        self.gram_xx_s = torch.zeros(dim_x, dim_x, **f32)
        if dim_y is not None:
            self.sum_y = torch.zeros(dim_y, **f32)
            self.gram_yy_s = torch.zeros(dim_y, dim_y, **f32)
            self.gram_xy_s = torch.zeros(dim_x, dim_y, **f32)

    @property
    def paired(self) -> bool:
        return self.dim_y is not None

    def update(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> Moments:
        """Add a batch of rows (fp32, fp16 or bf16) with optional non-negative weights [n]."""
        if x.dim() != 2 or x.shape[1] != self.dim_x:
            raise ValueError(f"x must be [n, {self.dim_x}], got {tuple(x.shape)}")
        if (y is None) != (not self.paired):
            raise ValueError(
                "y is required for a paired accumulator" if self.paired
                else "this accumulator has no y; build it with dim_y"
            )
        if y is not None and (y.dim() != 2 or y.shape != (x.shape[0], self.dim_y)):
            raise ValueError(f"y must be [{x.shape[0]}, {self.dim_y}], got {tuple(y.shape)}")
        if x.shape[0] == 0:
            return self
        x = x.to(self.device)
        y = None if y is None else y.to(self.device)
        w = None if weight is None else weight.to(self.device, torch.float32)
        if self.shift_x is None:
            ws = torch.ones(x.shape[0], device=self.device) if w is None else w
            tot = ws.sum().clamp_min(1e-30)
            self.shift_x = (ws @ x.float()) / tot
            if y is not None:
                self.shift_y = (ws @ y.float()) / tot
        ops.moments_accumulate_(
            x, y, w, self.shift_x, self.shift_y, self.sum_x,
            getattr(self, "sum_y", None), self.gram_xx_s,
            getattr(self, "gram_yy_s", None), getattr(self, "gram_xy_s", None),
        )
        self.count += float(x.shape[0]) if w is None else float(w.sum())
        self.rows += int(x.shape[0])
        return self

    def mean(self, which: str = "x") -> torch.Tensor:
        """Weighted mean of x or y, float64."""
        shift, s = self._pick(which)
        return shift.double() + s.double() / self.count

    def gram(self, which: str = "xx", *, centered: bool = False) -> torch.Tensor:
        """Σ w·a bᵀ over rows (``centered`` subtracts the means first), float64.

        which: "xx", "yy" or "xy".
        """
        a, b = which[0], which[1]
        sa, ta = self._pick(a)
        sb, tb = self._pick(b)
        g = {"xx": "gram_xx_s", "yy": "gram_yy_s", "xy": "gram_xy_s"}.get(which)
        if g is None or not hasattr(self, g):
            raise ValueError(f"which must be one of xx, yy, xy (paired only), got {which!r}")
        gs = getattr(self, g).double()
        ta, tb = ta.double(), tb.double()
        n = self.count
        if centered:  # Σ(a-μa)(b-μb)ᵀ = G_s - t_a t_bᵀ / n
            return gs - torch.outer(ta, tb) / n
        sa, sb = sa.double(), sb.double()
        return gs + torch.outer(sa, tb) + torch.outer(ta, sb) + n * torch.outer(sa, sb)

    def _pick(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0 or self.shift_x is None:
            raise ValueError("no rows have been added to this accumulator")
        if which == "x":
            return self.shift_x, self.sum_x
        if which == "y" and self.paired:
            assert self.shift_y is not None
            return self.shift_y, self.sum_y
        raise ValueError(f"which must be 'x' or 'y' (paired only), got {which!r}")
