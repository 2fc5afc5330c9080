"""In-place residual steering at per-row positions or under a mask."""

from __future__ import annotations

import numbers

import torch

from .core import (
    ACTIVATION_CODES,
    ACTIVATION_DTYPES,
    as_tensor,
    backend_of,
    check_dtype,
    check_shape,
    core_module,
    cuda_stream,
    dtype_names,
)

__all__ = ["steer_"]

_STEER_MODES = {"rotate": 0, "add": 1}


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

    Rows and positions that are not selected are untouched bit for bit. On the CPU a
    position outside [-1, S) raises ValueError before anything changes; on CUDA the call is
    asynchronous and such positions are skipped (a check would need a host sync).
    Writes outside autograd: call it with grad disabled, or on tensors that need no grad.
    """
    # The checks are written inline: this op runs once per layer per forward pass.
    h = hidden if type(hidden) is torch.Tensor else as_tensor(hidden, "hidden", writable=True)
    v = vector if type(vector) is torch.Tensor else as_tensor(vector, "vector")
    code = _STEER_MODES.get(mode) if type(mode) is str else None
    if code is None:
        raise ValueError(f"mode must be 'rotate' or 'add', got {mode!r}")
    if type(alpha) is not float:
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
        alpha = float(alpha)
    if (positions is None) == (mask is None):
        raise ValueError("give exactly one of positions or mask")
    shape = h.shape
    if len(shape) != 3:
        raise ValueError(f"hidden must have shape [B, S, d], got {list(shape)}")
    b, s, d = shape
    dtype_code = ACTIVATION_CODES.get(h.dtype)
    if dtype_code is None:
        raise TypeError(f"hidden must have dtype {dtype_names(ACTIVATION_DTYPES)}, got {h.dtype}")
    stride = h.stride()
    if stride[2] != 1 and d > 1:
        raise ValueError(f"hidden's last dimension must be contiguous (stride 1), got {stride}")
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
        sel = (p.data_ptr(), 0, 0, 0)
    else:
        m = mask if type(mask) is torch.Tensor else as_tensor(mask, "mask")
        check_dtype(m, "mask", (torch.bool,))
        check_shape(m, "mask", (b, s))
        if m.get_device() != where or (where < 0 and not m.is_cpu):
            raise ValueError(f"mask is on {m.device}, but hidden is on {h.device}")
        sel = (0, m.data_ptr(), m.stride(0), m.stride(1))
    if b == 0 or s == 0 or d == 0:
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
