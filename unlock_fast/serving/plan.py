"""Which rows of one engine step to steer, and with what.

vLLM runs every scheduled request of a step as one flattened [num_tokens, hidden] batch:
request i owns rows ``query_start_loc[i]:query_start_loc[i+1]``, whose positions start at
its ``num_computed_tokens``. A prompt may be split over several steps (chunked prefill) and
mixed with other requests' decode tokens. The rules match :func:`unlock_fast.steer`:

- ``last_prompt``: the row at position P - 1 (P = prompt length), in the step that computes it;
- ``prompt``: rows at positions < P;  ``generated``: rows at positions >= P;  ``all``: every row.

A step's plan is three host arrays, one entry per row (key slot, -1 for none; alpha; mode
code), that the worker copies into the model's persistent buffers in one go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..ops.steer import STEER_MODES
from .requests import UnlockRequest

__all__ = ["ScheduledRequest", "fill_step", "rows_to_steer"]


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's part of a step: its rows [start, end) at positions computed.. ."""

    request: UnlockRequest | None
    num_computed: int
    num_prompt: int
    start: int
    end: int


def rows_to_steer(r: ScheduledRequest) -> range:
    """The flat rows of ``r`` that its positions rule steers in this step."""
    if r.request is None:
        return range(0)
    first, n, p = r.num_computed, r.end - r.start, r.num_prompt
    if r.request.positions == "last_prompt":
        at = p - 1 - first
        return range(r.start + at, r.start + at + 1) if 0 <= at < n else range(0)
    if r.request.positions == "prompt":
        return range(r.start, r.start + max(0, min(n, p - first)))
    if r.request.positions == "generated":
        return range(r.start + max(0, min(n, p - first)), r.end)
    return range(r.start, r.end)


def fill_step(
    scheduled: Sequence[ScheduledRequest],
    slot_of: Mapping[str, int],
    slots: np.ndarray,
    alphas: np.ndarray,
    modes: np.ndarray,
) -> int:
    """Write the slot, alpha and mode of every row the step steers into the host arrays
    (which the caller has set to -1 beforehand); returns one past the last row written (0:
    nothing steered). Requests whose key has no slot are skipped."""
    end = 0
    for r in scheduled:
        slot = slot_of.get(r.request.key) if r.request is not None else None
        if slot is None:
            continue
        rows = rows_to_steer(r)
        if not rows:
            continue
        assert r.request is not None
        slots[rows.start : rows.stop] = slot
        alphas[rows.start : rows.stop] = r.request.alpha
        modes[rows.start : rows.stop] = STEER_MODES[r.request.mode]
        end = max(end, rows.stop)
    return end
