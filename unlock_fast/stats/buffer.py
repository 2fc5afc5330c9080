"""Rows held back until a block is full, so a Gram update runs once per block.

A rank-n update of a d×d Gram reads and writes the whole matrix whatever n is: at d = 4096
that is three 64 MB matrices per call for a paired accumulator. Capture hands over a few rows
per batch and layer (the last token of 8–32 prompts), so most of the time would go to moving
the Grams, not to arithmetic. :class:`RowBuffer` copies rows into a preallocated block and
passes the block on when it is full (or when asked), in the rows' own dtype, so the sums are
the same up to summation order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["DEFAULT_BUFFER_ROWS", "RowBuffer"]

# Rows per block: at d = 4096 a rank-1024 update does ~1000 flops per Gram element moved.
DEFAULT_BUFFER_ROWS = 1024

Flush = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], None]


class RowBuffer:
    """A block of up to ``capacity`` rows x [n, dim_x], y [n, dim_y] and weights [n].

    :meth:`push` adds a batch, calling ``flush(x, y, w)`` first with the held rows when the
    batch would not fit or has another dtype or weighting; a batch of ``capacity`` rows or
    more goes straight to ``flush``. :meth:`drain` passes on whatever is held. The block is
    allocated on first use, on ``device``, and kept for the next rows.
    """

    def __init__(self, capacity: int, device: torch.device, weight_dtype: torch.dtype) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"buffer_rows must be an int >= 0, got {capacity!r}")
        self.capacity = capacity
        self.device = device
        self.weight_dtype = weight_dtype
        self.fill = 0
        self._key: tuple[torch.dtype, torch.dtype | None, bool] | None = None
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._w: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.fill

    def push(
        self, x: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor | None, flush: Flush
    ) -> None:
        n = int(x.shape[0])
        key = (x.dtype, None if y is None else y.dtype, w is not None)
        if self.fill and (key != self._key or self.fill + n > self.capacity):
            self.drain(flush)
        if n >= self.capacity:
            flush(x, y, w)
            return
        if self._x is None or key != self._key:
            self._allocate(x, y, w is not None)
            self._key = key
        end = self.fill + n
        assert self._x is not None
        self._x[self.fill : end].copy_(x)
        if y is not None:
            assert self._y is not None
            self._y[self.fill : end].copy_(y)
        if w is not None:
            assert self._w is not None
            self._w[self.fill : end].copy_(w)
        self.fill = end

    def drain(self, flush: Flush) -> None:
        if not self.fill:
            return
        n, self.fill = self.fill, 0
        assert self._x is not None
        flush(
            self._x[:n],
            None if self._y is None else self._y[:n],
            None if self._w is None else self._w[:n],
        )

    def _allocate(self, x: torch.Tensor, y: torch.Tensor | None, weighted: bool) -> None:
        rows = self.capacity
        self._x = torch.empty(rows, x.shape[1], dtype=x.dtype, device=self.device)
        self._y = (
            None if y is None else torch.empty(rows, y.shape[1], dtype=y.dtype, device=self.device)
        )
        self._w = (
            torch.empty(rows, dtype=self.weight_dtype, device=self.device) if weighted else None
        )
