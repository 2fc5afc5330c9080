"""Streaming moments: the kernels against the float64 reference, and the Moments accumulator."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unlock_fast import ops, reference
from unlock_fast.stats import Moments

ACT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (n, dx, dy): odd sizes, a single row, a single column, unpaired (dy = 0), wide
SHAPES = [(1, 5, 3), (37, 19, 23), (64, 1, 1), (129, 33, 0), (200, 70, 45)]


def make_state(dx: int, dy: int, device: str) -> dict[str, torch.Tensor | None]:
    z = dict(dtype=torch.float32, device=device)
    return {
        "sum_x": torch.zeros(dx, **z),
        "sum_y": torch.zeros(dy, **z) if dy else None,
        "gram_xx": torch.zeros(dx, dx, **z),
        "gram_yy": torch.zeros(dy, dy, **z) if dy else None,
        "gram_xy": torch.zeros(dx, dy, **z) if dy else None,
    }


def accumulate(x, y, w, sx, sy, st, **kw) -> None:
    ops.moments_accumulate_(
        x, y, w, sx, sy, st["sum_x"], st["sum_y"], st["gram_xx"], st["gram_yy"], st["gram_xy"], **kw
    )


def check_against_reference(st, x, y, w, sx, sy) -> None:
    """The fp32 state must equal the float64 moments of the (exactly converted) shifted rows."""
    xs = x.double() - sx.double()
    ys = None if y is None else y.double() - sy.double()
    ref = reference.moments_reference(xs.cpu(), None if ys is None else ys.cpu(), w)
    for key, val in st.items():
        if val is None:
            continue
        want = ref[key]
        # fp32 accumulation: error grows with the number of rows and the size of the terms
        scale = float(want.abs().max()) + 1.0
        torch.testing.assert_close(val.double().cpu(), want, atol=2e-6 * scale, rtol=1e-5)


@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("weights", ["none", "random", "mask"])
def test_matches_reference(device, dtype, shape, weights):
    n, dx, dy = shape
    g = torch.Generator().manual_seed(n * 1000 + dx)
    x = (torch.randn(n, dx, generator=g) * 3 + 1).to(dtype)
    y = (torch.randn(n, dy, generator=g) - 2).to(dtype) if dy else None
    sx = torch.randn(dx, generator=g)
    sy = torch.randn(dy, generator=g) if dy else None
    w = {
        "none": None,
        "random": torch.rand(n, generator=g) * 2,
        "mask": (torch.rand(n, generator=g) > 0.3).float(),
    }[weights]
    st = make_state(dx, dy, device)
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    accumulate(on(x), on(y), on(w), on(sx), on(sy), st)
    check_against_reference(st, x, y, w, sx, sy)
    # the full Grams are symmetric, bit for bit
    assert torch.equal(st["gram_xx"], st["gram_xx"].T)


def test_accumulates_over_calls(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(90, 17, generator=g)
    y = torch.randn(90, 6, generator=g)
    sx, sy = torch.randn(17, generator=g), torch.randn(6, generator=g)
    st = make_state(17, 6, device)
    for lo, hi in [(0, 1), (1, 40), (40, 90)]:
        accumulate(x[lo:hi].to(device), y[lo:hi].to(device), None, sx.to(device), sy.to(device), st)
    check_against_reference(st, x, y, None, sx, sy)


def test_upper_only_leaves_lower_triangle(device):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(31, 9, generator=g).to(device)
    sx = torch.zeros(9, device=device)
    st = make_state(9, 0, device)
    st["gram_xx"].fill_(-7.0)
    accumulate(x, None, None, sx, None, st, upper_only=True)
    gxx = st["gram_xx"].cpu()
    lower = torch.tril(torch.ones(9, 9, dtype=torch.bool), -1)
    assert (gxx[lower] == -7.0).all()
    ref = (x.double().T @ x.double()).cpu() - 7.0
    torch.testing.assert_close(torch.triu(gxx).double(), torch.triu(ref), atol=1e-4, rtol=1e-5)


def test_strided_inputs_are_handled(device):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=g).to(device)
    x = base.T[:14, ::2]  # [14, 20], strides (1, 60): transposed and strided
    y = base[::3, 5:12]  # [14, 7], rows 90 elements apart
    assert not x.is_contiguous()
    assert not y.is_contiguous()
    sx = torch.zeros(x.shape[1], device=device)
    sy = torch.zeros(y.shape[1], device=device)
    w = torch.rand(40, generator=g).to(device)[::3][: y.shape[0]]  # strided weights too
    st = make_state(x.shape[1], y.shape[1], device)
    accumulate(x, y, w, sx, sy, st)
    check_against_reference(st, x.cpu(), y.cpu(), w.cpu(), sx.cpu(), sy.cpu())


def test_numpy_inputs_update_numpy_state():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((25, 6)).astype(np.float16)
    x.flags.writeable = False  # inputs may be read-only
    sx = np.zeros(6, np.float32)
    sum_x = np.zeros(6, np.float32)
    gxx = np.zeros((6, 6), np.float32)
    ops.moments_accumulate_(x, None, None, sx, None, sum_x, None, gxx, None, None)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(sum_x, xd.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gxx, xd.T @ xd, rtol=1e-5, atol=1e-4)


def test_zero_rows_is_a_no_op(device):
    st = make_state(4, 0, device)
    accumulate(torch.zeros(0, 4, device=device), None, None, torch.ones(4, device=device), None, st)
    assert float(st["gram_xx"].abs().sum()) == 0.0


def test_invalid_inputs_are_rejected():
    x = torch.randn(5, 4)
    sx = torch.zeros(4)
    st = make_state(4, 3, "cpu")
    st_x = make_state(4, 0, "cpu")
    y = torch.randn(5, 3)
    sy = torch.zeros(3)
    with pytest.raises(TypeError, match="x must have dtype"):
        accumulate(x.long(), None, None, sx, None, st_x)
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        accumulate(x.double(), None, None, sx, None, st_x)
    with pytest.raises(ValueError, match=r"x must have shape \[n, dx\], got \[20\]"):
        accumulate(x.reshape(-1), None, None, sx, None, st_x)
    with pytest.raises(ValueError, match=r"shift_x must have shape \[4\], got \[3\]"):
        accumulate(x, None, None, torch.zeros(3), None, st_x)
    with pytest.raises(ValueError, match=r"y must have shape \[5, dy\], got \[4, 3\]"):
        accumulate(x, y[:4], None, sx, sy, st)
    with pytest.raises(ValueError, match="y is given, so shift_y must be given too"):
        accumulate(x, y, None, sx, None, st)
    with pytest.raises(ValueError, match="y is None, so shift_y, sum_y, gram_yy, gram_xy"):
        accumulate(x, None, None, sx, sy, st)
    with pytest.raises(TypeError, match="gram_xx must have dtype float32, got torch.float64"):
        ops.moments_accumulate_(x, None, None, sx, None, st_x["sum_x"], None,
                                torch.zeros(4, 4, dtype=torch.float64), None, None)  # fmt: skip
    with pytest.raises(ValueError, match="gram_xx must be contiguous"):
        ops.moments_accumulate_(x, None, None, sx, None, st_x["sum_x"], None,
                                torch.zeros(4, 4).T, None, None)  # fmt: skip
    with pytest.raises(ValueError, match=r"weight must have shape \[5\]"):
        accumulate(x, None, torch.ones(4), sx, None, st_x)
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        accumulate(x, None, torch.ones(5, dtype=torch.long), sx, None, st_x)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, a NumPy array or a CuPy"):
        accumulate([[1.0] * 4], None, None, sx, None, st_x)
    frozen = np.zeros(4, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="sum_x is a read-only NumPy array"):
        ops.moments_accumulate_(x, None, None, sx, None, frozen, None, st_x["gram_xx"], None, None)
    with pytest.raises(ValueError, match="unsupported device meta"):
        accumulate(x.to("meta"), None, None, sx.to("meta"), None, make_state(4, 0, "meta"))
    with pytest.raises(ValueError, match="gram_xx is on meta, but the other inputs are on cpu"):
        ops.moments_accumulate_(x, None, None, sx, None, st_x["sum_x"], None,
                                torch.zeros(4, 4, device="meta"), None, None)  # fmt: skip


def test_negative_weights_rejected_before_any_change():
    x = torch.randn(5, 4)
    st = make_state(4, 0, "cpu")
    w = torch.tensor([1.0, 2.0, -0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"weight\[2\] = -0.5"):
        accumulate(x, None, w, torch.zeros(4), None, st)
    assert float(st["sum_x"].abs().sum()) == 0.0
    assert float(st["gram_xx"].abs().sum()) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_rejected_before_any_change(bad):
    x = torch.randn(5, 4)
    st = make_state(4, 0, "cpu")
    w = torch.tensor([1.0, 1.0, 1.0, bad, 1.0])
    with pytest.raises(ValueError, match=rf"finite and non-negative, got weight\[3\] = {bad}"):
        accumulate(x, None, w, torch.zeros(4), None, st)
    assert float(st["sum_x"].abs().sum()) == 0.0
    assert float(st["gram_xx"].abs().sum()) == 0.0


def test_x_without_columns_is_rejected_by_the_kernel():
    st = make_state(0, 0, "cpu")
    with pytest.raises(ValueError, match="moments: bad shape"):
        accumulate(torch.zeros(5, 0), None, None, torch.zeros(0), None, st)


# -- the CPU kernel's chunk loop and OpenMP branches (csrc/cpu/moments.cpp) -------------------
#
# The kernel fills an fp32 panel of at most CHUNK_FLOATS floats at a time, so a batch of more
# than CHUNK_FLOATS // (dx + dy + 1) rows takes several turns of its chunk loop. A panel fill
# of at least PARALLEL_FILL elements runs in an OpenMP loop, a smaller one on one thread;
# the lower triangle is mirrored in an OpenMP loop from PARALLEL_MIRROR columns on. Each test
# runs with the CPU backend set to 1 and to 2 threads (OpenMP and OpenBLAS).
#
# The data are exact: entries and shifts in {-1, 0, 1} and weights in {0, 1/4, 1, 4} make
# every panel value, product and partial sum an fp32 number with no rounding (multiples of
# 1/4 below 2**22), so the state must equal the float64 reference bit for bit, whatever the
# summation order; one row lost, repeated or weighted with another row's weight shows.

CHUNK_FLOATS = 1 << 22  # kChunkFloats
PARALLEL_FILL = 1 << 20  # kParallelFill
PARALLEL_MIRROR = 1024  # mirror_upper's threshold


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def kernel_threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Threads of the CPU backend for one test; the previous setting is restored after it."""
    core = ops.core.core_module()
    before = core.num_threads()
    core.set_num_threads(request.param)
    assert core.num_threads() == (request.param if core.openmp else 1)
    yield request.param
    core.set_num_threads(before)


