"""Streaming moments: fp32 sums and Gram matrices of activation rows."""

from __future__ import annotations

import torch

from .core import (
    ACTIVATION_DTYPES,
    CUDA_WORKSPACE_FLOATS,
    as_tensor,
    backend_of,
    check_contiguous,
    check_device,
    check_dtype,
    check_shape,
    core_module,
    cuda_stream,
    dtype_code,
)

__all__ = ["MOMENTS_PRECISIONS", "check_precision", "moments_accumulate_"]

# How the panel is multiplied; codes of the compiled core. tf32 and half run on CUDA only.
MOMENTS_PRECISIONS = {"fp32": 0, "tf32": 1, "half": 2}


def check_precision(precision: object) -> int:
    """The code of a precision name, else ValueError naming the choices."""
    code = MOMENTS_PRECISIONS.get(precision) if isinstance(precision, str) else None
    if code is None:
        raise ValueError(f"precision must be one of {tuple(MOMENTS_PRECISIONS)}, got {precision!r}")
    return code


def moments_accumulate_(
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
    *,
    upper_only: bool = False,
    precision: str = "fp32",
) -> None:
    """Add one batch of shifted moments into fp32 state, in place.

    x [n, dx], y [n, dy] (fp32/fp16/bf16, any strides, dx and dy >= 1; n = 0 is a no-op),
    weight [n] (non-negative floats) or None; shift_x [dx], shift_y [dy] fp32. With
    xs = x - shift_x and ys = y - shift_y: sum_x += wᵀxs, sum_y += wᵀys,
    gram_xx += xsᵀ W xs, gram_yy += ysᵀ W ys, gram_xy += xsᵀ W ys. Count is kept by the
    caller. The state tensors are fp32 and contiguous and must not overlap one another or
    any input (ValueError); without y, shift_y, sum_y, gram_yy and gram_xy must be None.

    upper_only: update only the upper triangle of gram_xx and gram_yy (the lower part is
    left as it was), which saves an O(d²) pass per call; symmetrise once at the end.

    precision (CUDA only): "fp32" (default) multiplies an fp32 panel of the shifted rows
    exactly; "tf32" the same panel on TF32 tensor cores (products with 10-bit mantissas);
    "half" keeps the panel in 16 bits (the input's fp16, else bfloat16: each shifted value
    rounded once) and multiplies on tensor cores; both sum in fp32 and update the whole Grams.

    On CUDA the call is asynchronous on the current stream; negative weights there give NaN
    (the CPU backend raises ValueError instead).
    """
    gemm = check_precision(precision)
    xt = as_tensor(x, "x")
    device = xt.device
    check_dtype(xt, "x", ACTIVATION_DTYPES)
    check_shape(xt, "x", ("n", "dx"))
    n, dx = xt.shape
    if dx == 0:
        raise ValueError(
            f"moments: bad shape: x must have at least one column (dx >= 1), got {list(xt.shape)}"
        )
    state = {
        "shift_x": as_tensor(shift_x, "shift_x"),
        "sum_x": as_tensor(sum_x, "sum_x", writable=True),
        "gram_xx": as_tensor(gram_xx, "gram_xx", writable=True),
    }
    shapes: dict[str, tuple[int | str, ...]] = {
        "shift_x": (dx,),
        "sum_x": (dx,),
        "gram_xx": (dx, dx),
    }
    y_named = {
        "shift_y": shift_y,
        "sum_y": sum_y,
        "gram_yy": gram_yy,
        "gram_xy": gram_xy,
    }
    yt = None
    dy = 0
    if y is None:
        given = [k for k, v in y_named.items() if v is not None]
        if given:
            raise ValueError(f"y is None, so {', '.join(given)} must be None too")
    else:
        yt = as_tensor(y, "y")
        check_dtype(yt, "y", ACTIVATION_DTYPES)
        check_shape(yt, "y", (n, "dy"))
        dy = yt.shape[1]
        if dy == 0:
            raise ValueError(
                f"moments: bad shape: y must have at least one column (dy >= 1), got "
                f"{list(yt.shape)}; pass y=None for moments of x alone"
            )
        missing = [k for k, v in y_named.items() if v is None]
        if missing:
            raise ValueError(f"y is given, so {', '.join(missing)} must be given too")
        for k, v in y_named.items():
            state[k] = as_tensor(v, k, writable=k != "shift_y")
        shapes.update(shift_y=(dy,), sum_y=(dy,), gram_yy=(dy, dy), gram_xy=(dx, dy))
    for k, t in state.items():
        check_dtype(t, k, (torch.float32,))
        check_shape(t, k, shapes[k])
        check_contiguous(t, k)
    wt = None
    if weight is not None:
        wt = as_tensor(weight, "weight")
        if not wt.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {wt.dtype}")
        check_shape(wt, "weight", (n,))
        if wt.dtype != torch.float32:
            wt = wt.to(torch.float32)
    check_device(device, y=yt, weight=wt, **state)
    backend = backend_of(device)
    if gemm and backend != "cuda":
        raise ValueError(f"precision={precision!r} needs CUDA tensors; the CPU multiplies in fp32")
    if n == 0:
        return

    def ptr(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.data_ptr()

    args = (
        n,
        dx,
        dy,
        xt.data_ptr(),
        dtype_code(xt),
        xt.stride(0),
        xt.stride(1),
        ptr(yt),
        0 if yt is None else dtype_code(yt),
        0 if yt is None else yt.stride(0),
        0 if yt is None else yt.stride(1),
        ptr(wt),
        0 if wt is None else wt.stride(0),
        state["shift_x"].data_ptr(),
        ptr(state.get("shift_y")),
        state["sum_x"].data_ptr(),
        ptr(state.get("sum_y")),
        state["gram_xx"].data_ptr(),
        ptr(state.get("gram_yy")),
        ptr(state.get("gram_xy")),
        bool(upper_only),
        gemm,
    )
    core = core_module()
    if backend == "cpu":
        core.moments_accumulate_cpu(*args)
        return
    rows = max(1, min(n, CUDA_WORKSPACE_FLOATS // (dx + dy + 1)))
    workspace = torch.empty(rows * (dx + dy + 1) + 16, dtype=torch.float32, device=device)
    core.moments_accumulate_cuda(
        *args, device.index, workspace.data_ptr(), workspace.numel(), cuda_stream(device)
    )
