"""Validated entry points to the compiled kernels.

Each op accepts torch tensors, NumPy arrays (CPU) or CuPy arrays (GPU, through DLPack), all
zero-copy; checks dtype, device, shape, contiguity and index ranges; and dispatches to the
CPU or CUDA backend of ``unlock_fast._core``. A CUDA tensor never goes through the CPU path:
in a build without the CUDA backend it raises an error that names the missing backend.
CUDA ops run asynchronously on the current torch CUDA stream of the tensors' device.
"""

from __future__ import annotations

import ctypes
import glob
import numbers
import os
import sys
import warnings
from types import ModuleType
from typing import Any

import numpy as np
import torch

__all__ = ["backends", "moments_accumulate_", "eigh_topk", "svd_topk", "steer_"]

# -- the compiled core ---------------------------------------------------------------------

_core: ModuleType | None = None
_core_error: ImportError | None = None


def _preload_openblas() -> None:
    """Load the scipy-openblas32 library so that ``_core`` finds it from any location
    (the installed package also finds it through its RPATH)."""
    try:
        import scipy_openblas32
    except ImportError:
        return
    suffix = {"darwin": "*.dylib", "win32": "*.dll"}.get(sys.platform, "*.so*")
    for path in sorted(glob.glob(os.path.join(scipy_openblas32.get_lib_dir(), suffix))):
        if "scipy_openblas" in os.path.basename(path):
            try:
                ctypes.CDLL(path)
            except OSError:
                pass
            return


def _core_module() -> ModuleType:
    """The compiled extension, imported on first use; ImportError with advice if missing."""
    global _core, _core_error
    if _core is None and _core_error is None:
        try:
            _preload_openblas()
            from . import _core as mod
        except ImportError as err:
            _core_error = err
        else:
            _core = mod
    if _core is None:
        raise ImportError(
            "unlock_fast._core (the compiled kernels) could not be imported "
            f"({_core_error}); build and install the package with `pip install .`"
        ) from _core_error
    return _core


def backends() -> dict[str, bool]:
    """Which compiled backends this build has, e.g. ``{"cpu": True, "cuda": False}``.

    ``cuda`` says whether the CUDA backend was compiled, not whether a GPU is present.
    """
    try:
        core = _core_module()
    except ImportError:
        return {"cpu": False, "cuda": False}
    return {"cpu": True, "cuda": bool(core.cuda_compiled)}


# -- validation helpers (shared by every op) -----------------------------------------------

# dtype codes of csrc/include/unlock/common.h (enum class DType)
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}
_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATION_CODES = {t: _DTYPE_CODES[t] for t in _ACTIVATION_DTYPES}
# Rows per CUDA panel are capped so the fp32 workspace stays below 256 MiB.
_CUDA_WORKSPACE_FLOATS = 1 << 26


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _as_tensor(obj: Any, name: str, *, writable: bool = False) -> torch.Tensor:
    """View ``obj`` as a torch tensor without copying.

    Accepts a torch.Tensor, a NumPy array (CPU) or any object with ``__dlpack__`` (CuPy and
    other GPU arrays). ``writable``: the op writes into it, so a read-only array is refused.
    """
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.ndarray):
        try:
            if obj.flags.writeable:
                return torch.from_numpy(obj)
            if writable:
                raise ValueError(f"{name} is a read-only NumPy array, but it is written in place")
            with warnings.catch_warnings():  # torch warns that it cannot mark it read-only
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(obj)
        except TypeError as err:
            raise TypeError(f"{name}: unsupported NumPy array ({err})") from None
    if hasattr(obj, "__dlpack__"):
        try:
            return torch.from_dlpack(obj)
        except (BufferError, RuntimeError, TypeError, ValueError) as err:
            raise TypeError(
                f"{name}: cannot view {type(obj).__name__} via DLPack ({err})"
            ) from None
    raise TypeError(
        f"{name} must be a torch.Tensor, a NumPy array or a CuPy array, got {type(obj).__name__}"
    )


def _check_dtype(t: torch.Tensor, name: str, allowed: tuple[torch.dtype, ...]) -> None:
    """TypeError unless ``t.dtype`` is one of ``allowed``."""
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {_dtype_names(allowed)}, got {t.dtype}")


