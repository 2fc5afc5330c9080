"""In-place residual steering at per-row positions or under a mask."""

from __future__ import annotations

import math
import numbers

import torch

from .core import (
    ACTIVATION_CODES,
    ACTIVATION_DTYPES,
    as_tensor,
    backend_of,
    check_dtype,
    check_not_overlapping,
    check_shape,
    core_module,
    cuda_stream,
    dtype_names,
)

__all__ = ["STEER_MODES", "kernel_operands", "steer_", "steer_tokens_", "steer_unchecked_"]

# The steering modes, by name (the one definition of the names), and their codes in
# csrc/include/unlock/steer.h (enum class SteerMode).
STEER_MODES = {"rotate": 0, "add": 1}
_MODE_NAMES = " or ".join(repr(m) for m in STEER_MODES)


def kernel_operands(vector: torch.Tensor, alpha: float, mode: str) -> tuple[torch.Tensor, float]:
    """(vector, alpha) as the steering hooks and the vLLM worker hand them to the kernel:
    for ``add``, (alpha·r, 1.0), so that the kernel computes h + (alpha·r) with one rounding,
    bit for bit what torch's ``h.add_(alpha·r)`` gives; ``rotate`` unchanged."""
    return (vector * alpha, 1.0) if mode == "add" else (vector, alpha)


def steer_(
    hidden: torch.Tensor,
    vector: torch.Tensor,
    alpha: float,
    *,
    positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    mode: str = "rotate",
) -> torch.Tensor:
    """Steer selected rows of hidden [B, S, d] in place and return ``hidden``.

    See :func:`reference.steer_reference` for the rule. hidden: fp32/fp16/bf16 with a
    contiguous last dimension (other strides are free). vector: [d] shared by the batch or
    [B, d] one per row (any float dtype; used in fp32). Exactly one of ``positions`` ([B]
    int64, -1 leaves the row alone) and ``mask`` ([B, S] bool). mode: "rotate" or "add".

    Rows and positions that are not selected are untouched bit for bit. alpha must be
    finite; d must be at least 1 (B = 0 or S = 0 is a no-op), and hidden's memory must not
    overlap itself (an ``expand()``ed tensor would be steered several times in place).

    A position outside [-1, S) is a ValueError raised before anything changes, never
    clamped or skipped: the CPU kernel checks it; on CUDA this function checks it before
    the launch (one host synchronisation; :func:`steer_unchecked_` skips it for positions
    that are valid by construction).
    Writes outside autograd: call it with grad disabled, or on tensors that need no grad.
    """
    # The checks are written inline: this op runs once per layer per forward pass.
    h = hidden if type(hidden) is torch.Tensor else as_tensor(hidden, "hidden", writable=True)
    v = vector if type(vector) is torch.Tensor else as_tensor(vector, "vector")
    code = STEER_MODES.get(mode) if type(mode) is str else None
    if code is None:
        raise ValueError(f"mode must be {_MODE_NAMES}, got {mode!r}")
    if type(alpha) is not float:
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
        alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if (positions is None) == (mask is None):
        raise ValueError("give exactly one of positions or mask")
    shape = h.shape
    if len(shape) != 3:
        raise ValueError(f"hidden must have shape [B, S, d], got {list(shape)}")
    b, s, d = shape
    dtype_code = ACTIVATION_CODES.get(h.dtype)
    if dtype_code is None:
        raise TypeError(f"hidden must have dtype {dtype_names(ACTIVATION_DTYPES)}, got {h.dtype}")
    if d == 0:
        raise ValueError(f"hidden must have at least one feature (d >= 1), got shape {list(shape)}")
    stride = h.stride()
    if stride[2] != 1 and d > 1:
        raise ValueError(f"hidden's last dimension must be contiguous (stride 1), got {stride}")
    check_not_overlapping(h, "hidden")
    if h.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "hidden requires grad and steer_ writes in place outside autograd; call it under "
            "torch.no_grad() or use reference.steer_reference"
        )
    where = h.get_device()  # -1 on the CPU: an int compares faster than torch.device
    if where < 0 and not h.is_cpu:
        backend_of(h.device)  # raises: not a cpu or cuda tensor

    vshape = v.shape
    if vshape != (d,) and vshape != (b, d):
        raise ValueError(f"vector must have shape [{d}] or [{b}, {d}], got {list(vshape)}")
    if v.dtype != torch.float32:
        if not v.is_floating_point():
            raise TypeError(f"vector must be a floating-point tensor, got {v.dtype}")
        v = v.to(torch.float32)
    if v.get_device() != where or (where < 0 and not v.is_cpu):
        raise ValueError(f"vector is on {v.device}, but hidden is on {h.device}")
    if not v.is_contiguous():
        v = v.contiguous()
    v_stride = 0 if len(vshape) == 1 else d

    if positions is not None:
        p = positions if type(positions) is torch.Tensor else as_tensor(positions, "positions")
        if p.dtype != torch.int64:
            if p.dtype not in (torch.int32, torch.int16, torch.int8, torch.uint8):
                raise TypeError(f"positions must have dtype int64, got {p.dtype}")
            p = p.to(torch.int64)
        if p.shape != (b,):
            raise ValueError(f"positions must have shape [{b}], got {list(p.shape)}")
        if p.get_device() != where or (where < 0 and not p.is_cpu):
            raise ValueError(f"positions is on {p.device}, but hidden is on {h.device}")
        if not p.is_contiguous():
            p = p.contiguous()
        if where >= 0 and b and bool(((p < -1) | (p >= s)).any()):  # host sync, CUDA only
            raise ValueError(f"positions must lie in [-1, {s}), got {p.tolist()}")
        sel = (p.data_ptr(), 0, 0, 0)
    else:
        m = mask if type(mask) is torch.Tensor else as_tensor(mask, "mask")
        check_dtype(m, "mask", (torch.bool,))
        check_shape(m, "mask", (b, s))
        if m.get_device() != where or (where < 0 and not m.is_cpu):
            raise ValueError(f"mask is on {m.device}, but hidden is on {h.device}")
        sel = (0, m.data_ptr(), m.stride(0), m.stride(1))
    if b == 0 or s == 0:
        backend_of(h.device)
        return hidden

    args = (
        *(h.data_ptr(), dtype_code, b, s, d, stride[0], stride[1]),
        *sel,
        *(v.data_ptr(), v_stride, alpha, code),
    )
    if where < 0:
        core_module().steer_cpu(*args)
    elif backend_of(h.device) == "cuda":
        core_module().steer_cuda(*args, where, cuda_stream(h.device))
    return hidden


