"""The kernels as torch operators (``torch.library``), visible to ``torch.compile``.

``torch.ops.unlock_fast.steer_``, ``steer_unchecked_``, ``steer_tokens_`` and
``moments_accumulate_`` run the entry points of the same names in :mod:`unlock_fast.ops`,
declare the tensors they write in place, and
have fake (meta) implementations, so a graph tracer records them as single nodes instead of
breaking the graph at a pointer hand-off to the compiled core. The core itself stays free of
libtorch: the registration lives here, in Python. No op has an autograd formula: call
them on tensors that need no grad (the steering hooks take the differentiable reference
path when grad is on).
"""

from __future__ import annotations

import torch

from .moments import check_precision, moments_accumulate_
from .steer import steer_, steer_tokens_, steer_unchecked_

__all__ = ["moments_accumulate_op", "steer_op", "steer_tokens_op", "steer_unchecked_op"]


@torch.library.custom_op("unlock_fast::steer_", mutates_args=("hidden",))
def steer_op(
    hidden: torch.Tensor,
    vector: torch.Tensor,
    alpha: float,
    positions: torch.Tensor | None,
    mask: torch.Tensor | None,
    steer_mode: str,
) -> None:
    """:func:`~unlock_fast.ops.steer_` as an operator; writes ``hidden`` and returns nothing.

    ``steer_mode`` is ``steer_``'s ``mode`` ("rotate" or "add"; the name ``mode`` is taken by
    torch's functionalization).
    """
    steer_(hidden, vector, alpha, positions=positions, mask=mask, mode=steer_mode)


@steer_op.register_fake
def _steer_fake(
    hidden: torch.Tensor,
    vector: torch.Tensor,
    alpha: float,
    positions: torch.Tensor | None,
    mask: torch.Tensor | None,
    steer_mode: str,
) -> None:
    # Only metadata exists here: the shape checks that need no data, as the real op does.
    del vector, alpha, positions, mask, steer_mode
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, S, d], got {list(hidden.shape)}")


# The serving op runs once per decoder block per engine step, so it is declared with the
# low-level Library API: a call costs the dispatcher and the checked entry point (~15 µs on
# a CPU here), where a ``custom_op`` wrapper costs ~65 µs.
_LIB = torch.library.Library("unlock_fast", "FRAGMENT")
_LIB.define(
    "steer_tokens_(Tensor(a!) hidden, Tensor(b!)? residual, Tensor table, int layer, "
    "Tensor slots, Tensor alphas, Tensor modes) -> ()"
)
for _key in ("CPU", "CUDA"):
    _LIB.impl("steer_tokens_", steer_tokens_, _key)
steer_tokens_op = torch.ops.unlock_fast.steer_tokens_
""":func:`~unlock_fast.ops.steer_tokens_` as an operator: the serving engine's steering, one
node per decoder block inside a compiled (and CUDA-graph captured) forward."""


_LIB.define(
    "steer_unchecked_(Tensor(a!) hidden, Tensor vector, float alpha, int mode_code, "
    "Tensor? positions, Tensor? mask) -> ()"
)


def _steer_unchecked(
    hidden: torch.Tensor,
    vector: torch.Tensor,
    alpha: float,
    mode_code: int,
    positions: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> None:
    steer_unchecked_(hidden, vector, alpha, mode_code, positions, mask)  # returns hidden


for _key in ("CPU", "CUDA"):
    _LIB.impl("steer_unchecked_", _steer_unchecked, _key)
steer_unchecked_op = torch.ops.unlock_fast.steer_unchecked_
""":func:`~unlock_fast.ops.steer_unchecked_` as an operator: what the steering hooks call per
layer under ``torch.compile`` (the same entry they call directly in eager mode)."""


@torch.library.register_fake("unlock_fast::steer_unchecked_")
def _steer_unchecked_fake(
    hidden: torch.Tensor,
    vector: torch.Tensor,
    alpha: float,
    mode_code: int,
    positions: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> None:
    del mode_code
    _steer_fake(hidden, vector, alpha, positions, mask, "")


@torch.library.register_fake("unlock_fast::steer_tokens_")
def _steer_tokens_fake(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    table: torch.Tensor,
    layer: int,
    slots: torch.Tensor,
    alphas: torch.Tensor,
    modes: torch.Tensor,
) -> None:
    del residual, table, layer, slots, alphas, modes
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [N, d], got {list(hidden.shape)}")


@torch.library.custom_op(
    "unlock_fast::moments_accumulate_",
    mutates_args=("sum_x", "sum_y", "gram_xx", "gram_yy", "gram_xy"),
)
def moments_accumulate_op(
    x: torch.Tensor,
    y: torch.Tensor | None,
    weight: torch.Tensor | None,
    shift_x: torch.Tensor,
    shift_y: torch.Tensor | None,
    sum_x: torch.Tensor,
    sum_y: torch.Tensor | None,
    gram_xx: torch.Tensor,
    gram_yy: torch.Tensor | None,
    gram_xy: torch.Tensor | None,
    upper_only: bool = False,
    precision: str = "fp32",
) -> None:
    """:func:`~unlock_fast.ops.moments_accumulate_` as an operator (state updated in place)."""
    moments_accumulate_(
        x,
        y,
        weight,
        shift_x,
        shift_y,
        sum_x,
        sum_y,
        gram_xx,
        gram_yy,
        gram_xy,
        upper_only=upper_only,
        precision=precision,
    )


@moments_accumulate_op.register_fake
def _moments_fake(
    x: torch.Tensor,
    y: torch.Tensor | None,
    weight: torch.Tensor | None,
    shift_x: torch.Tensor,
    shift_y: torch.Tensor | None,
    sum_x: torch.Tensor,
    sum_y: torch.Tensor | None,
    gram_xx: torch.Tensor,
    gram_yy: torch.Tensor | None,
    gram_xy: torch.Tensor | None,
    upper_only: bool = False,
    precision: str = "fp32",
) -> None:
    del y, weight, shift_x, shift_y, sum_x, sum_y, gram_xx, gram_yy, gram_xy, upper_only
    check_precision(precision)
    if x.dim() != 2:
        raise ValueError(f"x must have shape [n, dx], got {list(x.shape)}")