def _check_shape(t: torch.Tensor, name: str, shape: tuple[int | str, ...]) -> None:
    """ValueError unless ``t`` has ``shape``; a str entry (a symbol such as "n") matches any
    size and is printed as is."""
    ok = t.dim() == len(shape) and all(
        isinstance(want, str) or got == want for got, want in zip(t.shape, shape, strict=True)
    )
    if not ok:
        want = ", ".join(str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{want}], got {list(t.shape)}")


def _check_contiguous(t: torch.Tensor, name: str) -> None:
    """ValueError unless ``t`` is C-contiguous."""
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous, got strides {t.stride()} for shape {list(t.shape)}"
        )


def _check_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    """ValueError unless every given tensor lives on ``device``."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, but the other inputs are on {device}")


def _backend(device: torch.device) -> str:
    """ "cpu" or "cuda" for a device; raises when the build lacks the backend it needs."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if not _core_module().cuda_compiled:
            raise RuntimeError(
                f"the inputs are on {device}, but unlock_fast was built without the CUDA "
                "backend (unlock_fast.backends()['cuda'] is False); reinstall with "
                "UNLOCK_CUDA=ON on a machine with nvcc"
            )
        return "cuda"
    raise ValueError(f"unsupported device {device}; expected cpu or cuda")


def _cuda_stream(device: torch.device) -> int:
    """Handle of the current torch CUDA stream of ``device``."""
    return int(torch.cuda.current_stream(device).cuda_stream)


def _dtype_code(t: torch.Tensor) -> int:
    return _DTYPE_CODES[t.dtype]