def exact_rows(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(-1, 2, shape, generator=g, dtype=torch.float32)


def exact_weights(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.tensor([0.0, 0.25, 1.0, 4.0])[torch.randint(0, 4, (n,), generator=g)]


def check_exact(st, x, y, w, sx, sy) -> None:
    """The state equals the float64 moments of the shifted rows, bit for bit."""
    ref = reference.moments_reference(
        x.double() - sx.double(), None if y is None else y.double() - sy.double(), w
    )
    for key, val in st.items():
        if val is not None:
            assert torch.equal(val.double(), ref[key]), key


@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize(("dx", "dy"), [(63, 0), (40, 23)], ids=["x_only", "paired"])
def test_cpu_multi_chunk_matches_reference(kernel_threads, dtype, weighted, dx, dy):
    chunk = CHUNK_FLOATS // (dx + dy + 1)
    n = chunk + 77  # a full chunk, then 77 rows
    # the full chunk fills its panels in the OpenMP loop, the last one on one thread
    assert chunk * min(dx, dy or dx) >= PARALLEL_FILL > 77 * (dx + dy)
    g = torch.Generator().manual_seed(11 + dx + kernel_threads)
    x = exact_rows(g, n, dx)
    y = exact_rows(g, n, dy) if dy else None
    w = exact_weights(g, n) if weighted else None
    sx = exact_rows(g, dx)
    sy = exact_rows(g, dy) if dy else None
    st = make_state(dx, dy, "cpu")
    accumulate(x.to(dtype), None if y is None else y.to(dtype), w, sx, sy, st)
    check_exact(st, x, y, w, sx, sy)
    assert torch.equal(st["gram_xx"], st["gram_xx"].T)


@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_cpu_multi_chunk_strided_inputs(kernel_threads, dtype, weighted):
    dx, dy = 40, 23
    chunk = CHUNK_FLOATS // (dx + dy + 1)
    n = chunk + 500  # a full chunk (OpenMP fill, strided branch), then 500 rows
    assert chunk * dy >= PARALLEL_FILL
    g = torch.Generator().manual_seed(12 + kernel_threads)
    x = exact_rows(g, n, 2 * dx).to(dtype)[:, ::2]  # columns 2 elements apart
    y = exact_rows(g, dy, n).to(dtype).T  # [n, dy], columns n elements apart
    w = exact_weights(g, 3 * n)[::3] if weighted else None
    assert x.stride(1) == 2
    assert y.stride(1) == n
    sx, sy = exact_rows(g, dx), exact_rows(g, dy)
    st = make_state(dx, dy, "cpu")
    accumulate(x, y, w, sx, sy, st)
    check_exact(st, x.float(), y.float(), w, sx, sy)


@pytest.mark.parametrize("upper_only", [False, True], ids=["mirrored", "upper_only"])
@pytest.mark.parametrize(("dx", "dy"), [(1030, 0), (1025, 1100)], ids=["x_only", "paired"])
def test_cpu_wide_grams_mirror(kernel_threads, upper_only, dx, dy):
    # at least PARALLEL_MIRROR columns: the mirror of the lower triangle runs threaded
    assert min(dx, dy or dx) >= PARALLEL_MIRROR
    g = torch.Generator().manual_seed(13 + dx + kernel_threads)
    n = 6
    x = exact_rows(g, n, dx)
    y = exact_rows(g, n, dy) if dy else None
    w = exact_weights(g, n)
    sx = exact_rows(g, dx)
    sy = exact_rows(g, dy) if dy else None
    st = make_state(dx, dy, "cpu")
    for key in ("gram_xx", "gram_yy"):
        if st[key] is not None:
            st[key].fill_(-7.0)
    accumulate(x, y, w, sx, sy, st, upper_only=upper_only)
    ref = reference.moments_reference(
        x.double() - sx.double(), None if y is None else y.double() - sy.double(), w
    )
    for key in ("gram_xx", "gram_yy"):
        if st[key] is None:
            continue
        got, want = st[key].double(), ref[key] - 7.0
        if upper_only:  # the strictly lower triangle is left as it was
            lower = torch.tril(torch.ones_like(got, dtype=torch.bool), -1)
            assert (got[lower] == -7.0).all()
            got, want = torch.triu(got), torch.triu(want)
        assert torch.equal(got, want), key
    for key in ("sum_x", "sum_y", "gram_xy"):
        if st[key] is not None:
            assert torch.equal(st[key].double(), ref[key]), key


# -- the Moments accumulator -----------------------------------------------------------------


def reference_moments(x: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor | None):
    xd = x.double()
    wd = torch.ones(x.shape[0], dtype=torch.float64) if w is None else w.double()
    n = wd.sum()
    mx = (wd @ xd) / n
    out = {
        "mean_x": mx,
        "xx": (xd - mx).T @ (wd[:, None] * (xd - mx)),
        "xx_raw": xd.T @ (wd[:, None] * xd),
    }
    if y is not None:
        yd = y.double()
        my = (wd @ yd) / n
        out["mean_y"] = my
        out["yy"] = (yd - my).T @ (wd[:, None] * (yd - my))
        out["xy"] = (xd - mx).T @ (wd[:, None] * (yd - my))
        out["xy_raw"] = xd.T @ (wd[:, None] * yd)
    return out


@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_moments_mean_and_gram(device, dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(300, 24, generator=g) * 2 + 5).to(dtype)
    y = (torch.randn(300, 11, generator=g) - 3).to(dtype)
    w = torch.rand(300, generator=g)
    m = Moments(24, 11, device=device)
    for lo in range(0, 300, 70):
        m.update(x[lo : lo + 70].to(device), y[lo : lo + 70].to(device), w[lo : lo + 70])
    ref = reference_moments(x, y, w)
    assert m.rows == 300
    assert m.count == pytest.approx(float(w.sum()), rel=1e-6)
    tol = dict(atol=2e-3, rtol=1e-5)
    torch.testing.assert_close(m.mean("x").cpu(), ref["mean_x"], **tol)
    torch.testing.assert_close(m.mean("y").cpu(), ref["mean_y"], **tol)
    for which in ("xx", "yy", "xy"):
        got = m.gram(which, centered=True)
        assert got.dtype == torch.float64
        assert got.device == m.device
        # reading a Gram changes nothing, and the centred xx/yy Grams are symmetric bit for bit
        assert torch.equal(got, m.gram(which, centered=True))
        if which != "xy":
            assert torch.equal(got, got.T)
        torch.testing.assert_close(got.cpu(), ref[which], **tol)
    torch.testing.assert_close(m.gram("xx").cpu(), ref["xx_raw"], atol=1e-2, rtol=1e-5)
    torch.testing.assert_close(m.gram("xy").cpu(), ref["xy_raw"], atol=1e-2, rtol=1e-5)
    assert torch.equal(m.gram("xx"), m.gram("xx").T)


def test_large_mean_keeps_centered_covariance_accurate(device):
    """Mean 1e3, std 1: an unshifted fp32 Σxxᵀ would lose the covariance (~1e6 · 2⁻²⁴ · n)."""
    g = torch.Generator().manual_seed(6)
    n, d = 4000, 16
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 1e3
    x[:, 3] += 5e3  # an outlier dimension
    m = Moments(d, device=device)
    for lo in range(0, n, 500):
        m.update(x[lo : lo + 500].float().to(device))
    ref = reference_moments(x.float(), None, None)["xx"] / n
    cov = m.gram("xx", centered=True).cpu() / m.count
    err = (cov - ref).abs().max() / ref.diagonal().max()
    assert err < 1e-5, f"relative error {err:.2e}"


def test_merge_of_split_accumulators_equals_one_pass(device):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(240, 13, generator=g) * 4 + 100
    y = torch.randn(240, 9, generator=g) - 50
    w = torch.rand(240, generator=g)
    whole = Moments(13, 9, device=device)
    whole.update(x.to(device), y.to(device), w)
    # three parts with different shifts (each is set by its own first batch), one empty
    parts = [Moments(13, 9, device=device) for _ in range(4)]
    for part, (lo, hi) in zip(parts, [(0, 10), (10, 150), (150, 240)], strict=False):
        part.update(x[lo:hi].to(device), y[lo:hi].to(device), w[lo:hi])
    assert not torch.equal(parts[0].shift_x, parts[1].shift_x)
    merged = parts[3]  # start from the empty one
    for part in parts[:3]:
        assert merged.merge(part) is merged
    assert merged.rows == whole.rows
    assert merged.count == pytest.approx(whole.count)
    for which in ("xx", "yy", "xy"):
        for centered in (True, False):
            a, b = merged.gram(which, centered=centered), whole.gram(which, centered=centered)
            torch.testing.assert_close(a, b, atol=1e-3 * float(b.abs().max()) ** 0.5, rtol=1e-5)
    torch.testing.assert_close(merged.mean("y"), whole.mean("y"), atol=1e-4, rtol=1e-6)


def test_merge_rejects_other_dimensions():
    with pytest.raises(ValueError, match=r"cannot merge Moments\(4, None\) into Moments\(4, 2\)"):
        Moments(4, 2).merge(Moments(4))
    with pytest.raises(TypeError, match="can only merge another Moments"):
        Moments(4).merge(torch.zeros(4))


def test_state_dict_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(8)
    m = Moments(6, 5)
    m.update(torch.randn(50, 6, generator=g) + 3, torch.randn(50, 5, generator=g))
    state = m.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    assert scalars == {"dim_x": 6, "dim_y": 5, "count": 50.0, "rows": 50}
    save_file(tensors, tmp_path / "m.safetensors")
    back = Moments.from_state_dict({**scalars, **load_file(tmp_path / "m.safetensors")})
    for which in ("xx", "yy", "xy"):
        assert torch.equal(back.gram(which, centered=True), m.gram(which, centered=True))
    # an empty accumulator round-trips too, and stays empty
    empty = Moments.from_state_dict(Moments(3).state_dict())
    assert empty.rows == 0
    assert empty.shift_x is None
    with pytest.raises(ValueError, match="state is missing gram_xx"):
        Moments.from_state_dict({k: v for k, v in state.items() if k != "gram_xx"})
    with pytest.raises(ValueError, match=r"state\['sum_y'\] must be a tensor of shape \[5\]"):
        Moments.from_state_dict({**state, "sum_y": torch.zeros(4)})


def test_update_validates_and_accepts_numpy():
    m = Moments(3, 2)
    with pytest.raises(ValueError, match=r"x must be \[n, 3\], got \[4, 2\]"):
        m.update(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="y is required for a paired accumulator"):
        m.update(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="this accumulator has no y"):
        Moments(3).update(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"weight must be \[4\], got \[3\]"):
        m.update(torch.zeros(4, 3), torch.zeros(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match="no rows have been added"):
        m.mean("x")
    with pytest.raises(ValueError, match="dim_x must be a positive int"):
        Moments(0)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((20, 3)).astype(np.float32)
    y = rng.standard_normal((20, 2)).astype(np.float32)
    m.update(x, y, np.ones(20))  # float64 NumPy weights are converted
    ref = reference_moments(torch.from_numpy(x), torch.from_numpy(y), None)
    torch.testing.assert_close(m.gram("xy", centered=True), ref["xy"], atol=1e-5, rtol=1e-5)


# -- all_reduce over torch.distributed (gloo, two processes) -----------------------------------


def _all_reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(10)
        x = torch.randn(120, 7, generator=g) * 3 + 200
        y = torch.randn(120, 4, generator=g)
        m = Moments(7, 4)
        lo, hi = (0, 45) if rank == 0 else (45, 120)  # different sizes, so different shifts
        m.update(x[lo:hi], y[lo:hi])
        m.all_reduce()
        torch.save(
            {k: m.gram(k, centered=True) for k in ("xx", "yy", "xy")} | {"count": m.count},
            f"{out}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_gloo_equals_one_pass(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grams")
    mp.spawn(_all_reduce_worker, args=(2, port, out), nprocs=2, join=True)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(120, 7, generator=g) * 3 + 200
    y = torch.randn(120, 4, generator=g)
    ref = reference_moments(x, y, None)
    results = [torch.load(f"{out}.{r}") for r in range(2)]
    for res in results:
        assert res["count"] == 120
        for k in ("xx", "yy", "xy"):
            torch.testing.assert_close(res[k], ref[k], atol=5e-3, rtol=1e-5)
    for k in ("xx", "yy", "xy"):  # every process ends with the same statistics
        assert torch.equal(results[0][k], results[1][k])


def test_all_reduce_without_distributed_is_a_no_op():
    m = Moments(3).update(torch.randn(5, 3))
    before = m.gram("xx")
    assert m.all_reduce() is m
    assert torch.equal(m.gram("xx"), before)