def steer_unchecked_(
    hidden: torch.Tensor,
    vector: torch.Tensor,
    alpha: float,
    mode_code: int,
    positions: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`steer_` for callers that validated everything but ``hidden`` once beforehand.

    The steering hooks check the key, alpha and mode when they are installed and each
    forward call's positions or mask once, then call this per layer. The caller vouches
    that ``vector`` is fp32 and contiguous, [d] or [B, d], that exactly one of ``positions``
    (int64, contiguous, [B]) and ``mask`` (bool, [B, S]) is given, all on hidden's device,
    that ``alpha`` is a finite float and ``mode_code`` a value of :data:`STEER_MODES`, and
    that grad is off or hidden needs none. ``hidden`` is checked here for rank, dtype, d and
    its last stride (same messages as :func:`steer_`); the compiled core checks the shapes
    against the strides, memory overlap and, on the CPU, the range of every position.
    """
    shape = hidden.shape
    if len(shape) != 3:
        raise ValueError(f"hidden must have shape [B, S, d], got {list(shape)}")
    dtype_code = ACTIVATION_CODES.get(hidden.dtype)
    if dtype_code is None:
        raise TypeError(
            f"hidden must have dtype {dtype_names(ACTIVATION_DTYPES)}, got {hidden.dtype}"
        )
    b, s, d = shape
    stride = hidden.stride()
    if stride[2] != 1 and d > 1:
        raise ValueError(f"hidden's last dimension must be contiguous (stride 1), got {stride}")
    if d == 0:
        raise ValueError(f"hidden must have at least one feature (d >= 1), got shape {list(shape)}")
    if b == 0 or s == 0:
        return hidden
    # One positional call, no intermediate tuples: this runs once per layer per forward.
    if positions is not None:
        p_ptr, m_ptr, m_sb, m_ss = positions.data_ptr(), 0, 0, 0
    elif mask is not None:
        p_ptr, m_ptr, m_sb, m_ss = 0, mask.data_ptr(), mask.stride(0), mask.stride(1)
    else:
        raise ValueError("give exactly one of positions or mask")
    v_ptr, v_stride = vector.data_ptr(), (0 if vector.dim() == 1 else d)
    if hidden.is_cpu:
        core_module().steer_cpu(
            hidden.data_ptr(),
            dtype_code,
            b,
            s,
            d,
            stride[0],
            stride[1],
            p_ptr,
            m_ptr,
            m_sb,
            m_ss,
            v_ptr,
            v_stride,
            alpha,
            mode_code,
        )
    elif backend_of(hidden.device) == "cuda":  # raises for a device that is neither
        core_module().steer_cuda(
            *(hidden.data_ptr(), dtype_code, b, s, d, stride[0], stride[1]),
            *(p_ptr, m_ptr, m_sb, m_ss, v_ptr, v_stride, alpha, mode_code),
            hidden.get_device(),
            cuda_stream(hidden.device),
        )
    return hidden


def steer_tokens_(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    table: torch.Tensor,
    layer: int,
    slots: torch.Tensor,
    alphas: torch.Tensor,
    modes: torch.Tensor,
) -> None:
    """Steer the rows of a serving engine's flattened batch in place, each its own way.

    hidden: [N, d] fp32/fp16/bf16, last dimension contiguous; residual: None or like hidden
    (the stream is then hidden + residual: the steered sum goes into hidden and the residual
    row becomes 0). table: fp32 [K, L, d] contiguous, the keys' vectors by slot and layer.
    slots (int32), alphas (fp32) and modes (uint8, :data:`STEER_MODES` codes): [M >= N],
    contiguous, the per-row buffers; row i is steered with ``table[slots[i], layer]`` when
    ``0 <= slots[i] < K`` and left alone otherwise (-1: not steered). All on one device.
    Nothing here reads the buffers' contents, so the call never synchronises with the
    device and can be captured in a CUDA graph.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [N, d], got {list(hidden.shape)}")
    n, d = hidden.shape
    code = ACTIVATION_CODES.get(hidden.dtype)
    if code is None:
        raise TypeError(
            f"hidden must have dtype {dtype_names(ACTIVATION_DTYPES)}, got {hidden.dtype}"
        )
    if hidden.stride(1) != 1 and d > 1:
        raise ValueError(
            f"hidden's last dimension must be contiguous, got strides {hidden.stride()}"
        )
    if residual is not None and (
        residual.shape != hidden.shape
        or residual.dtype != hidden.dtype
        or (residual.stride(1) != 1 and d > 1)
    ):
        raise ValueError(
            f"residual must be like hidden ({list(hidden.shape)}, {hidden.dtype}, last dimension "
            f"contiguous), got {list(residual.shape)}, {residual.dtype}"
        )
    if table.dim() != 3 or table.shape[2] != d or table.dtype != torch.float32:
        raise ValueError(
            f"table must be float32 [K, L, {d}], got {table.dtype} {list(table.shape)}"
        )
    if not table.is_contiguous():
        raise ValueError("table must be contiguous")
    if not 0 <= layer < table.shape[1]:
        raise ValueError(f"layer must lie in [0, {table.shape[1]}), got {layer}")
    for name, t, dt in (("slots", slots, torch.int32), ("alphas", alphas, torch.float32),
                        ("modes", modes, torch.uint8)):  # fmt: skip
        if t.dtype != dt or t.dim() != 1 or t.shape[0] < n or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous {dt} vector of at least {n} rows, got "
                f"{t.dtype} {list(t.shape)}"
            )
    tensors = (hidden, table, slots, alphas, modes) + (() if residual is None else (residual,))
    if any(t.device != hidden.device for t in tensors):
        raise ValueError(f"every tensor must be on {hidden.device}")
    if n == 0:
        return
    args = (
        *(hidden.data_ptr(), 0 if residual is None else residual.data_ptr(), code, n, d),
        *(hidden.stride(0), 0 if residual is None else residual.stride(0)),
        *(table.data_ptr(), table.shape[0], table.shape[1], int(layer)),
        *(slots.data_ptr(), alphas.data_ptr(), modes.data_ptr()),
    )
    if hidden.is_cpu:
        core_module().steer_tokens_cpu(*args)
    elif backend_of(hidden.device) == "cuda":
        core_module().steer_tokens_cuda(*args, hidden.get_device(), cuda_stream(hidden.device))
