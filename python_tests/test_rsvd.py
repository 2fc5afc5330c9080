"""Randomized eigensolver / SVD (ops.eigh_topk, ops.svd_topk) against torch.linalg."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unlock_fast import ops, reference

# Tests that take `device` run once per available device (python_tests/conftest.py).
DTYPES = [torch.float32, torch.float64]
# Loose error bounds relative to the largest eigen/singular value, per dtype (the
# rounding-level checks use c·eps instead).
TOL = {torch.float32: 5e-5, torch.float64: 1e-10}
METHOD = {"auto": 0, "randomized": 1, "exact": 2}


def spd_with_spectrum(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """O diag(lam) Oᵀ in float64 with a seeded random orthogonal O."""
    g = torch.Generator().manual_seed(seed)
    o, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=torch.float64))
    a = (o * lam) @ o.T
    return (a + a.T) / 2


def matrix_with_singular_values(rows: int, cols: int, s: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = len(s)
    u, _ = torch.linalg.qr(torch.randn(rows, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, r, generator=g, dtype=torch.float64))
    return (u * s) @ v.T


def spectrum(name: str, d: int) -> torch.Tensor:
    """Spectra whose decay past k = 10 is fast enough for the default sketch (oversample 10,
    4 power iterations) to be exact to rounding even in float64."""
    i = torch.arange(1, d + 1, dtype=torch.float64)
    if name == "fast_decay":
        return 10.0 * torch.exp(-i / 2)
    if name == "clustered":  # five (nearly) equal top eigenvalues, then a decaying tail
        return torch.where(i <= 5, 3.0 + 1e-9 * i, 2.0 * torch.exp(-i / 2))
    if name == "rank_deficient":  # rank 6 < k
        return torch.where(i <= 6, 1.0 / i, torch.zeros_like(i))
    if name == "outlier":  # one huge direction, like the mean of raw activations
        return torch.where(i == 1, torch.full_like(i, 1e3), torch.exp(-i / 2))
    raise AssertionError(name)


def projector(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return v @ v.T


def plan(
    symmetric: bool, rows: int, cols: int, k: int, oversample=10, n_iter=4, device: str = "cpu"
) -> tuple[int, bool]:
    """(sketch width, dense path?) of ops.eigh_topk / ops.svd_topk on ``device``'s backend."""
    core = ops.core.core_module()
    cuda = torch.device(device).type == "cuda"
    return core.rsvd_plan(symmetric, rows, cols, k, oversample, n_iter, METHOD["auto"], cuda)


def dense_eigh_size(device: str, k: int, largest: int = 40) -> int:
    """The largest d <= ``largest`` at which eigh_topk (default sketch) takes the dense path
    on ``device``. The backends set the crossover differently: the CUDA one goes dense later,
    so a size that is dense on the CPU can take the randomized path on CUDA. d = k is always
    dense (the sketch would be the whole space)."""
    return next(d for d in range(largest, k - 1, -1) if plan(True, d, d, k, device=device)[1])


def dense_svd_n_iter(device: str, rows: int, cols: int, k: int, default: int = 4) -> int | None:
    """The fewest power iterations (at least ``default``) for which svd_topk takes the dense
    path on ``device``, or None when none up to 64 does. The dense path runs no power
    iterations, so n_iter then only steers the choice. On the CPU this is the default."""
    for n_iter in range(default, 65):
        if plan(False, rows, cols, k, n_iter=n_iter, device=device)[1]:
            return n_iter
    return None


def eigh_core(a: torch.Tensor, k: int, method: str, oversample=10, n_iter=4, seed=0):
    """Call the CPU kernel with a forced method."""
    core = ops.core.core_module()
    d = a.shape[0]
    code = ops.core.dtype_code(a)
    sizes = (d, k, oversample, n_iter)
    nbytes = core.rsvd_eigh_workspace_cpu(*sizes, code, METHOD[method])
    work = torch.empty(nbytes, dtype=torch.uint8)
    values = torch.empty(k, dtype=a.dtype)
    vectors = torch.empty(d, k, dtype=a.dtype)
    core.rsvd_eigh_cpu(
        a.data_ptr(), *sizes, seed, code, METHOD[method], values.data_ptr(),
        vectors.data_ptr(), work.data_ptr(), nbytes,
    )  # fmt: skip
    return values, vectors


