"""Seeded property tests of every kernel against ``unlock_fast.reference``.

Hypothesis draws shapes (size-1 dims included), dtypes, memory layouts (transposed, sliced,
expanded), weights, masks and positions (-1 included); the tensor values come from a drawn
seed. Each layout is either handled (the result matches the reference) or refused with
ValueError and nothing written, as the op documents. Derandomized, so every run tries the
same examples.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unlock_fast import ops, reference

pytestmark = pytest.mark.usefixtures("one_thread")

ACT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32 math in the kernels; a 16-bit result is off by about one rounding of its dtype.
STEER_TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 1e-2},
}
RSVD_TOL = {torch.float32: 2e-4, torch.float64: 1e-9}


def properties(examples: int) -> Callable:
    """Seeded settings: the same examples every run, no deadline (first calls load BLAS)."""
    return settings(derandomize=True, max_examples=examples, deadline=None, database=None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def layout(base: torch.Tensor, kind: str) -> torch.Tensor:
    """A view of ``base``'s values [r, c] in another memory layout (values unchanged)."""
    r, c = base.shape
    if kind == "transposed":
        return base.T.contiguous().T
    if kind == "row_slice":
        wide = torch.zeros(2 * r, c, dtype=base.dtype, device=base.device)
        wide[::2] = base
        return wide[::2]
    if kind == "col_slice":
        wide = torch.zeros(r, 2 * c, dtype=base.dtype, device=base.device)
        wide[:, ::2] = base
        return wide[:, ::2]
    return base


# -- moments_accumulate_ ------------------------------------------------------------------------

MOMENT_LAYOUTS = ["contiguous", "transposed", "row_slice", "col_slice", "expanded"]


