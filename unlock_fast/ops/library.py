"""The kernels as torch operators (``torch.library``), visible to ``torch.compile``.

``torch.ops.unlock_fast.steer_``, ``steer_unchecked_``, ``steer_tokens_`` and
``moments_accumulate_`` run the entry points of the same names in :mod:`unlock_fast.ops`,
declare the tensors they write in place, and have fake (meta) implementations, so a graph
tracer records them as single nodes instead of breaking the graph at a pointer hand-off to
the compiled core. The core itself stays free of libtorch: the registration lives here, in
Python. No op has an autograd formula: call them on tensors that need no grad (the steering
hooks take the differentiable reference path when grad is on).

Each op is declared once, by its schema, with the low-level Library API: a call costs the
dispatcher and the entry point (~15 µs on a CPU here; a ``custom_op`` wrapper costs ~65 µs),
which matters for the ops that run once per decoder block per forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .moments import check_precision, moments_accumulate_
from .steer import steer_, steer_tokens_, steer_unchecked_

__all__ = ["moments_accumulate_op", "steer_op", "steer_tokens_op", "steer_unchecked_op"]

_LIB = torch.library.Library("unlock_fast", "FRAGMENT")


def _register(
    schema: str, kernel: Callable[..., object], fake: Callable[..., None]
) -> torch._ops.OpOverloadPacket:
    """Define ``unlock_fast::<schema>`` with ``kernel`` on the CPU and CUDA (its result
    dropped: the ops return nothing) and its fake implementation."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)

    def run(*args: object, **kwargs: object) -> None:
        kernel(*args, **kwargs)

    for key in ("CPU", "CUDA"):
        _LIB.impl(name, run, key)
    torch.library.register_fake(f"unlock_fast::{name}", fake, lib=_LIB)
    return getattr(torch.ops.unlock_fast, name)


def _rank_fake(rank: int, shape: str) -> Callable[..., None]:
    """A fake that checks what metadata can: the rank of the first argument."""

    def fake(first: torch.Tensor, *_: object) -> None:
        if first.dim() != rank:
            raise ValueError(f"{shape}, got {list(first.shape)}")

    return fake


# The dispatcher passes moments_accumulate_'s trailing options positionally when given so,
# by keyword when given so, and not at all when left to their defaults.
_MOMENTS_OPTIONS = ("upper_only", "precision")


def _moments(*args: object, **kwargs: object) -> None:
    options = dict(zip(_MOMENTS_OPTIONS, args[10:], strict=False), **kwargs)
    moments_accumulate_(*args[:10], **options)  # type: ignore[arg-type]


def _moments_fake(x: torch.Tensor, *args: object, **kwargs: object) -> None:
    options = dict(zip(_MOMENTS_OPTIONS, args[9:], strict=False), **kwargs)
    check_precision(str(options.get("precision", "fp32")))
    _rank_fake(2, "x must have shape [n, dx]")(x)


steer_op = _register(
    "steer_(Tensor(a0!) hidden, Tensor vector, float alpha, Tensor? positions, Tensor? mask, "
    "str steer_mode) -> ()",
    lambda h, v, a, p, m, mode: steer_(h, v, a, positions=p, mask=m, mode=mode),
    _rank_fake(3, "hidden must have shape [B, S, d]"),
)
""":func:`~unlock_fast.ops.steer_` as an operator; writes ``hidden`` and returns nothing.
``steer_mode`` is ``steer_``'s ``mode`` ("rotate" or "add"; the name ``mode`` is taken by
torch's functionalization)."""

steer_unchecked_op = _register(
    "steer_unchecked_(Tensor(a!) hidden, Tensor vector, float alpha, int mode_code, "
    "Tensor? positions, Tensor? mask) -> ()",
    steer_unchecked_,
    _rank_fake(3, "hidden must have shape [B, S, d]"),
)
""":func:`~unlock_fast.ops.steer_unchecked_` as an operator: what the steering hooks call per
layer under ``torch.compile`` (the same entry they call directly in eager mode)."""

steer_tokens_op = _register(
    "steer_tokens_(Tensor(a!) hidden, Tensor(b!)? residual, Tensor table, int layer, "
    "Tensor slots, Tensor alphas, Tensor modes) -> ()",
    steer_tokens_,
    _rank_fake(2, "hidden must have shape [N, d]"),
)
""":func:`~unlock_fast.ops.steer_tokens_` as an operator: the serving engine's steering, one
node per decoder block inside a compiled (and CUDA-graph captured) forward."""

moments_accumulate_op = _register(
    "moments_accumulate_(Tensor x, Tensor? y, Tensor? weight, Tensor shift_x, Tensor? shift_y, "
    "Tensor(a!) sum_x, Tensor(b!)? sum_y, Tensor(c!) gram_xx, Tensor(d!)? gram_yy, "
    'Tensor(e!)? gram_xy, bool upper_only=False, str precision="fp32") -> ()',
    _moments,
    _moments_fake,
)
""":func:`~unlock_fast.ops.moments_accumulate_` as an operator (state updated in place)."""