def svd_core(m: torch.Tensor, k: int, method: str, oversample=10, n_iter=4, seed=0):
    core = ops.core.core_module()
    rows, cols = m.shape
    code = ops.core.dtype_code(m)
    sizes = (rows, cols, k, oversample, n_iter)
    nbytes = core.rsvd_svd_workspace_cpu(*sizes, code, METHOD[method])
    work = torch.empty(nbytes, dtype=torch.uint8)
    u = torch.empty(rows, k, dtype=m.dtype)
    s = torch.empty(k, dtype=m.dtype)
    vh = torch.empty(k, cols, dtype=m.dtype)
    core.rsvd_svd_cpu(
        m.data_ptr(), *sizes, seed, code, METHOD[method], u.data_ptr(), s.data_ptr(),
        vh.data_ptr(), work.data_ptr(), nbytes,
    )  # fmt: skip
    return u, s, vh


def assert_orthonormal(v: torch.Tensor, tol: float) -> None:
    v = v.double().cpu()
    eye = torch.eye(v.shape[1], dtype=torch.float64)
    torch.testing.assert_close(v.T @ v, eye, atol=tol, rtol=0)


def assert_signs(v: torch.Tensor) -> None:
    """The entry of largest magnitude of each column is positive."""
    v = v.cpu()
    idx = v.abs().argmax(dim=0)
    assert (v.gather(0, idx[None, :]) > 0).all()


# -- eigh_topk -------------------------------------------------------------------------------