@properties(150)
@given(
    n=st.integers(0, 40),
    dx=st.integers(1, 24),
    dy=st.integers(0, 12),
    dtype=st.sampled_from(ACT_DTYPES),
    x_layout=st.sampled_from(MOMENT_LAYOUTS),
    y_layout=st.sampled_from(MOMENT_LAYOUTS),
    weights=st.sampled_from(["none", "random", "mask"]),
    upper_only=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_moments_match_reference(
    device, n, dx, dy, dtype, x_layout, y_layout, weights, upper_only, seed
):
    g = gen(seed)
    x = (torch.randn(n, dx, generator=g) * 3 + 1).to(dtype)
    y = (torch.randn(n, dy, generator=g) - 2).to(dtype) if dy else None
    if x_layout == "expanded" and n:  # every row the same memory: fine for an input
        x = x[:1].expand(n, dx)
    if y is not None and y_layout == "expanded" and n:
        y = y[:1].expand(n, dy)
    sx = torch.randn(dx, generator=g)
    sy = torch.randn(dy, generator=g) if dy else None
    w = {
        "none": None,
        "random": torch.rand(n, generator=g) * 2,
        "mask": (torch.rand(n, generator=g) > 0.4).float(),
    }[weights]
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    xv = layout(on(x), x_layout) if x_layout != "expanded" else on(x)
    yv = None if y is None else layout(on(y), y_layout) if y_layout != "expanded" else on(y)
    z = {"dtype": torch.float32, "device": device}
    state = {
        "sum_x": torch.zeros(dx, **z),
        "sum_y": torch.zeros(dy, **z) if dy else None,
        "gram_xx": torch.zeros(dx, dx, **z),
        "gram_yy": torch.zeros(dy, dy, **z) if dy else None,
        "gram_xy": torch.zeros(dx, dy, **z) if dy else None,
    }
    ops.moments_accumulate_(
        xv, yv, on(w), on(sx), on(sy), state["sum_x"], state["sum_y"],
        state["gram_xx"], state["gram_yy"], state["gram_xy"], upper_only=upper_only,
    )  # fmt: skip
    xs = x.double() - sx.double()
    ys = None if y is None or sy is None else y.double() - sy.double()
    ref = reference.moments_reference(xs, ys, w)
    for key, got in state.items():
        if got is None:
            continue
        want = ref[key]
        got = got.cpu().double()
        if upper_only and key in ("gram_xx", "gram_yy"):
            got, want = got.triu(), want.triu()
        scale = float(want.abs().max()) + 1.0 if want.numel() else 1.0
        torch.testing.assert_close(got, want, atol=2e-6 * scale * max(n, 1) ** 0.5, rtol=1e-5)


# -- eigh_topk / svd_topk -----------------------------------------------------------------------

RSVD_LAYOUTS = ["contiguous", "transposed", "row_slice", "col_slice"]


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


def assert_sign_rule(vectors: torch.Tensor) -> None:
    """The kernel's own output follows reference.fix_signs exactly (the largest entry of each
    column positive, the lowest index on ties)."""
    assert torch.equal(reference.fix_signs(vectors), vectors)


def assert_same_up_to_sign(got: torch.Tensor, want: torch.Tensor, tol: float) -> torch.Tensor:
    """Columns equal up to one sign each (signs can differ only where two entries of a column
    have nearly the same magnitude); returns the signs."""
    signs = torch.sign((got * want).sum(0))
    signs[signs == 0] = 1
    torch.testing.assert_close(got * signs, want, atol=tol, rtol=0)
    return signs


@properties(100)
@given(
    d=st.integers(1, 24),
    k_frac=st.floats(0, 1),
    oversample=st.integers(0, 12),
    n_iter=st.integers(0, 4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    kind=st.sampled_from(RSVD_LAYOUTS),
    seed=st.integers(0, 2**31 - 1),
)
def test_eigh_topk_matches_reference(device, d, k_frac, oversample, n_iter, dtype, kind, seed):
    k = 1 + int(k_frac * (d - 1))
    g = gen(seed)
    # Exact rank <= the sketch width and well separated eigenvalues: the range finder then
    # captures the top k exactly, so every path (sketch or dense) must agree with the reference.
    rank = min(d, k + oversample)
    lam = torch.linspace(10.0, 1.0, rank, dtype=torch.float64)
    o = orthonormal(d, rank, g)
    a = (o * lam) @ o.T
    a = ((a + a.T) / 2).to(dtype)
    want_w, want_v = reference.eigh_topk_reference(a, k)
    w, v = ops.eigh_topk(
        layout(a.to(device), kind), k, oversample=oversample, n_iter=n_iter, seed=seed
    )
    assert w.dtype == dtype
    assert v.shape == (d, k)
    tol = RSVD_TOL[dtype] * 10
    torch.testing.assert_close(w.cpu().double(), want_w, atol=tol, rtol=0)
    assert_sign_rule(v.cpu())
    assert_same_up_to_sign(v.cpu().double(), want_v, RSVD_TOL[dtype])


@properties(100)
@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 20),
    k_frac=st.floats(0, 1),
    oversample=st.integers(0, 10),
    n_iter=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    kind=st.sampled_from(RSVD_LAYOUTS),
    seed=st.integers(0, 2**31 - 1),
)
def test_svd_topk_matches_reference(
    device, rows, cols, k_frac, oversample, n_iter, dtype, kind, seed
):
    r = min(rows, cols)
    k = 1 + int(k_frac * (r - 1))
    g = gen(seed)
    rank = min(r, k + oversample)
    s = torch.linspace(10.0, 1.0, rank, dtype=torch.float64)
    m = ((orthonormal(rows, rank, g) * s) @ orthonormal(cols, rank, g).T).to(dtype)
    want_u, want_s, want_vh = reference.svd_topk_reference(m, k)
    u, sv, vh = ops.svd_topk(
        layout(m.to(device), kind), k, oversample=oversample, n_iter=n_iter, seed=seed
    )
    assert (u.shape, sv.shape, vh.shape) == ((rows, k), (k,), (k, cols))
    tol = RSVD_TOL[dtype]
    torch.testing.assert_close(sv.cpu().double(), want_s, atol=tol * 10, rtol=0)
    u, vh = u.cpu().double(), vh.cpu().double()
    assert_sign_rule(u.to(dtype))
    signs = assert_same_up_to_sign(u, want_u, tol)
    # Vh rows carry the sign of their U column
    torch.testing.assert_close(vh * signs[:, None], want_vh, atol=tol, rtol=0)


# -- steer_ -------------------------------------------------------------------------------------

HIDDEN_LAYOUTS = ["contiguous", "seq_slice", "batch_major", "padded_rows", "expanded"]


def hidden_view(base: torch.Tensor, kind: str) -> torch.Tensor:
    """``base``'s values [B, S, d] in another layout; "expanded" aliases rows (refused)."""
    b, s, d = base.shape
    if kind == "seq_slice":  # every other sequence row of a longer buffer
        wide = torch.zeros(b, 2 * s, d, dtype=base.dtype, device=base.device)
        wide[:, ::2] = base
        return wide[:, ::2]
    if kind == "batch_major":  # [S, B, d] in memory
        return base.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "padded_rows":  # rows of d + 3 elements, last dim still contiguous
        wide = torch.zeros(b, s, d + 3, dtype=base.dtype, device=base.device)
        wide[..., :d] = base
        return wide[..., :d]
    if kind == "expanded":
        return base[:1].expand(b, s, d) if b > 1 else base[:, :1].expand(b, s, d)
    return base


