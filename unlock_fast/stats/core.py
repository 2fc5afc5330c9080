"""The accumulating half of :class:`~.moments.Moments`: its state, the updates, the fold
from rows to sums, and every read of the statistics (means, traces, Grams, row factors,
bilinear forms), in either form."""

from __future__ import annotations

from typing import Any, Self

import torch

from .. import ops
from .buffer import DEFAULT_BUFFER_ROWS, RowBuffer
from .rebase import symmetric
from .rows import RowStore, fold_point

__all__ = ["ACCUMULATE_DTYPES", "MomentsCore", "check_accumulate"]

# The dtypes a Moments can keep its sums in.
ACCUMULATE_DTYPES = (torch.float32, torch.float64)
_EPS64 = torch.finfo(torch.float64).eps


def check_accumulate(dtype: object) -> torch.dtype:
    """``dtype`` if it is one of :data:`ACCUMULATE_DTYPES`, else TypeError naming them."""
    if not isinstance(dtype, torch.dtype) or dtype not in ACCUMULATE_DTYPES:
        raise TypeError(
            f"the accumulation dtype must be torch.float32 or torch.float64, got {dtype!r}"
        )
    return dtype


def _check_row_limit(row_limit: object, dim_x: int, dim_y: int | None) -> int:
    if row_limit == "auto":
        return fold_point(dim_x, dim_y)
    if isinstance(row_limit, bool) or not isinstance(row_limit, int) or row_limit < 0:
        raise ValueError(f"row_limit must be an int >= 0 or 'auto', got {row_limit!r}")
    return row_limit


