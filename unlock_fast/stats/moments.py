"""Streaming sufficient statistics: counts, means and Gram matrices of activation rows.

``Moments`` keeps running sums of rows shifted by a fixed reference point (the mean of the
first batch), so centred covariances of residual-stream activations, whose means are large,
are free of catastrophic cancellation. The sums are fp32 (the compiled kernel) or float64
(``dtype=torch.float64``); merging, all-reduce and finalisation are in float64. Rows are
held in a :class:`~.buffer.RowBuffer` and added a block at a time.

With ``row_limit`` > 0 it keeps the rows themselves (:class:`~.rows.RowStore`) while there
are at most that many, and folds them into the sums when one more arrives: the cheaper of
the two exact forms for few rows of wide activations. Every read works in either form.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .core import ACCUMULATE_DTYPES, MomentsCore, check_accumulate
from .rebase import rebased, symmetric
from .rows import gather_rows
from .state import check_state

__all__ = ["ACCUMULATE_DTYPES", "Moments", "check_accumulate"]


class Moments(MomentsCore):
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

    ``row_limit``: keep up to this many rows as they are (``form`` "rows", O(N·d) memory,
    nothing rounded) and fold them into the sums when one more arrives (``form`` "gram",
    O(d²)); "auto" folds when the rows would take as many values as the Grams,
    N·(d_x + d_y) >= d_x² + d_y² + d_x·d_y; 0 (the default) sums from the start.

    Accumulators with the same dimensions merge exactly (:meth:`merge`, :meth:`all_reduce`),
    so batches, threads and processes can each hold one.
    """

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
        and return self. The two may have different forms, shifts, devices and dtypes;
        ``other`` is unchanged. Kept rows stay rows while they fit under ``row_limit``.
        """
        self._check_compatible(other)
        if other.shift_x is None:
            self.rows += other.rows
            return self
        if self.shift_x is None:  # everything here is zero around any shift: take theirs
            self.shift_x = other.shift_x.to(self.device, self.dtype)
            if other.shift_y is not None:
                self.shift_y = other.shift_y.to(self.device, self.dtype)
        count, rows = self.count + other.count, self.rows + other.rows
        if other._rows is not None:  # their rows, as they are
            if self._rows is not None and len(self._rows) + len(other._rows) <= self.row_limit:
                for x, y, w in other._rows.chunks():
                    self._rows.append(x, y, w)
            else:
                self.fold()
                for x, y, w in other._rows.chunks():
                    self._push_exact(x, y, w)
                self.flush()
            self.count, self.rows = count, rows
            return self
        self.fold()
        shift_x, shift_y = self.shift_x, self.shift_y
        mine = rebased(self, shift_x, shift_y)
        theirs = rebased(
            other, shift_x.to(other.device), None if shift_y is None else shift_y.to(other.device)
        )
        total = {k: mine[k] + theirs[k].to(self.device) for k in mine}
        self._store(shift_x, shift_y, total, count, rows)
        return self

    def _push_exact(self, x: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor | None) -> None:
        """Add rows to the sums (float64 rows are narrowed for fp32 sums)."""
        to = self.dtype if self.dtype == torch.float32 else None

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, to if t.dtype == torch.float64 else t.dtype)

        wt = None if w is None else w.to(self.device, self.dtype)
        self._buffer.push(move(x), None if y is None else move(y), wt, self._accumulate)

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> Moments:
        """Sum this accumulator over the processes of ``group`` in place, and return self.

        Every process ends with the statistics of all rows. While every process keeps rows
        and all of them fit under ``row_limit``, the rows are gathered (in process order);
        otherwise each process folds its rows, re-expresses its sums around the global mean
        in float64 (shifts may differ per process) and the sums are added. The tensors
        travel on this accumulator's device (use gloo for CPU, NCCL for CUDA). A no-op when
        torch.distributed is not initialised.
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
        # 2) whether any process sums already, and whether any keeps float64 rows
        store = self._rows
        wide = store is not None and any(t.dtype == torch.float64 for t in store.xs + store.ys)
        vote = torch.tensor([float(store is None), float(wide)], **f64)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=group)
        count, rows = float(head[0]), int(round(float(head[1])))
        if count <= 0:
            self.rows = rows
            return self
        shift_x = head[2 : 2 + self.dim_x] / count
        shift_y = head[2 + self.dim_x :] / count if self.paired else None
        if store is not None and not bool(vote[0]) and rows <= self.row_limit:
            kind = torch.float64 if bool(vote[1]) else torch.float32
            self._rows = gather_rows(store, self.dim_x, self.dim_y, kind, group)
            self.shift_x = shift_x.to(self.dtype)
            self.shift_y = None if shift_y is None else shift_y.to(self.dtype)
            self.count, self.rows = count, rows
            return self
        # 3) sums and Grams around that shift, summed in float64
        parts = rebased(self.fold(), shift_x, shift_y)
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
        contiguous tensors, safe to store with safetensors (:mod:`.state` lists them): the
        sums in the accumulation dtype with full Grams, or the kept rows as they came."""
        self.flush()
        state: dict[str, Any] = {
            "dim_x": self.dim_x,
            "dim_y": self.dim_y,
            "count": float(self.count),
            "rows": int(self.rows),
        }
        like: dict[str, Any] = {"device": self.device, "dtype": self.dtype}
        shifts = {"x": self.shift_x, "y": self.shift_y}
        sides = ("x", "y") if self.paired else ("x",)
        for c in sides:
            dim = self.dim_x if c == "x" else int(self.dim_y or 0)
            s = shifts[c]
            state[f"shift_{c}"] = torch.zeros(dim, **like) if s is None else s.clone()
        store = self._rows
        if store is None:
            state["sum_x"] = self._sum_x.clone()
            state["gram_xx"] = symmetric(self._gram_xx).contiguous()
            if self.paired:
                state["sum_y"] = self._sum_y.clone()
                state["gram_yy"] = symmetric(self._gram_yy).contiguous()
                state["gram_xy"] = self._gram_xy.clone()
            return state
        held = len(store)
        state.update(form="rows", held=held, row_limit=self.row_limit)
        for c in sides:
            dim = self.dim_x if c == "x" else int(self.dim_y or 0)
            state[f"rows_{c}"] = store.matrix(c) if held else torch.zeros(0, dim, **like)
        w = store.weights(self.dtype)
        state["weights"] = torch.ones(held, **like) if w is None else w
        return state

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], *, device: torch.device | str | None = None
    ) -> Moments:
        """Rebuild an accumulator from :meth:`state_dict` output (tensors on ``device``, or
        where they are), in the form it was saved in. The accumulation dtype is float64
        when the sums (or, for rows, the shifts) are float64, else float32."""
        st = check_state(state)
        t = st.tensors
        first = t["shift_x" if st.form == "rows" else "sum_x"]
        dev = torch.device(device) if device is not None else first.device
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        limit = st.row_limit if st.form == "rows" else 0
        m = cls(st.dim_x, st.dim_y, device=dev, dtype=dtype, row_limit=limit)
        t = {k: v.to(dev) for k, v in t.items()}
        m.count, m.rows = st.count, st.rows
        if m.rows > 0 or m.count > 0:
            m.shift_x = t["shift_x"].to(m.dtype).clone()
            m.shift_y = t["shift_y"].to(m.dtype).clone() if st.dim_y is not None else None
        if m._rows is not None:
            if t["rows_x"].shape[0]:
                w = t["weights"].to(m.dtype)
                m._rows.append(t["rows_x"], t.get("rows_y"), None if bool((w == 1).all()) else w)
            return m
        m._sum_x.copy_(t["sum_x"])
        m._gram_xx.copy_(t["gram_xx"])
        if st.dim_y is not None:
            m._sum_y.copy_(t["sum_y"])
            m._gram_yy.copy_(t["gram_yy"])
            m._gram_xy.copy_(t["gram_xy"])
        return m