def selected_rows(positions: torch.Tensor | None, mask: torch.Tensor | None, s: int):
    if mask is not None:
        return mask
    assert positions is not None
    sel = torch.zeros(positions.shape[0], s, dtype=torch.bool)
    rows = torch.nonzero(positions >= 0).squeeze(1)
    sel[rows, positions[rows]] = True
    return sel


@properties(250)
@given(
    b=st.integers(1, 4),
    s=st.integers(1, 6),
    d=st.integers(1, 40),
    dtype=st.sampled_from(ACT_DTYPES),
    mode=st.sampled_from(["rotate", "add"]),
    per_row=st.booleans(),
    select=st.sampled_from(["positions", "mask"]),
    kind=st.sampled_from(HIDDEN_LAYOUTS),
    alpha=st.floats(-3, 3, allow_nan=False),
    zero_rows=st.booleans(),
    zero_vector=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_steer_matches_reference(
    device, b, s, d, dtype, mode, per_row, select, kind, alpha, zero_rows, zero_vector, seed
):
    g = gen(seed)
    base = (torch.randn(b, s, d, generator=g) * 2).to(dtype)
    if zero_rows:
        base[torch.rand(b, s, generator=g) < 0.3] = 0
    vec = torch.zeros(b, d) if zero_vector else torch.randn(b, d, generator=g)
    if not per_row:
        vec = vec[0]
    positions = mask = None
    if select == "positions":
        positions = torch.randint(-1, s, (b,), generator=g)
        if per_row and b > 1:  # a non-contiguous positions tensor
            positions = torch.stack([positions, positions], 1)[:, 0]
    else:
        mask = torch.rand(s, b, generator=g).T > 0.5  # non-contiguous mask

    hidden = hidden_view(base.to(device), kind)
    before = hidden.clone()
    sel = {"positions": None if positions is None else positions.to(device),
           "mask": None if mask is None else mask.to(device)}  # fmt: skip
    overlapping = kind == "expanded" and (b > 1 or s > 1)
    if overlapping:
        with pytest.raises(ValueError, match="hidden is written in place, but its memory"):
            ops.steer_(hidden, vec.to(device), alpha, mode=mode, **sel)
        assert torch.equal(hidden, before)
        return
    ref = reference.steer_reference(base, vec, alpha, positions=positions, mask=mask, mode=mode)
    out = ops.steer_(hidden, vec.to(device), alpha, mode=mode, **sel)
    assert out is hidden
    chosen = selected_rows(positions, mask, s)
    got = hidden.cpu()
    # Where h/|h| + alpha·r/|r| cancels (d = 1, alpha = ±1), the rotated direction is
    # undefined and its sign follows rounding: compare the well-posed rows only.
    posed = chosen & ~_cancelling(base, vec, alpha) if mode == "rotate" else chosen
    torch.testing.assert_close(got[posed].float(), ref[posed].float(), **STEER_TOL[dtype])
    assert torch.equal(got[~chosen], before.cpu()[~chosen])


def _cancelling(base: torch.Tensor, vec: torch.Tensor, alpha: float) -> torch.Tensor:
    """[B, S]: rows where the rotation's sum h/|h| + alpha·r/|r| is nearly zero."""
    h = base.double()
    r = vec.double().expand(h.shape[0], h.shape[2])[:, None, :]
    unit_h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    unit_r = r / r.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return (unit_h + alpha * unit_r).norm(dim=-1) < 1e-3


@properties(50)
@given(
    b=st.integers(1, 4),
    s=st.integers(1, 6),
    bad=st.sampled_from(["low", "high"]),
    at=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_steer_out_of_range_positions_raise_and_change_nothing(b, s, bad, at, seed):
    """CPU: a position outside [-1, S) raises before any row changes (CUDA: see
    test_ops_boundary, checked before the launch)."""
    g = gen(seed)
    hidden = torch.randn(b, s, 8, generator=g)
    before = hidden.clone()
    positions = torch.randint(-1, s, (b,), generator=g)
    positions[at % b] = -2 - at if bad == "low" else s + at
    with pytest.raises(ValueError, match=r"positions must lie in \[-1, "):
        ops.steer_(hidden, torch.randn(8, generator=g), 0.5, positions=positions)
    assert torch.equal(hidden, before)