# -- streaming moments ---------------------------------------------------------------------


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
) -> None:
    """Add one batch of shifted moments into fp32 state, in place.

    x [n, dx], y [n, dy] (fp32/fp16/bf16, any strides), weight [n] (non-negative floats) or
    None; shift_x [dx], shift_y [dy] fp32. With xs = x - shift_x and ys = y - shift_y:
    sum_x += wᵀxs, sum_y += wᵀys, gram_xx += xsᵀ W xs, gram_yy += ysᵀ W ys,
    gram_xy += xsᵀ W ys. Count is kept by the caller. The state tensors are fp32 and
    contiguous; without y, shift_y, sum_y, gram_yy and gram_xy must be None.

    upper_only: update only the upper triangle of gram_xx and gram_yy (the lower part is
    left as it was), which saves an O(d²) pass per call; symmetrise once at the end.

    On CUDA the call is asynchronous on the current stream; negative weights there give NaN
    (the CPU backend raises ValueError instead).
    """
    xt = _as_tensor(x, "x")
    device = xt.device
    _check_dtype(xt, "x", _ACTIVATION_DTYPES)
    _check_shape(xt, "x", ("n", "dx"))
    n, dx = xt.shape
    state = {
        "shift_x": _as_tensor(shift_x, "shift_x"),
        "sum_x": _as_tensor(sum_x, "sum_x", writable=True),
        "gram_xx": _as_tensor(gram_xx, "gram_xx", writable=True),
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
        yt = _as_tensor(y, "y")
        _check_dtype(yt, "y", _ACTIVATION_DTYPES)
        _check_shape(yt, "y", (n, "dy"))
        dy = yt.shape[1]
        missing = [k for k, v in y_named.items() if v is None]
        if missing:
            raise ValueError(f"y is given, so {', '.join(missing)} must be given too")
        for k, v in y_named.items():
            state[k] = _as_tensor(v, k, writable=k != "shift_y")
        shapes.update(shift_y=(dy,), sum_y=(dy,), gram_yy=(dy, dy), gram_xy=(dx, dy))
    for k, t in state.items():
        _check_dtype(t, k, (torch.float32,))
        _check_shape(t, k, shapes[k])
        _check_contiguous(t, k)
    wt = None
    if weight is not None:
        wt = _as_tensor(weight, "weight")
        if not wt.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {wt.dtype}")
        _check_shape(wt, "weight", (n,))
        if wt.dtype != torch.float32:
            wt = wt.to(torch.float32)
    _check_device(device, y=yt, weight=wt, **state)
    backend = _backend(device)
    if n == 0:
        return

    def ptr(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.data_ptr()

    args = (
        n,
        dx,
        dy,
        xt.data_ptr(),
        _dtype_code(xt),
        xt.stride(0),
        xt.stride(1),
        ptr(yt),
        0 if yt is None else _dtype_code(yt),
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
    )
    core = _core_module()
    if backend == "cpu":
        core.moments_accumulate_cpu(*args)
        return
    rows = max(1, min(n, _CUDA_WORKSPACE_FLOATS // (dx + dy + 1)))
    workspace = torch.empty(rows * (dx + dy + 1), dtype=torch.float32, device=device)
    core.moments_accumulate_cuda(
        *args, device.index, workspace.data_ptr(), workspace.numel(), _cuda_stream(device)
    )


# -- randomized eigensolver / SVD ------------------------------------------------------------

_RSVD_DTYPES = (torch.float32, torch.float64)
_RSVD_AUTO = 0  # method code of csrc/include/unlock/rsvd.h (RsvdMethod::kAuto)


def _check_rsvd_params(k: int, oversample: int, n_iter: int, seed: int, r: int) -> None:
    """TypeError/ValueError unless k, oversample, n_iter and seed are valid for rank bound r."""
    for name, v in (("k", k), ("oversample", oversample), ("n_iter", n_iter), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 1 <= k <= r:
        raise ValueError(f"k must be in [1, {r}] for this matrix, got {k}")
    if oversample < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")


def _rsvd_matrix(obj: Any, name: str) -> torch.Tensor:
    """A 2-D fp32/fp64 tensor view of ``obj``, detached."""
    t = _as_tensor(obj, name)
    _check_dtype(t, name, _RSVD_DTYPES)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a matrix (2-D), got shape {list(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {list(t.shape)}")
    return t.detach()


def eigh_topk(
    a: torch.Tensor, k: int, *, oversample: int = 10, n_iter: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of a symmetric PSD matrix a [d, d] (fp32 or fp64).

    Returns (eigenvalues [k] descending, eigenvectors [d, k]) as torch tensors in a's dtype
    and device, signs as in :func:`reference.fix_signs`. Deterministic for a given seed: the
    same input and seed give bit-identical output (for a fixed BLAS thread count).

    Randomized range finder with ``l = min(k + oversample, d)`` columns and ``n_iter`` power
    iterations, then an exact eigendecomposition of the projected [l, l] matrix
    (Rayleigh-Ritz). When that would cost about as much as a dense decomposition (roughly
    ``(n_iter + 2) * l >= d`` on the CPU), a dense top-k solver runs instead. Accuracy falls
    with the gap between eigenvalue k and eigenvalue l + 1; raise ``oversample`` or
    ``n_iter`` for slowly decaying spectra. Only the symmetric part of ``a`` is meaningful;
    symmetry is not checked. Any strides are accepted (a non-contiguous input is copied).
    """
    at = _rsvd_matrix(a, "a")
    if at.shape[0] != at.shape[1]:
        raise ValueError(f"a must be a square matrix [d, d], got shape {list(at.shape)}")
    d = at.shape[0]
    _check_rsvd_params(k, oversample, n_iter, seed, d)
    device = at.device
    backend = _backend(device)
    if not at.is_contiguous():
        at = at.contiguous()
    values = torch.empty(k, dtype=at.dtype, device=device)
    vectors = torch.empty(d, k, dtype=at.dtype, device=device)
    code = _dtype_code(at)
    core = _core_module()
    sizes = (d, k, oversample, n_iter)
    if backend == "cpu":
        nbytes = core.rsvd_eigh_workspace_cpu(*sizes, code, _RSVD_AUTO)
        work = torch.empty(nbytes, dtype=torch.uint8)
        core.rsvd_eigh_cpu(
            at.data_ptr(), *sizes, seed, code, _RSVD_AUTO,
            values.data_ptr(), vectors.data_ptr(), work.data_ptr(), nbytes,
        )  # fmt: skip
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        nbytes = core.rsvd_eigh_workspace_cuda(*sizes, code, _RSVD_AUTO, index)
        work = torch.empty(nbytes, dtype=torch.uint8, device=device)
        core.rsvd_eigh_cuda(
            at.data_ptr(), *sizes, seed, code, _RSVD_AUTO,
            values.data_ptr(), vectors.data_ptr(), work.data_ptr(), nbytes,
            index, _cuda_stream(device),
        )  # fmt: skip
    return values, vectors


def svd_topk(
    m: torch.Tensor, k: int, *, oversample: int = 10, n_iter: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD of m [r, c] (fp32 or fp64): U [r, k], S [k] descending, Vh [k, c].

    Torch tensors in m's dtype and device. Signs are fixed on the columns of U as in
    :func:`reference.fix_signs` and carried to the rows of Vh, so U diag(S) Vh is unchanged.
    Deterministic for a given seed, like :func:`eigh_topk`.

    Randomized range finder on the column space with ``l = min(k + oversample, r, c)``
    columns and ``n_iter`` power iterations (each a product with m and one with mᵀ), then
    an exact SVD of the projected matrix. A dense SVD runs instead only when the sketch
    would be about as costly. Any strides are accepted (a non-contiguous input is copied).
    """
    mt = _rsvd_matrix(m, "m")
    rows, cols = mt.shape
    _check_rsvd_params(k, oversample, n_iter, seed, min(rows, cols))
    device = mt.device
    backend = _backend(device)
    if not mt.is_contiguous():
        mt = mt.contiguous()
    u = torch.empty(rows, k, dtype=mt.dtype, device=device)
    s = torch.empty(k, dtype=mt.dtype, device=device)
    vh = torch.empty(k, cols, dtype=mt.dtype, device=device)
    code = _dtype_code(mt)
    core = _core_module()
    sizes = (rows, cols, k, oversample, n_iter)
    outs = (u.data_ptr(), s.data_ptr(), vh.data_ptr())
    if backend == "cpu":
        nbytes = core.rsvd_svd_workspace_cpu(*sizes, code, _RSVD_AUTO)
        work = torch.empty(nbytes, dtype=torch.uint8)
        core.rsvd_svd_cpu(
            mt.data_ptr(), *sizes, seed, code, _RSVD_AUTO, *outs, work.data_ptr(), nbytes
        )
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        nbytes = core.rsvd_svd_workspace_cuda(*sizes, code, _RSVD_AUTO, index)
        work = torch.empty(nbytes, dtype=torch.uint8, device=device)
        core.rsvd_svd_cuda(
            mt.data_ptr(), *sizes, seed, code, _RSVD_AUTO, *outs, work.data_ptr(), nbytes,
            index, _cuda_stream(device),
        )  # fmt: skip
    return u, s, vh


# -- residual steering ---------------------------------------------------------------------

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
    h = hidden if type(hidden) is torch.Tensor else _as_tensor(hidden, "hidden", writable=True)
    v = vector if type(vector) is torch.Tensor else _as_tensor(vector, "vector")
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
    dtype_code = _ACTIVATION_CODES.get(h.dtype)
    if dtype_code is None:
        raise TypeError(f"hidden must have dtype {_dtype_names(_ACTIVATION_DTYPES)}, got {h.dtype}")
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
        _backend(h.device)  # raises: not a cpu or cuda tensor

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
        p = positions if type(positions) is torch.Tensor else _as_tensor(positions, "positions")
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
        m = mask if type(mask) is torch.Tensor else _as_tensor(mask, "mask")
        _check_dtype(m, "mask", (torch.bool,))
        _check_shape(m, "mask", (b, s))
        if m.get_device() != where or (where < 0 and not m.is_cpu):
            raise ValueError(f"mask is on {m.device}, but hidden is on {h.device}")
        sel = (0, m.data_ptr(), m.stride(0), m.stride(1))
    if b == 0 or s == 0 or d == 0:
        _backend(h.device)
        return hidden

    args = (h.data_ptr(), dtype_code, b, s, d, stride[0], stride[1], *sel)
    args += (v.data_ptr(), v_stride, alpha, code)
    if where < 0:
        _core_module().steer_cpu(*args)
    elif _backend(h.device) == "cuda":
        _core_module().steer_cuda(*args, where, _cuda_stream(h.device))
    return hidden