class MomentsCore:
    """Rows and their sums; :class:`~.moments.Moments` adds merging and persistence."""

    def __init__(
        self,
        dim_x: int,
        dim_y: int | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        buffer_rows: int = DEFAULT_BUFFER_ROWS,
        precision: str = "fp32",
        row_limit: int | str = 0,
    ) -> None:
        if isinstance(dim_x, bool) or not isinstance(dim_x, int) or dim_x <= 0:
            raise ValueError(f"dim_x must be a positive int, got {dim_x!r}")
        if dim_y is not None and (
            isinstance(dim_y, bool) or not isinstance(dim_y, int) or dim_y <= 0
        ):
            raise ValueError(f"dim_y must be a positive int or None, got {dim_y!r}")
        self.dim_x, self.dim_y = dim_x, dim_y
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            # "cuda" names the current device: keep its index, as the tensors report it
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = check_accumulate(dtype)
        self.row_limit = _check_row_limit(row_limit, dim_x, dim_y)
        self._buffer = RowBuffer(buffer_rows, self.device, self.dtype)
        ops.moments.check_precision(precision)
        if precision != "fp32" and (self.dtype != torch.float32 or self.device.type != "cuda"):
            raise ValueError(
                f"precision={precision!r} is for fp32 sums on a CUDA device, got "
                f"dtype={self.dtype} on {self.device}"
            )
        self.precision = precision
        self.count = 0.0  # sum of weights
        self.rows = 0
        self.shift_x: torch.Tensor | None = None
        self.shift_y: torch.Tensor | None = None
        self._rows: RowStore | None = RowStore(self.device) if self.row_limit else None
        if self._rows is None:
            self._allocate()

    def _allocate(self) -> None:
        like: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        self._sum_x = torch.zeros(self.dim_x, **like)
        self._gram_xx = torch.zeros(self.dim_x, self.dim_x, **like)  # upper triangle
        if self.dim_y is not None:
            self._sum_y = torch.zeros(self.dim_y, **like)
            self._gram_yy = torch.zeros(self.dim_y, self.dim_y, **like)  # upper triangle
            self._gram_xy = torch.zeros(self.dim_x, self.dim_y, **like)

    @property
    def paired(self) -> bool:
        return self.dim_y is not None

    @property
    def form(self) -> str:
        """ "rows" while the rows are kept, else "gram"."""
        return "gram" if self._rows is None else "rows"

    @property
    def eps(self) -> float:
        """The relative rounding of the statistics: float64's for kept rows (exact, read in
        float64), else that of the sums' dtype."""
        return _EPS64 if self._rows is not None else torch.finfo(self.dtype).eps

    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics (rows, or sums and Grams, and the row block)."""
        if self._rows is not None:
            return self._rows.nbytes
        held = [self._sum_x, self._gram_xx]
        if self.paired:
            held += [self._sum_y, self._gram_yy, self._gram_xy]
        blocks = [self._buffer._x, self._buffer._y, self._buffer._w]
        held += [t for t in blocks if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    # The shifted sums and Grams (upper triangles for xx and yy), held rows flushed first;
    # in the row form, float64 values computed from the rows.
    @property
    def sum_x(self) -> torch.Tensor:
        return self._shifted("x")

    @property
    def sum_y(self) -> torch.Tensor:
        return self._shifted("y")

    @property
    def gram_xx_s(self) -> torch.Tensor:
        return self._shifted("xx")

    @property
    def gram_yy_s(self) -> torch.Tensor:
        return self._shifted("yy")

    @property
    def gram_xy_s(self) -> torch.Tensor:
        return self._shifted("xy")

    def _shifted(self, which: str) -> torch.Tensor:
        if self._rows is None:
            self.flush()
            return getattr(self, ("_sum_" if len(which) == 1 else "_gram_") + which)
        shifts = {"x": self.shift_x, "y": self.shift_y}
        if len(which) == 1:
            dim = self.dim_x if which == "x" else int(self.dim_y or 0)
            shift = shifts[which]
            if shift is None or not len(self._rows):
                return torch.zeros(dim, dtype=torch.float64, device=self.device)
            return self._rows.weighted_sum(which, shift)
        a, b = which[0], which[1]
        if self.shift_x is None or not len(self._rows):
            da, db = (self.dim_x if c == "x" else int(self.dim_y or 0) for c in which)
            return torch.zeros(da, db, dtype=torch.float64, device=self.device)
        ra = self._rows.factor(a, shifts[a])
        return ra.T @ (ra if a == b else self._rows.factor(b, shifts[b]))

    def flush(self) -> Self:
        """Add the held rows to the sums now (Gram form), and return self."""
        if self._rows is None:
            self._buffer.drain(self._accumulate)
        return self

    def fold(self) -> Self:
        """Fold kept rows into the sums and Grams (the Gram form from now on); return self."""
        if self._rows is None:
            return self
        store, self._rows = self._rows, None
        self._allocate()
        if self.shift_x is not None:
            for x, y, w in store.chunks():
                self._buffer.push(x, y, None if w is None else w.to(self.dtype), self._accumulate)
        store.clear()
        return self.flush()

    def __repr__(self) -> str:
        dims = f"{self.dim_x}" if self.dim_y is None else f"{self.dim_x}, {self.dim_y}"
        kind = "" if self.dtype == torch.float32 else f", dtype={str(self.dtype)[6:]}"
        form = "" if self._rows is None else ", form=rows"
        return (
            f"Moments({dims}, rows={self.rows}, count={self.count:g}, device={self.device}"
            f"{kind}{form})"
        )

    # -- accumulation ------------------------------------------------------------------------

    def update(
        self,
        x: Any,
        y: Any | None = None,
        weight: Any | None = None,
    ) -> Self:
        """Add a batch of rows (fp32, fp16 or bf16, and float64 for a float64 accumulator;
        torch, NumPy or CuPy) with optional non-negative weights [n] (a 0/1 row mask is a
        weight)."""
        x = ops.core.as_tensor(x, "x")
        y = None if y is None else ops.core.as_tensor(y, "y")
        if x.dim() != 2 or x.shape[1] != self.dim_x:
            raise ValueError(f"x must be [n, {self.dim_x}], got {list(x.shape)}")
        if (y is None) == self.paired:
            raise ValueError(
                "y is required for a paired accumulator"
                if self.paired
                else "this accumulator has no y; build it with dim_y"
            )
        if y is not None and (y.dim() != 2 or tuple(y.shape) != (x.shape[0], self.dim_y)):
            raise ValueError(f"y must be [{x.shape[0]}, {self.dim_y}], got {list(y.shape)}")
        w = None
        if weight is not None:
            w = ops.core.as_tensor(weight, "weight")
            if not w.is_floating_point() and w.dtype != torch.bool:
                raise TypeError(f"weight must be a float or bool tensor, got {w.dtype}")
            if tuple(w.shape) != (x.shape[0],):
                raise ValueError(f"weight must be [{x.shape[0]}], got {list(w.shape)}")
            w = w.to(self.device, self.dtype)
        if self.dtype == torch.float64 or self._rows is not None:  # else the kernel checks
            for name, t in (("x", x), ("y", y)):
                if t is not None and self.dtype == torch.float32:
                    ops.core.check_dtype(t, name, ops.core.ACTIVATION_DTYPES)
                if t is not None and not t.is_floating_point():
                    raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
            if w is not None and bool((w < 0).any()):
                raise ValueError("weights must be non-negative")
        if x.shape[0] == 0:
            return self
        x = x.to(self.device)
        y = None if y is None else y.to(self.device)
        batch_count = float(x.shape[0]) if w is None else float(w.sum())
        if self.shift_x is None:
            if batch_count <= 0:  # all weights zero: nothing to learn a shift from yet
                self.rows += int(x.shape[0])
                return self
            ws = torch.ones(x.shape[0], device=self.device, dtype=self.dtype) if w is None else w
            self.shift_x = (ws @ x.to(self.dtype)) / batch_count
            if y is not None:
                self.shift_y = (ws @ y.to(self.dtype)) / batch_count
        self.count += batch_count
        self.rows += int(x.shape[0])
        if self._rows is None:
            self._buffer.push(x, y, w, self._accumulate)
            return self
        self._rows.append(x, y, w)
        return self.fold() if len(self._rows) > self.row_limit else self

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor | None) -> None:
        if self.dtype == torch.float64:
            self._accumulate64(x, y, w)
        else:
            self._accumulate32(x, y, w)

    def _accumulate32(
        self, x: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor | None
    ) -> None:
        """The compiled kernel: fp32 sums, upper triangles of the symmetric Grams."""
        assert self.shift_x is not None
        ops.moments_accumulate_(
            x, y, w, self.shift_x, self.shift_y, self._sum_x, getattr(self, "_sum_y", None),
            self._gram_xx, getattr(self, "_gram_yy", None), getattr(self, "_gram_xy", None),
            upper_only=True, precision=self.precision,
        )  # fmt: skip

    def _accumulate64(
        self, x: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor | None
    ) -> None:
        """float64 sums with torch matmuls (full Gram matrices)."""
        assert self.shift_x is not None
        xs = x.to(torch.float64) - self.shift_x
        xw = xs if w is None else xs * w[:, None]
        self._sum_x += xw.sum(0)
        self._gram_xx.addmm_(xw.T, xs)
        if y is not None:
            assert self.shift_y is not None
            ys = y.to(torch.float64) - self.shift_y
            yw = ys if w is None else ys * w[:, None]
            self._sum_y += yw.sum(0)
            self._gram_yy.addmm_(yw.T, ys)
            self._gram_xy.addmm_(xw.T, ys)

    # -- finalisation (float64) --------------------------------------------------------------

    def mean(self, which: str = "x") -> torch.Tensor:
        """Weighted mean of x or y, float64."""
        shift, s = self._pick(which)
        return shift.double() + s.double() / self.count

    def trace(self, which: str = "xx", *, centered: bool = False) -> float:
        """The trace of :meth:`gram` (``which`` "xx" or "yy"), without forming the matrix."""
        if which not in ("xx", "yy") or (which == "yy" and not self.paired):
            raise ValueError(f"which must be xx or yy (paired only), got {which!r}")
        shift, s = self._pick(which[0])
        if self._rows is not None:
            r = self._factor(which[0], centered)
            return float((r * r).sum())
        g = self._gram_xx if which == "xx" else self._gram_yy
        t, n = s.double(), self.count
        base = float(torch.diagonal(g).double().sum())
        if centered:  # tr(G_s) - |t|² / n
            return base - float(t @ t) / n
        a = shift.double()
        return base + 2 * float(a @ t) + n * float(a @ a)

    def gram(self, which: str = "xx", *, centered: bool = False) -> torch.Tensor:
        """Σ w·a bᵀ over rows (``centered`` subtracts the means first), float64.

        which: "xx", "yy" or "xy".
        """
        if which not in ("xx", "yy", "xy") or (which != "xx" and not self.paired):
            raise ValueError(f"which must be one of xx, yy, xy (paired only), got {which!r}")
        sa, ta = self._pick(which[0])
        sb, tb = self._pick(which[1])
        if self._rows is not None:
            ra = self._factor(which[0], centered)
            return ra.T @ (ra if which[0] == which[1] else self._factor(which[1], centered))
        gs = self._gram_shifted(which).double()
        ta, tb = ta.double(), tb.double()
        n = self.count
        if centered:  # Σ(a-μa)(b-μb)ᵀ = G_s - t_a t_bᵀ / n
            return gs - torch.outer(ta, tb) / n
        sa, sb = sa.double(), sb.double()
        return gs + torch.outer(sa, tb) + torch.outer(ta, sb) + n * torch.outer(sa, sb)

    def row_factor(self, which: str = "x", *, centered: bool = False) -> torch.Tensor | None:
        """In the row form, R [N, d] float64 with RᵀR = :meth:`gram` of ``which`` ("x" or
        "y"; rows scaled by √w, minus the mean when ``centered``); None in the Gram form."""
        if self._rows is None:
            return None
        return self._factor(which, centered)

    def _factor(self, which: str, centered: bool) -> torch.Tensor:
        assert self._rows is not None
        self._pick(which)
        return self._rows.factor(which, self.mean(which) if centered else None)

    def bilinear(
        self, which: str, u: torch.Tensor, v: torch.Tensor, *, centered: bool = False
    ) -> torch.Tensor:
        """uᵀ G v, float64 [k_u, k_v], for G = :meth:`gram` of ``which`` and u [d_a, k_u],
        v [d_b, k_v]; in the row form (R_a u)ᵀ (R_b v), without forming G."""
        if which not in ("xx", "yy", "xy") or (which != "xx" and not self.paired):
            raise ValueError(f"which must be one of xx, yy, xy (paired only), got {which!r}")
        u, v = u.to(self.device, torch.float64), v.to(self.device, torch.float64)
        if self._rows is None:
            return u.T @ self.gram(which, centered=centered) @ v
        ra = self._factor(which[0], centered)
        rb = ra if which[0] == which[1] else self._factor(which[1], centered)
        return (ra @ u).T @ (rb @ v)

    def _gram_shifted(self, which: str) -> torch.Tensor:
        if which == "xy":
            return self._gram_xy
        return symmetric(self._gram_xx if which == "xx" else self._gram_yy)

    def _pick(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0 or self.shift_x is None:
            raise ValueError("no rows have been added to this accumulator")
        if which == "x":
            return self.shift_x, self.sum_x
        if which == "y" and self.paired and self.shift_y is not None:
            return self.shift_y, self.sum_y
        raise ValueError(f"which must be 'x' or 'y' (paired only), got {which!r}")
