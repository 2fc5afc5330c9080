"""The compiled core and the checks every op shares.

Each op accepts torch tensors, NumPy arrays (CPU) or CuPy arrays (GPU, through DLPack), all
zero-copy; checks dtype, device, shape, contiguity, memory overlap of what it writes and
index ranges; and dispatches to the CPU or CUDA backend of ``unlock_fast._core``. A CUDA
tensor never goes through the CPU path: in a build without the CUDA backend it raises an
error that names the missing backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys
import warnings
from types import ModuleType
from typing import Any

import numpy as np
import torch

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
            with contextlib.suppress(OSError):
                ctypes.CDLL(path)
            return


def core_module() -> ModuleType:
    """The compiled extension, imported on first use; ImportError with advice if missing."""
    global _core, _core_error
    if _core is None and _core_error is None:
        try:
            _preload_openblas()
            from .. import _core as mod
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
        core = core_module()
    except ImportError:
        return {"cpu": False, "cuda": False}
    return {"cpu": True, "cuda": bool(core.cuda_compiled)}


# -- validation shared by every op

# dtype codes of csrc/include/unlock/common.h (enum class DType)
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATION_CODES = {t: DTYPE_CODES[t] for t in ACTIVATION_DTYPES}
# Rows per CUDA panel are capped so the fp32 workspace stays below 256 MiB.
CUDA_WORKSPACE_FLOATS = 1 << 26


def dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def as_tensor(obj: Any, name: str, *, writable: bool = False) -> torch.Tensor:
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


def check_dtype(t: torch.Tensor, name: str, allowed: tuple[torch.dtype, ...]) -> None:
    """TypeError unless ``t.dtype`` is one of ``allowed``."""
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {dtype_names(allowed)}, got {t.dtype}")


def check_shape(t: torch.Tensor, name: str, shape: tuple[int | str, ...]) -> None:
    """ValueError unless ``t`` has ``shape``; a str entry (a symbol such as "n") matches any
    size and is printed as is."""
    ok = t.dim() == len(shape) and all(
        isinstance(want, str) or got == want for got, want in zip(t.shape, shape, strict=True)
    )
    if not ok:
        want = ", ".join(str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{want}], got {list(t.shape)}")


def check_contiguous(t: torch.Tensor, name: str) -> None:
    """ValueError unless ``t`` is C-contiguous."""
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous, got strides {t.stride()} for shape {list(t.shape)}"
        )


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two distinct indices of ``t`` may address the same element.

    With the dims of size > 1 sorted by stride, each stride must pass the last element the
    inner dims reach; an ``expand()``ed tensor (stride 0) fails. This is the usual sufficient
    rule: a few exotic interleaved layouts fail it too and count as overlapping.
    """
    if t.is_contiguous():
        return False
    reach = 0
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True)):
        if size <= 1:
            continue
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def check_not_overlapping(t: torch.Tensor, name: str) -> None:
    """ValueError when ``t`` is written in place but its elements alias one another."""
    if overlaps_itself(t):
        raise ValueError(
            f"{name} is written in place, but its memory overlaps itself (shape "
            f"{list(t.shape)}, strides {t.stride()}, e.g. an expand()ed tensor), so one element "
            f"would be written more than once; pass {name}.contiguous() or a clone"
        )


def check_finite(t: torch.Tensor, name: str) -> None:
    """ValueError when ``t`` holds NaN or Inf (one reduction; on CUDA a host sync)."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{name} must be finite, but {bad} of its {t.numel()} entries are NaN or Inf"
        )


def check_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    """ValueError unless every given tensor lives on ``device``."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, but the other inputs are on {device}")


# How to get the CUDA backend: nvcc, plus cuBLAS/cuSOLVER from a CUDA toolkit or from the
# nvidia-cublas / nvidia-cusolver wheels that CUDA torch installs (seen only without build
# isolation).
REBUILD_CUDA = (
    "rebuild it with `UNLOCK_CUDA=ON pip install --no-build-isolation --force-reinstall "
    "--no-deps .` from the source tree (or `unlock-fast` in place of `.` with "
    "`--no-binary unlock-fast`) on a machine with nvcc; cuBLAS and cuSOLVER come from a CUDA "
    "toolkit or from the nvidia-cublas and nvidia-cusolver wheels that CUDA torch installs "
    "(the build needs scikit-build-core, pybind11 and scipy-openblas32 installed)"
)

_cuda_warned = False


def warn_if_cuda_backend_missing() -> bool:
    """Warn (once per process) when torch is built with CUDA but ``_core`` has no CUDA
    backend, naming how to rebuild. Returns whether it warned. Does nothing (and loads no
    extension) for a CPU-only torch."""
    global _cuda_warned
    if _cuda_warned or not torch.version.cuda:
        return False
    try:
        compiled = bool(core_module().cuda_compiled)
    except ImportError:
        return False  # reported with advice on first use
    if compiled:
        return False
    _cuda_warned = True
    warnings.warn(
        f"unlock_fast: torch has CUDA {torch.version.cuda}, but the compiled core was built "
        "without the CUDA backend, so its ops refuse CUDA tensors; " + REBUILD_CUDA,
        UserWarning,
        stacklevel=2,
    )
    return True


def backend_of(device: torch.device) -> str:
    """ "cpu" or "cuda" for a device; raises when the build lacks the backend it needs."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if not core_module().cuda_compiled:
            raise RuntimeError(
                f"the inputs are on {device}, but unlock_fast was built without the CUDA "
                "backend (unlock_fast.backends()['cuda'] is False); " + REBUILD_CUDA
            )
        return "cuda"
    raise ValueError(f"unsupported device {device}; expected cpu or cuda")


def cuda_stream(device: torch.device) -> int:
    """Handle of the current torch CUDA stream of ``device``."""
    return int(torch.cuda.current_stream(device).cuda_stream)


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


# At import: a CUDA torch with a CPU-only core warns here, not at the first CUDA op.
warn_if_cuda_backend_missing()