def gap_tolerance(lam: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rounding-level error bound of each of the top-k eigenvectors: c·eps·‖A‖ / gap."""
    eps = torch.finfo(dtype).eps
    gaps = torch.stack(
        [(lam[j] - torch.cat([lam[:j], lam[j + 1 :]])).abs().min() for j in range(k)]
    )
    return 50 * eps * lam.abs().max() / gaps


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["fast_decay", "clustered", "rank_deficient", "outlier"])
@pytest.mark.parametrize("path", ["randomized", "dense"])
def test_eigh_known_spectra(device, dtype, name, path):
    k = 10
    d = 257 if path == "randomized" else dense_eigh_size(device, k)
    lam = spectrum(name, d)
    a64 = spd_with_spectrum(lam)
    a = a64.to(dtype=dtype, device=device)
    assert plan(True, d, d, k, device=device)[1] == (path == "dense")
    values, vectors = ops.eigh_topk(a, k)
    assert values.dtype == dtype
    assert vectors.dtype == dtype
    assert values.device == a.device
    assert vectors.shape == (d, k)
    # rounding-level accuracy: this sketch captures these spectra fully
    tol = 50 * torch.finfo(dtype).eps * lam.max().item()
    ref_values, ref_vectors = reference.eigh_topk_reference(a64, k)
    torch.testing.assert_close(values.double().cpu(), ref_values, atol=tol, rtol=0)
    assert (values[:-1] >= values[1:]).all()
    assert_orthonormal(vectors, 50 * torch.finfo(dtype).eps * d**0.5)
    assert_signs(vectors)
    vectors = vectors.double().cpu()
    resid = (a64 @ vectors - vectors * values.double().cpu()).norm(dim=0)
    assert resid.max() <= tol  # ‖A v - λ v‖ of every pair
    err = (vectors - ref_vectors).abs().max(dim=0).values
    vec_tol = gap_tolerance(lam, k, dtype)
    if name == "clustered":  # the five-fold cluster is defined only as a subspace
        torch.testing.assert_close(
            projector(vectors[:, :5]), projector(ref_vectors[:, :5]), atol=tol, rtol=0
        )
        assert (err[5:] <= vec_tol[5:]).all()
    elif name == "rank_deficient":  # eigenvalues 7.. are zero, their vectors arbitrary
        assert (err[:6] <= vec_tol[:6]).all()
    else:
        assert (err <= vec_tol).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigh_exact_and_randomized_agree(dtype):
    d, k = 120, 7
    a = spd_with_spectrum(spectrum("fast_decay", d), seed=3).to(dtype)
    v_exact, u_exact = eigh_core(a, k, "exact")
    v_rand, u_rand = eigh_core(a, k, "randomized")
    tol = TOL[dtype] * 10
    torch.testing.assert_close(v_exact, v_rand, atol=tol, rtol=0)
    torch.testing.assert_close(u_exact, u_rand, atol=50 * TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigh_full_width_sketch(dtype):
    # oversample reaching past d: the sketch is clamped to the whole space and is exact.
    d, k = 31, 29
    a = spd_with_spectrum(spectrum("fast_decay", d) + 1.0).to(dtype)
    values, vectors = eigh_core(a, k, "randomized", oversample=50, n_iter=0)
    ref_values, ref_vectors = reference.eigh_topk_reference(a, k)
    torch.testing.assert_close(values.double(), ref_values, atol=20 * TOL[dtype], rtol=0)
    assert_orthonormal(vectors, 50 * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigh_size_one(device, dtype):
    a = torch.tensor([[-2.5]], dtype=dtype, device=device)
    values, vectors = ops.eigh_topk(a, 1)
    assert values.tolist() == [-2.5]
    assert vectors.tolist() == [[1.0]]


@pytest.mark.parametrize("d", [2, 3, 17, 63])
def test_eigh_small_odd_sizes(d):
    # evenly spaced eigenvalues: every eigenvector is well conditioned
    a = spd_with_spectrum(torch.arange(d, 0, -1, dtype=torch.float64), seed=d)
    for k in {1, d // 2 + 1, d}:
        values, vectors = ops.eigh_topk(a, k)
        ref_values, ref_vectors = reference.eigh_topk_reference(a, k)
        torch.testing.assert_close(values, ref_values, atol=1e-11 * d, rtol=0)
        torch.testing.assert_close(vectors, ref_vectors, atol=1e-10 * d, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigh_deterministic(device, dtype):
    d, k = 200, 12
    a = spd_with_spectrum(spectrum("outlier", d), seed=1).to(dtype=dtype, device=device)
    v1, u1 = ops.eigh_topk(a, k, seed=7)
    v2, u2 = ops.eigh_topk(a.clone(), k, seed=7)
    assert torch.equal(v1, v2)
    assert torch.equal(u1, u2)
    # another seed draws another test matrix: different bits, same answer
    v3, u3 = ops.eigh_topk(a, k, seed=8)
    assert not torch.equal(u1, u3)
    torch.testing.assert_close(v1, v3, atol=TOL[dtype] * 1e4, rtol=0)


def test_eigh_power_iterations_help():
    # slowly decaying spectrum: more power iterations, smaller error
    d, k = 300, 10
    lam = 1.0 / torch.arange(1, d + 1, dtype=torch.float64)
    a = spd_with_spectrum(lam)
    ref = lam[:k]
    errs = [
        ((ops.eigh_topk(a, k, oversample=5, n_iter=q)[0] - ref).abs() / ref).max().item()
        for q in (0, 2, 6)
    ]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-2


def test_eigh_accepts_numpy_and_strided_input():
    d, k = 150, 5
    a = spd_with_spectrum(spectrum("fast_decay", d), seed=2)
    expected = ops.eigh_topk(a, k, seed=3)
    from_numpy = ops.eigh_topk(a.numpy(), k, seed=3)
    transposed = ops.eigh_topk(a.T, k, seed=3)  # a non-contiguous view of the same matrix
    for got in (from_numpy, transposed):
        assert isinstance(got[0], torch.Tensor)
        torch.testing.assert_close(got[0], expected[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(got[1], expected[1], atol=1e-9, rtol=0)
    # a read-only array is fine: eigh_topk does not write its input
    ro = a.numpy().copy()
    ro.setflags(write=False)
    torch.testing.assert_close(ops.eigh_topk(ro, k, seed=3)[0], expected[0])


def test_eigh_does_not_modify_input():
    a = spd_with_spectrum(spectrum("fast_decay", 60)).float()
    before = a.clone()
    ops.eigh_topk(a, 4)
    ops.eigh_topk(a, 40)  # dense path
    assert torch.equal(a, before)


def test_eigh_invalid_inputs():
    a = torch.eye(6)
    with pytest.raises(ValueError, match=r"square matrix \[d, d\], got shape \[6, 5\]"):
        ops.eigh_topk(torch.ones(6, 5), 2)
    with pytest.raises(ValueError, match="2-D"):
        ops.eigh_topk(torch.ones(6), 2)
    with pytest.raises(ValueError, match="2-D"):
        ops.eigh_topk(torch.ones(2, 3, 3), 2)
    with pytest.raises(ValueError, match="empty"):
        ops.eigh_topk(torch.ones(0, 0), 1)
    for k in (0, 7, -1):
        with pytest.raises(ValueError, match=r"k must be in \[1, 6\]"):
            ops.eigh_topk(a, k)
    for k in (2.0, True, "2"):
        with pytest.raises(TypeError, match="k must be an int"):
            ops.eigh_topk(a, k)
    with pytest.raises(ValueError, match="oversample must be >= 0"):
        ops.eigh_topk(a, 2, oversample=-1)
    with pytest.raises(ValueError, match="n_iter must be >= 0"):
        ops.eigh_topk(a, 2, n_iter=-2)
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match="seed"):
            ops.eigh_topk(a, 2, seed=seed)
    for dtype in (torch.float16, torch.bfloat16, torch.int64, torch.complex64):
        with pytest.raises(TypeError, match="float32, float64"):
            ops.eigh_topk(a.to(dtype), 2)
    with pytest.raises(TypeError, match="NumPy"):
        ops.eigh_topk([[1.0, 0.0], [0.0, 1.0]], 1)
    with pytest.raises(ValueError, match="unsupported device meta"):
        ops.eigh_topk(torch.empty(4, 4, device="meta"), 2)


# -- svd_topk --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(151, 90), (90, 151), (33, 21), (21, 33)])
def test_svd_known_spectrum(device, dtype, shape):
    rows, cols = shape
    k = 8
    r = min(rows, cols)
    # (33, 21) and (21, 33) take the dense path on every backend, the others the sketch
    dense = r == 21
    n_iter = dense_svd_n_iter(device, rows, cols, k) if dense else 4
    if n_iter is None:
        pytest.skip(f"no n_iter makes svd_topk take the dense path on {device} at {shape}")
    s_true = 5.0 * torch.exp(-torch.arange(r, dtype=torch.float64) / 3)
    m64 = matrix_with_singular_values(rows, cols, s_true, seed=rows)
    assert plan(False, rows, cols, k, n_iter=n_iter, device=device)[1] == dense
    u, s, vh = ops.svd_topk(m64.to(dtype=dtype, device=device), k, n_iter=n_iter)
    assert u.shape == (rows, k)
    assert s.shape == (k,)
    assert vh.shape == (k, cols)
    assert u.dtype == s.dtype == vh.dtype == dtype
    ref_u, ref_s, ref_vh = reference.svd_topk_reference(m64, k)
    tol = TOL[dtype] * s_true[0].item()
    torch.testing.assert_close(s.double().cpu(), ref_s, atol=tol, rtol=0)
    torch.testing.assert_close(u.double().cpu(), ref_u, atol=200 * TOL[dtype], rtol=0)
    torch.testing.assert_close(vh.double().cpu(), ref_vh, atol=200 * TOL[dtype], rtol=0)
    assert_orthonormal(u, 50 * TOL[dtype])
    assert_orthonormal(vh.T, 50 * TOL[dtype])
    assert_signs(u)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(120, 70), (70, 120)])
def test_svd_rank_deficient(dtype, shape):
    rows, cols = shape
    k, rank = 9, 5
    m64 = matrix_with_singular_values(rows, cols, torch.tensor([4.0, 3.0, 2.0, 1.5, 1.0]))
    assert torch.linalg.matrix_rank(m64) == rank
    for method in ("randomized", "exact"):
        u, s, vh = svd_core(m64.to(dtype), k, method)
        ref_u, ref_s, ref_vh = reference.svd_topk_reference(m64, k)
        tol = TOL[dtype] * 4
        torch.testing.assert_close(s.double(), ref_s, atol=tol, rtol=0)
        torch.testing.assert_close(u[:, :rank].double(), ref_u[:, :rank], atol=1e-3, rtol=0)
        assert_orthonormal(u, 50 * TOL[dtype])
        assert_orthonormal(vh.T, 50 * TOL[dtype])
        # U diag(S) Vh reproduces m
        recon = (u.double() * s.double()) @ vh.double()
        torch.testing.assert_close(recon, m64, atol=20 * tol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_svd_deterministic_and_signs_carried(dtype):
    s_true = 3.0 * torch.exp(-torch.arange(60, dtype=torch.float64) / 2)
    m = matrix_with_singular_values(80, 60, s_true).to(dtype)
    u1, s1, vh1 = ops.svd_topk(m, 6, seed=11)
    u2, s2, vh2 = ops.svd_topk(m, 6, seed=11)
    assert torch.equal(u1, u2)
    assert torch.equal(s1, s2)
    assert torch.equal(vh1, vh2)
    # the rank-k part is sign independent, so it matches the reference's
    ref_u, ref_s, ref_vh = reference.svd_topk_reference(m, 6)
    torch.testing.assert_close(
        (u1.double() * s1.double()) @ vh1.double(),
        (ref_u * ref_s) @ ref_vh,
        atol=20 * TOL[dtype] * 3.0,
        rtol=0,
    )
    assert_signs(u1)


def test_svd_size_one_and_vector_shapes():
    u, s, vh = ops.svd_topk(torch.tensor([[-3.0]]), 1)
    assert u.tolist() == [[1.0]]
    assert s.tolist() == [3.0]
    assert vh.tolist() == [[-1.0]]
    row = torch.arange(1.0, 6.0, dtype=torch.float64)[None, :]  # [1, 5]
    u, s, vh = ops.svd_topk(row, 1)
    torch.testing.assert_close(s, row.norm()[None])
    torch.testing.assert_close(vh, row / row.norm())
    u, s, vh = ops.svd_topk(np.asarray(row.T), 1)  # [5, 1], from NumPy
    torch.testing.assert_close(u, row.T / row.norm())


def test_svd_invalid_inputs():
    m = torch.ones(5, 3)
    for k in (0, 4):
        with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
            ops.svd_topk(m, k)
    with pytest.raises(ValueError, match="2-D"):
        ops.svd_topk(torch.ones(5), 1)
    with pytest.raises(ValueError, match="empty"):
        ops.svd_topk(torch.ones(0, 4), 1)
    with pytest.raises(TypeError, match="float32, float64"):
        ops.svd_topk(m.half(), 1)
    with pytest.raises(TypeError, match="n_iter must be an int"):
        ops.svd_topk(m, 1, n_iter=1.5)
    with pytest.raises(ValueError, match="unsupported device meta"):
        ops.svd_topk(torch.empty(4, 4, device="meta"), 2)


# -- CUDA against CPU ----------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    a = spd_with_spectrum(spectrum("outlier", 300), seed=4).to(dtype)
    cpu = ops.eigh_topk(a, 16, seed=5)
    gpu = ops.eigh_topk(a.cuda(), 16, seed=5)
    tol = TOL[dtype] * 1e4
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=tol, rtol=0)
    # An eigenvector is fixed only to about eps·λ_1 / (its gap to the nearest eigenvalue):
    # with λ_1 = 1e3 and gaps of 1e-3 near k = 16, fp32 fixes only the first few vectors.
    lam = spectrum("outlier", 300)[:17]
    gaps = torch.minimum((lam[:-1] - lam[1:]), torch.cat([lam[:1], lam[:-2] - lam[1:-1]]))[:16]
    allowed = torch.clamp(10 * torch.finfo(dtype).eps * lam[0] / gaps, min=200 * TOL[dtype])
    # the sign rule picks the largest entry's sign: where two entries nearly tie, vectors this
    # loosely fixed may come out with opposite signs
    g, c = gpu[1].cpu().double(), cpu[1].double()
    err = torch.minimum((g - c).norm(dim=0), (g + c).norm(dim=0))
    assert (err <= allowed).all(), (err / allowed).max()
    m = matrix_with_singular_values(140, 70, torch.exp(-torch.arange(70.0).double() / 2))
    cpu = ops.svd_topk(m.to(dtype), 5, seed=5)
    gpu = ops.svd_topk(m.to(dtype).cuda(), 5, seed=5)
    for g, c in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(g.cpu(), c, atol=200 * TOL[dtype], rtol=0)
