"""Rows kept as they were given, for statistics whose rows are cheaper than their Grams.

N rows of widths d_x and d_y take N·(d_x + d_y) values; their Grams take d_x² + d_y² +
d_x·d_y. With the paper's N ≤ 512 last-token rows at d = 5120/4096 the rows are ~14 times
smaller, and they are exact: nothing is rounded until the fit, which reads them in float64.
:class:`RowStore` holds them in chunks (each batch copied once, in its own dtype) and builds
the float64 factor R with Σ w·(x - c)(x - c)ᵀ = RᵀR when asked.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = ["RowStore", "fold_point"]


def fold_point(dim_x: int, dim_y: int | None) -> int:
    """The most rows that take fewer values than the Grams: N·(d_x + d_y) < d_x² + d_y² +
    d_x·d_y (N·d_x < d_x² unpaired)."""
    dy = dim_y or 0
    grams = dim_x * dim_x + dy * dy + dim_x * dy
    return (grams - 1) // (dim_x + dy)


class RowStore:
    """Rows x [n, dim_x], paired rows y [n, dim_y] and weights [n] (None: all ones), in
    chunks on one device, each chunk in the dtype it came in."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.xs: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.ws: list[torch.Tensor | None] = []
        self.n = 0
        self._sums: dict[str, tuple[tuple[object, ...], torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.n

    @property
    def weighted(self) -> bool:
        return any(w is not None for w in self.ws)

    @property
    def nbytes(self) -> int:
        held = [*self.xs, *self.ys, *(w for w in self.ws if w is not None)]
        return sum(t.numel() * t.element_size() for t in held)

    def append(self, x: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor | None) -> None:
        """Copy a batch in (a view of a larger tensor would keep all of it alive)."""
        self.xs.append(x.detach().to(self.device).contiguous().clone())
        if y is not None:
            self.ys.append(y.detach().to(self.device).contiguous().clone())
        self.ws.append(None if w is None else w.detach().to(self.device).clone())
        self.n += int(x.shape[0])

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        for i, x in enumerate(self.xs):
            yield x, (self.ys[i] if self.ys else None), self.ws[i]

    def clear(self) -> None:
        self.xs, self.ys, self.ws, self.n, self._sums = [], [], [], 0, {}

    def dtype(self, which: str) -> torch.dtype:
        """The dtype every chunk of ``which`` converts to without loss."""
        parts = self.xs if which == "x" else self.ys
        out = parts[0].dtype
        for t in parts[1:]:
            out = torch.promote_types(out, t.dtype)
        return out

    def matrix(self, which: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All rows of ``which`` ("x" or "y") as one [n, d] tensor, in ``dtype`` (default:
        the lossless common dtype)."""
        parts = self.xs if which == "x" else self.ys
        dtype = dtype or self.dtype(which)
        out = torch.empty(self.n, parts[0].shape[1], dtype=dtype, device=self.device)
        at = 0
        for t in parts:
            out[at : at + t.shape[0]].copy_(t)
            at += t.shape[0]
        return out

    def weights(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The weights [n] in ``dtype`` (ones where a chunk had none), or None unweighted."""
        if not self.weighted:
            return None
        ones = torch.ones
        parts = [
            ones(x.shape[0], dtype=dtype, device=self.device) if w is None else w.to(dtype)
            for x, w in zip(self.xs, self.ws, strict=True)
        ]
        return torch.cat(parts)

    def factor(self, which: str, center: torch.Tensor | None) -> torch.Tensor:
        """R = sqrt(w)·(rows - center) in float64 [n, d], so that RᵀR is the Gram about
        ``center`` (None: the uncentred Gram)."""
        r = self.matrix(which, torch.float64)
        if center is not None:
            r -= center.to(r)
        w = self.weights(torch.float64)
        if w is not None:
            r *= w.sqrt()[:, None]
        return r

    def weighted_sum(self, which: str, shift: torch.Tensor) -> torch.Tensor:
        """Σ w·(row - shift), float64 [d]; kept until a row arrives or the shift changes."""
        hit = self._sums.get(which)
        if hit is not None:
            n, held, version = hit[0]
            if n == self.n and held is shift and version == shift._version:
                return hit[1]
        r = self.matrix(which, torch.float64) - shift.double()
        w = self.weights(torch.float64)
        out = r.sum(0) if w is None else w @ r
        self._sums[which] = ((self.n, shift, shift._version), out)
        return out


def gather_rows(
    store: RowStore,
    dim_x: int,
    dim_y: int | None,
    dtype: torch.dtype,
    group: dist.ProcessGroup | None,
) -> RowStore:
    """Every process's rows, in process order, as one store on every process (all-gather,
    padded to the longest); weights travel when any process has them."""
    dev = store.device
    flags = torch.tensor([float(store.n), float(store.weighted)], device=dev)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    longest, weighted = int(flags[0]), bool(flags[1])
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, device=dev) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([float(store.n)], device=dev), group=group)
    parts = [("x", dim_x)] + ([("y", dim_y)] if dim_y is not None else [])
    got: dict[str, list[torch.Tensor]] = {}
    for which, d in parts:
        pad = torch.zeros(longest, d, dtype=dtype, device=dev)
        if store.n:
            pad[: store.n] = store.matrix(which, dtype)
        got[which] = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(got[which], pad, group=group)
    ws: list[torch.Tensor | None] = [None] * world
    if weighted:
        pad = torch.ones(longest, dtype=dtype, device=dev)
        mine = store.weights(dtype)
        if mine is not None:
            pad[: store.n] = mine
        wl = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(wl, pad, group=group)
        ws = list(wl)
    out = RowStore(dev)
    for r in range(world):
        n = int(sizes[r])
        if n:
            w = ws[r]
            out.append(
                got["x"][r][:n],
                got["y"][r][:n] if dim_y is not None else None,
                None if w is None else w[:n],
            )
    return out
