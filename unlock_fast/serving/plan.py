"""Which rows of one engine step to steer, and with what.

vLLM runs every scheduled request of a step as one flattened [num_tokens, hidden] batch:
request i owns rows ``query_start_loc[i]:query_start_loc[i+1]``, whose positions start at
its ``num_computed_tokens``. A prompt may be split over several steps (chunked prefill) and
mixed with other requests' decode tokens. The rules match :func:`unlock_fast.steer`:

- ``last_prompt``: the row at position P - 1 (P = prompt length), in the step that computes it;
- ``prompt``: rows at positions < P;  ``generated``: rows at positions >= P;  ``all``: every row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..ops.steer import kernel_operands
from .requests import UnlockRequest

__all__ = ["ScheduledRequest", "SteerGroup", "plan_step", "rows_to_steer"]


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's part of a step: its rows [start, end) at positions computed.. ."""

    request: UnlockRequest | None
    num_computed: int
    num_prompt: int
    start: int
    end: int


@dataclass
class SteerGroup:
    """Rows steered alike at one layer: the same vector, alpha and rule. For ``add`` the
    vector is alpha·r and alpha 1, so that h + (alpha·r) rounds as the HF hooks' does."""

    rows: torch.Tensor  # [n] long, on the model's device
    vector: torch.Tensor  # [d] float32
    alpha: float
    mode: str


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


def plan_step(
    scheduled: Sequence[ScheduledRequest],
    keys: Mapping[str, Mapping[int, torch.Tensor]],
    device: torch.device,
) -> dict[int, list[SteerGroup]]:
    """{layer: groups} for this step; requests whose key is not in ``keys`` are skipped."""
    grouped: dict[tuple[str, float, str], list[int]] = {}
    for r in scheduled:
        if r.request is None or r.request.key not in keys:
            continue
        steered = rows_to_steer(r)
        if steered:
            grouped.setdefault((r.request.key, r.request.alpha, r.request.mode), []).extend(steered)
    plan: dict[int, list[SteerGroup]] = {}
    for (name, alpha, mode), rows in grouped.items():
        idx = torch.tensor(rows, dtype=torch.long, device=device)
        for layer, vec in keys[name].items():
            plan.setdefault(layer, []).append(
                SteerGroup(idx, *kernel_operands(vec, alpha, mode), mode)
            )
    return plan
