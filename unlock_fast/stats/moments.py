"""Streaming sufficient statistics: counts, means and Gram matrices of activation rows.

``Moments`` keeps running sums of rows shifted by a fixed reference point (the mean of the
first batch), so centred covariances of residual-stream activations, whose means are large,
are free of catastrophic cancellation. The sums are fp32 (the compiled kernel) or float64
(``dtype=torch.float64``); merging, all-reduce and finalisation are in float64. Rows are
held in a :class:`~.buffer.RowBuffer` and added a block at a time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .. import ops
from .buffer import DEFAULT_BUFFER_ROWS, RowBuffer
from .rebase import rebased, symmetric

__all__ = ["ACCUMULATE_DTYPES", "Moments", "check_accumulate"]

# The dtypes a Moments can keep its sums in.
ACCUMULATE_DTYPES = (torch.float32, torch.float64)

_STATE_KEYS = ("shift_x", "sum_x", "gram_xx")
_STATE_KEYS_Y = ("shift_y", "sum_y", "gram_yy", "gram_xy")


def check_accumulate(dtype: object) -> torch.dtype:
    """``dtype`` if it is one of :data:`ACCUMULATE_DTYPES`, else TypeError naming them."""
    if not isinstance(dtype, torch.dtype) or dtype not in ACCUMULATE_DTYPES:
        raise TypeError(
            f"the accumulation dtype must be torch.float32 or torch.float64, got {dtype!r}"
        )
    return dtype


class Moments:
    """Running moments of rows ``x`` [n, dim_x] and optional paired rows ``y`` [n, dim_y].

    With weights w (ones by default) and a shift a fixed at the first batch, the state is
    count = Σw, sum_x = Σ w (x - a), G_xx = Σ w (x - a)(x - a)ᵀ (and the same for y and the
    cross term G_xy), kept in ``dtype``. The kernels update only the upper triangle of G_xx
    and G_yy; :meth:`gram` and :meth:`state_dict` return full symmetric matrices.

    ``dtype``: float32 (the default here) runs the compiled kernel and suits most uses: the
    shift keeps the rounding error of the sums near eps·tr(covariance). float64 sums with
    torch matmuls at twice the memory; the alignment uses it by default
    (:func:`~unlock_fast.collect_alignment_stats`), because it inverts the eigenvalues of
    the Gram and fp32 sums there square the conditioning of the per-sample formula.

    ``precision`` (fp32 sums on CUDA only): "tf32" or "half" multiply on tensor cores, trading
    the last bits of each product for speed (:func:`~unlock_fast.ops.moments_accumulate_`).

    ``buffer_rows``: rows are copied into a block of this many and the Grams updated once per
    full block (0 updates on every call); every read flushes the block first, and
    :meth:`flush` does it by hand. ``count`` and ``rows`` include held rows.

    Accumulators with the same dimensions merge exactly (:meth:`merge`, :meth:`all_reduce`),
    so batches, threads and processes can each hold one. Memory is O(d²), not O(n·d).
    """

    def __init__(
        self,
        dim_x: int,
        dim_y: int | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        buffer_rows: int = DEFAULT_BUFFER_ROWS,
        precision: str = "fp32",
    ) -> None:
        if isinstance(dim_x, bool) or not isinstance(dim_x, int) or dim_x <= 0:
            raise ValueError(f"dim_x must be a positive int, got {dim_x!r}")
        if dim_y is not None and (
            isinstance(dim_y, bool) or not isinstance(dim_y, int) or dim_y <= 0
        ):
            raise ValueError(f"dim_y must be a positive int or None, got {dim_y!r}")
        self.dim_x, self.dim_y = dim_x, dim_y
        self.device = torch.device(device)
        self.dtype = check_accumulate(dtype)
        self._buffer = RowBuffer(buffer_rows, self.device, self.dtype)
        ops.moments.check_precision(precision)
        if precision != "fp32" and (self.dtype != torch.float32 or self.device.type != "cuda"):
            raise ValueError(
                f"precision={precision!r} is for fp32 sums on a CUDA device, got "
                f"dtype={self.dtype} on {self.device}"
            )
        self.precision = precision
        like: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        self.count = 0.0  # sum of weights
        self.rows = 0
        self.shift_x: torch.Tensor | None = None
        self.shift_y: torch.Tensor | None = None
        self._sum_x = torch.zeros(dim_x, **like)
        self._gram_xx = torch.zeros(dim_x, dim_x, **like)  # upper triangle is authoritative
        if dim_y is not None:
            self._sum_y = torch.zeros(dim_y, **like)
            self._gram_yy = torch.zeros(dim_y, dim_y, **like)  # upper triangle
            self._gram_xy = torch.zeros(dim_x, dim_y, **like)

    @property
    def paired(self) -> bool:
        return self.dim_y is not None

    # The shifted sums and Grams (upper triangles for xx and yy), held rows flushed first.
    @property
    def sum_x(self) -> torch.Tensor:
        return self.flush()._sum_x

    @property
    def sum_y(self) -> torch.Tensor:
        return self.flush()._sum_y

    @property
    def gram_xx_s(self) -> torch.Tensor:
        return self.flush()._gram_xx

    @property
    def gram_yy_s(self) -> torch.Tensor:
        return self.flush()._gram_yy

    @property
    def gram_xy_s(self) -> torch.Tensor:
        return self.flush()._gram_xy

    def flush(self) -> Moments:
        """Add the held rows to the sums now, and return self."""
        self._buffer.drain(self._accumulate)
        return self

    def __repr__(self) -> str:
        dims = f"{self.dim_x}" if self.dim_y is None else f"{self.dim_x}, {self.dim_y}"
        kind = "" if self.dtype == torch.float32 else f", dtype={str(self.dtype)[6:]}"
        return (
            f"Moments({dims}, rows={self.rows}, count={self.count:g}, device={self.device}{kind})"
        )

    # -- accumulation ------------------------------------------------------------------------

    def update(
        self,
        x: Any,
        y: Any | None = None,
        weight: Any | None = None,
    ) -> Moments:
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
        if self.dtype == torch.float64:  # the fp32 kernel checks these itself
            for name, t in (("x", x), ("y", y)):
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
        self._buffer.push(x, y, w, self._accumulate)
        self.count += batch_count
        self.rows += int(x.shape[0])
        return self

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
        gs = self._gram_shifted(which).double()
        ta, tb = ta.double(), tb.double()
        n = self.count
        if centered:  # Σ(a-μa)(b-μb)ᵀ = G_s - t_a t_bᵀ / n
            return gs - torch.outer(ta, tb) / n
        sa, sb = sa.double(), sb.double()
        return gs + torch.outer(sa, tb) + torch.outer(ta, sb) + n * torch.outer(sa, sb)

    def _gram_shifted(self, which: str) -> torch.Tensor:
        if which == "xy":
            return self._gram_xy
        return symmetric(self._gram_xx if which == "xx" else self._gram_yy)

    def _pick(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0 or self.shift_x is None:
            raise ValueError("no rows have been added to this accumulator")
        self.flush()
        if which == "x":
            return self.shift_x, self._sum_x
        if which == "y" and self.paired and self.shift_y is not None:
            return self.shift_y, self._sum_y
        raise ValueError(f"which must be 'x' or 'y' (paired only), got {which!r}")

    # -- merging -----------------------------------------------------------------------------

    def _store(
        self,
        shift_x: torch.Tensor,
        shift_y: torch.Tensor | None,
        sums: dict[str, torch.Tensor],
        count: float,
        rows: int,
    ) -> None:
        self.shift_x = shift_x.to(self.device, self.dtype)
        self.shift_y = None if shift_y is None else shift_y.to(self.device, self.dtype)
        self._sum_x.copy_(sums["sum_x"])
        self._gram_xx.copy_(sums["gram_xx"])
        if self.paired:
            self._sum_y.copy_(sums["sum_y"])
            self._gram_yy.copy_(sums["gram_yy"])
            self._gram_xy.copy_(sums["gram_xy"])
        self.count, self.rows = count, rows

    def _check_compatible(self, other: Moments) -> None:
        if not isinstance(other, Moments):
            raise TypeError(f"can only merge another Moments, got {type(other).__name__}")
        if (other.dim_x, other.dim_y) != (self.dim_x, self.dim_y):
            raise ValueError(
                f"cannot merge Moments({other.dim_x}, {other.dim_y}) into "
                f"Moments({self.dim_x}, {self.dim_y})"
            )

    def merge(self, other: Moments) -> Moments:
        """Add the rows of ``other`` into this accumulator (exact up to the storage dtype),
        and return self. The two may have different shifts, devices and dtypes; ``other`` is
        unchanged.
        """
        self._check_compatible(other)
        if other.shift_x is None:
            self.rows += other.rows
            return self
        if self.shift_x is None:
            shift_x = other.shift_x.to(self.device)
            shift_y = None if other.shift_y is None else other.shift_y.to(self.device)
            mine = rebased(self, shift_x, shift_y)  # zeros
        else:
            shift_x, shift_y = self.shift_x, self.shift_y
            mine = rebased(self, shift_x, shift_y)
        theirs = rebased(
            other, shift_x.to(other.device), None if shift_y is None else shift_y.to(other.device)
        )
        total = {k: mine[k] + theirs[k].to(self.device) for k in mine}
        self._store(shift_x, shift_y, total, self.count + other.count, self.rows + other.rows)
        return self

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> Moments:
        """Sum this accumulator over the processes of ``group`` in place, and return self.

        Every process ends with the statistics of all rows. Shifts may differ per process:
        each one re-expresses its sums around the global mean in float64 before the sum.
        The tensors travel on this accumulator's device (use gloo for CPU, NCCL for CUDA).
        A no-op when torch.distributed is not initialised.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        f64: dict[str, Any] = {"dtype": torch.float64, "device": self.device}
        dy = self.dim_y or 0
        # 1) global count, rows and weighted sum of the local means -> a common shift
        head = torch.zeros(2 + self.dim_x + dy, **f64)
        head[0], head[1] = self.count, float(self.rows)
        if self.shift_x is not None and self.count > 0:
            head[2 : 2 + self.dim_x] = self.count * self.mean("x")
            if self.paired:
                head[2 + self.dim_x :] = self.count * self.mean("y")
        dist.all_reduce(head, op=dist.ReduceOp.SUM, group=group)
        count, rows = float(head[0]), int(round(float(head[1])))
        if count <= 0:
            self.rows = rows
            return self
        shift_x = head[2 : 2 + self.dim_x] / count
        shift_y = head[2 + self.dim_x :] / count if self.paired else None
        # 2) sums and Grams around that shift, summed in float64
        parts = rebased(self, shift_x, shift_y)
        keys = list(parts)
        flat = torch.cat([parts[k].reshape(-1) for k in keys])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        total, at = {}, 0
        for k in keys:
            size = parts[k].numel()
            total[k] = flat[at : at + size].view_as(parts[k])
            at += size
        self._store(shift_x, shift_y, total, count, rows)
        return self

    # -- persistence ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The state as plain values: ints/floats/None for the scalars (JSON-friendly) and
        contiguous tensors in the accumulation dtype, safe to store with safetensors. Grams
        are full matrices."""
        self.flush()
        state: dict[str, Any] = {
            "dim_x": self.dim_x,
            "dim_y": self.dim_y,
            "count": float(self.count),
            "rows": int(self.rows),
        }
        zeros = torch.zeros
        like: dict[str, Any] = {"device": self.device, "dtype": self.dtype}
        state["shift_x"] = (
            zeros(self.dim_x, **like) if self.shift_x is None else self.shift_x.clone()
        )
        state["sum_x"] = self._sum_x.clone()
        state["gram_xx"] = symmetric(self._gram_xx).contiguous()
        if self.dim_y is not None:
            state["shift_y"] = (
                zeros(self.dim_y, **like) if self.shift_y is None else self.shift_y.clone()
            )
            state["sum_y"] = self._sum_y.clone()
            state["gram_yy"] = symmetric(self._gram_yy).contiguous()
            state["gram_xy"] = self._gram_xy.clone()
        return state

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], *, device: torch.device | str | None = None
    ) -> Moments:
        """Rebuild an accumulator from :meth:`state_dict` output (tensors on ``device``, or
        where they are). The accumulation dtype is float64 when ``sum_x`` is float64, else
        float32."""
        missing = [k for k in ("dim_x", "count", "rows", *_STATE_KEYS) if k not in state]
        if missing:
            raise ValueError(f"state is missing {', '.join(missing)}")
        dim_x = int(state["dim_x"])
        dim_y = state.get("dim_y")
        dim_y = None if dim_y is None else int(dim_y)
        keys = _STATE_KEYS + (_STATE_KEYS_Y if dim_y is not None else ())
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"state is missing {', '.join(missing)}")
        sum_x = state["sum_x"]
        dev = torch.device(device) if device is not None else getattr(sum_x, "device", "cpu")
        f64 = isinstance(sum_x, torch.Tensor) and sum_x.dtype == torch.float64
        m = cls(dim_x, dim_y, device=dev, dtype=torch.float64 if f64 else torch.float32)
        dy = dim_y or 0
        shapes = [(dim_x,), (dim_x,), (dim_x, dim_x), (dy,), (dy,), (dy, dy), (dim_x, dy)]
        want = dict(zip(_STATE_KEYS + _STATE_KEYS_Y, shapes, strict=True))
        t = {}
        for k in keys:
            v = state[k]
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != want[k]:
                got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(
                    f"state[{k!r}] must be a tensor of shape {list(want[k])}, got {got}"
                )
            t[k] = v.to(dev, m.dtype)
        m.count, m.rows = float(state["count"]), int(state["rows"])
        if m.rows > 0 or m.count > 0:
            m.shift_x = t["shift_x"].clone()
            m.shift_y = t["shift_y"].clone() if dim_y is not None else None
        m.sum_x.copy_(t["sum_x"])
        m.gram_xx_s.copy_(t["gram_xx"])
        if dim_y is not None:
            m.sum_y.copy_(t["sum_y"])
            m.gram_yy_s.copy_(t["gram_yy"])
            m.gram_xy_s.copy_(t["gram_xy"])
        return m
