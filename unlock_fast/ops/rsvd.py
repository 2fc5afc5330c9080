"""Randomized eigensolver and SVD: range finder, power iterations, exact small problem."""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .core import (
    as_tensor,
    backend_of,
    check_dtype,
    check_finite,
    core_module,
    cuda_stream,
    dtype_code,
)

__all__ = ["RSVD_METHODS", "eigh_topk", "svd_topk"]

_RSVD_DTYPES = (torch.float32, torch.float64)
# The codes of csrc/include/unlock/rsvd.h (RsvdMethod): the sketch unless a dense
# decomposition is about as cheap, always the sketch, always the dense decomposition.
RSVD_METHODS = {"auto": 0, "randomized": 1, "exact": 2}


def _method_code(method: str) -> int:
    if method not in RSVD_METHODS:
        raise ValueError(f"method must be one of {', '.join(RSVD_METHODS)}, got {method!r}")
    return RSVD_METHODS[method]


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
    """A 2-D, non-empty, finite fp32/fp64 tensor view of ``obj``, detached."""
    t = as_tensor(obj, name)
    check_dtype(t, name, _RSVD_DTYPES)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a matrix (2-D), got shape {list(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {list(t.shape)}")
    t = t.detach()
    if t.device.type in ("cpu", "cuda"):
        check_finite(t, name)
    return t


def eigh_topk(
    a: torch.Tensor,
    k: int,
    *,
    oversample: int = 10,
    n_iter: int = 4,
    seed: int = 0,
    method: str = "auto",
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
    ``n_iter`` for slowly decaying spectra. ``method="exact"`` always takes the dense
    decomposition (``oversample`` and ``n_iter`` then do nothing), ``"randomized"`` always
    the sketch. Only the symmetric part of ``a`` is meaningful;
    symmetry is not checked. Any strides are accepted (a non-contiguous input is copied).
    NaN or Inf in ``a`` raises ValueError (the check synchronises once on CUDA).
    """
    method_code = _method_code(method)
    at = _rsvd_matrix(a, "a")
    if at.shape[0] != at.shape[1]:
        raise ValueError(f"a must be a square matrix [d, d], got shape {list(at.shape)}")
    d = at.shape[0]
    _check_rsvd_params(k, oversample, n_iter, seed, d)
    device = at.device
    backend = backend_of(device)
    if not at.is_contiguous():
        at = at.contiguous()
    values = torch.empty(k, dtype=at.dtype, device=device)
    vectors = torch.empty(d, k, dtype=at.dtype, device=device)
    code = dtype_code(at)
    core = core_module()
    sizes = (d, k, oversample, n_iter)
    if backend == "cpu":
        nbytes = core.rsvd_eigh_workspace_cpu(*sizes, code, method_code)
        work = torch.empty(nbytes, dtype=torch.uint8)
        core.rsvd_eigh_cpu(
            at.data_ptr(), *sizes, seed, code, method_code,
            values.data_ptr(), vectors.data_ptr(), work.data_ptr(), nbytes,
        )  # fmt: skip
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        nbytes = core.rsvd_eigh_workspace_cuda(*sizes, code, method_code, index)
        work = torch.empty(nbytes, dtype=torch.uint8, device=device)
        core.rsvd_eigh_cuda(
            at.data_ptr(), *sizes, seed, code, method_code,
            values.data_ptr(), vectors.data_ptr(), work.data_ptr(), nbytes,
            index, cuda_stream(device),
        )  # fmt: skip
    return values, vectors


def svd_topk(
    m: torch.Tensor,
    k: int,
    *,
    oversample: int = 10,
    n_iter: int = 4,
    seed: int = 0,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD of m [r, c] (fp32 or fp64): U [r, k], S [k] descending, Vh [k, c].

    Torch tensors in m's dtype and device. Signs are fixed on the columns of U as in
    :func:`reference.fix_signs` and carried to the rows of Vh, so U diag(S) Vh is unchanged.
    Deterministic for a given seed, like :func:`eigh_topk`.

    Randomized range finder on the column space with ``l = min(k + oversample, r, c)``
    columns and ``n_iter`` power iterations (each a product with m and one with mᵀ), then
    an exact SVD of the projected matrix. A dense SVD runs instead only when the sketch
    would be about as costly; ``method`` as in :func:`eigh_topk`. Any strides are accepted
    (a non-contiguous input is copied). NaN or Inf in ``m`` raises ValueError (the check
    synchronises once on CUDA).
    """
    method_code = _method_code(method)
    mt = _rsvd_matrix(m, "m")
    rows, cols = mt.shape
    _check_rsvd_params(k, oversample, n_iter, seed, min(rows, cols))
    device = mt.device
    backend = backend_of(device)
    if not mt.is_contiguous():
        mt = mt.contiguous()
    u = torch.empty(rows, k, dtype=mt.dtype, device=device)
    s = torch.empty(k, dtype=mt.dtype, device=device)
    vh = torch.empty(k, cols, dtype=mt.dtype, device=device)
    code = dtype_code(mt)
    core = core_module()
    sizes = (rows, cols, k, oversample, n_iter)
    outs = (u.data_ptr(), s.data_ptr(), vh.data_ptr())
    if backend == "cpu":
        nbytes = core.rsvd_svd_workspace_cpu(*sizes, code, method_code)
        work = torch.empty(nbytes, dtype=torch.uint8)
        core.rsvd_svd_cpu(
            mt.data_ptr(), *sizes, seed, code, method_code, *outs, work.data_ptr(), nbytes
        )
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        nbytes = core.rsvd_svd_workspace_cuda(*sizes, code, method_code, index)
        work = torch.empty(nbytes, dtype=torch.uint8, device=device)
        core.rsvd_svd_cuda(
            mt.data_ptr(), *sizes, seed, code, method_code, *outs, work.data_ptr(), nbytes,
            index, cuda_stream(device),
        )  # fmt: skip
    return u, s, vh
