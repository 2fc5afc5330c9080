"""The kernel boundary: what ``ops`` and the raw ``_core`` entry points refuse, and how.

Overlapping or zero-width buffers, non-finite alpha or matrices, and sizes or strides that
would take a raw entry point out of bounds are refused with ValueError before any memory is
touched; out-of-range positions are an error on every backend; a failing cuBLAS/cuSOLVER
call names itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from unlock_fast import ops

pytestmark = pytest.mark.usefixtures("one_thread")

core = ops.core.core_module()
CSRC = Path(__file__).resolve().parents[1] / "csrc"
F32 = ops.core.DTYPE_CODES[torch.float32]


# -- steer_ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(1, 4, 8).expand(3, 4, 8),  # batch rows share memory
        lambda: torch.randn(2, 1, 8).expand(2, 5, 8),  # sequence rows share memory
        lambda: torch.randn(64).as_strided((2, 3, 8), (24, 4, 1)),  # rows half overlap
        lambda: torch.randn(64).as_strided((3, 2, 8), (4, 30, 1)),  # batch inside a row
    ],
    ids=["expand_batch", "expand_seq", "half_overlap", "interleaved"],
)
@pytest.mark.parametrize("select", ["positions", "mask"])
def test_steer_refuses_hidden_that_overlaps_itself(make, select):
    hidden = make()
    b, s, d = hidden.shape
    storage = hidden.as_strided((hidden.untyped_storage().nbytes() // 4,), (1,), 0)
    before = storage.clone()
    sel = (
        {"positions": torch.zeros(b, dtype=torch.long)}
        if select == "positions"
        else {"mask": torch.ones(b, s, dtype=torch.bool)}
    )
    with pytest.raises(ValueError, match=r"hidden is written in place, but its memory overlaps"):
        ops.steer_(hidden, torch.randn(d), 0.5, **sel)
    assert torch.equal(storage, before)


def test_steer_accepts_views_whose_rows_are_disjoint():
    base = torch.randn(3, 4, 10)
    for view in (base[:, ::2], base[..., :6], base.transpose(0, 1), base[:1].expand(1, 4, 10)):
        ops.steer_(view, torch.randn(view.shape[-1]), 0.1, positions=torch.zeros(view.shape[0],
                   dtype=torch.long))  # fmt: skip


def test_steer_refuses_zero_width_hidden():
    with pytest.raises(ValueError, match=r"hidden must have at least one feature \(d >= 1\)"):
        ops.steer_(torch.zeros(2, 3, 0), torch.zeros(0), 0.5, positions=torch.zeros(2).long())
    # an empty batch or sequence is still a no-op
    for shape in ((0, 3, 4), (2, 0, 4)):
        h = torch.zeros(shape)
        assert ops.steer_(h, torch.ones(4), 0.5, mask=torch.ones(shape[:2], dtype=torch.bool)) is h


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_steer_refuses_non_finite_alpha(alpha):
    h = torch.randn(2, 3, 8)
    before = h.clone()
    with pytest.raises(ValueError, match="alpha must be finite, got"):
        ops.steer_(h, torch.randn(8), alpha, positions=torch.tensor([0, 2]))
    assert torch.equal(h, before)


def test_steer_refuses_a_vector_inside_hidden():
    h = torch.randn(2, 3, 8)
    before = h.clone()
    with pytest.raises(ValueError, match="steer: hidden overlaps vector in memory"):
        ops.steer_(h, h[1, 2], 0.5, positions=torch.tensor([0, 1]))
    assert torch.equal(h, before)


# -- moments_accumulate_ --------------------------------------------------------------------------


def _state(dx: int, dy: int) -> dict[str, torch.Tensor | None]:
    return {
        "sum_x": torch.zeros(dx),
        "sum_y": torch.zeros(dy) if dy else None,
        "gram_xx": torch.zeros(dx, dx),
        "gram_yy": torch.zeros(dy, dy) if dy else None,
        "gram_xy": torch.zeros(dx, dy) if dy else None,
    }


def _accumulate(x, y, st, shift_x=None, shift_y=None) -> None:
    dx = x.shape[1]
    sx = torch.zeros(dx) if shift_x is None else shift_x
    sy = None if y is None else torch.zeros(y.shape[1]) if shift_y is None else shift_y
    ops.moments_accumulate_(x, y, None, sx, sy, st["sum_x"], st["sum_y"], st["gram_xx"],
                            st["gram_yy"], st["gram_xy"])  # fmt: skip


def test_moments_refuse_zero_width_inputs():
    with pytest.raises(ValueError, match=r"x must have at least one column \(dx >= 1\)"):
        _accumulate(torch.zeros(0, 0), None, _state(0, 0))
    empty_y = {"sum_y": torch.zeros(0), "gram_yy": torch.zeros(0, 0), "gram_xy": torch.zeros(2, 0)}
    with pytest.raises(ValueError, match=r"y must have at least one column \(dy >= 1\)"):
        _accumulate(torch.zeros(3, 2), torch.zeros(3, 0), _state(2, 0) | empty_y)


def test_moments_refuse_state_that_overlaps():
    x = torch.randn(6, 4)
    st = _state(4, 4)
    st["gram_xy"] = st["gram_xx"]  # the same buffer written twice
    with pytest.raises(ValueError, match="moments: gram_xy and gram_xx overlap in memory"):
        _accumulate(x, torch.randn(6, 4), st)
    st = _state(4, 0)
    st["sum_x"] = st["gram_xx"][0]  # a view into another state tensor
    with pytest.raises(ValueError, match="moments: gram_xx and sum_x overlap in memory"):
        _accumulate(x, None, st)
    st = _state(4, 0)
    with pytest.raises(ValueError, match="moments: gram_xx overlaps x in memory"):
        _accumulate(st["gram_xx"], None, st)
    st = _state(4, 0)
    with pytest.raises(ValueError, match="moments: sum_x overlaps shift_x in memory"):
        _accumulate(x, None, st, shift_x=st["sum_x"])
    assert float(st["gram_xx"].abs().sum()) == 0.0


def test_moments_read_an_expanded_input():
    """Reading aliased rows is fine: only what the op writes must not overlap."""
    row = torch.randn(1, 5)
    st = _state(5, 0)
    _accumulate(row.expand(7, 5), None, st)
    torch.testing.assert_close(st["gram_xx"], 7 * row.T @ row, rtol=1e-5, atol=1e-5)


# -- eigh_topk / svd_topk -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigensolver_and_svd_refuse_non_finite_input(device, bad, dtype):
    a = torch.eye(6, dtype=dtype, device=device)
    a[2, 3] = bad
    with pytest.raises(ValueError, match=r"a must be finite, but 1 of its 36 entries are NaN"):
        ops.eigh_topk(a, 2)
    m = torch.ones(5, 3, dtype=dtype, device=device)
    m[4, 0] = bad
    m[0, 2] = bad
    with pytest.raises(ValueError, match=r"m must be finite, but 2 of its 15 entries are NaN"):
        ops.svd_topk(m.T, 2)


# -- the raw entry points -------------------------------------------------------------------------


def _steer_raw(h: torch.Tensor, vec: torch.Tensor, **over: int) -> None:
    b, s, d = h.shape
    args = {
        "hidden": h.data_ptr(), "dtype": F32, "batch": b, "seq": s, "dim": d,
        "stride_b": h.stride(0), "stride_s": h.stride(1), "positions": 0, "mask": 0,
        "mask_stride_b": 0, "mask_stride_s": 0, "vector": vec.data_ptr(),
        "vector_stride_b": 0, "alpha": 0.5, "mode": 0,
    }  # fmt: skip
    args.update(over)
    core.steer_cpu(*args.values())


STEER_BAD = [
    ({"batch": -1}, r"steer: bad shape: hidden must be \[B, S, d\]"),
    ({"dim": 0}, r"steer: bad shape"),
    ({"stride_s": -4}, "steer: hidden: negative stride -4"),
    ({"stride_s": 3}, r"steer: the rows of hidden \[2, 3, 4\] with strides \[12, 3, 1\] overlap"),
    ({"stride_b": 0}, "overlap in memory, so one element would be steered more than once"),
    ({"batch": 3, "stride_b": 2**62}, "steer: hidden: sizes and strides overflow int64"),
    ({"vector_stride_b": 2}, r"vector_stride_b must be 0 \(one shared vector\) or >= d = 4"),
    ({"mask_stride_b": -1}, "steer: mask: negative stride -1"),
    ({"mode": 2}, "mode code must be 0"),
    ({"dtype": 3}, "hidden must be float32, float16 or bfloat16, got float64"),
    ({"dtype": 9}, "unknown dtype code 9"),
    ({"positions": 0, "mask": 0}, "give exactly one of positions or mask"),
]


@pytest.mark.parametrize(("over", "msg"), STEER_BAD, ids=[str(o) for o, _ in STEER_BAD])
def test_raw_steer_refuses_inconsistent_sizes(over, msg):
    h = torch.randn(2, 3, 4)
    before = h.clone()
    mask = torch.ones(2, 3, dtype=torch.bool)
    sel = {} if "positions" in over else {"mask": mask.data_ptr(), "mask_stride_b": 3,
                                          "mask_stride_s": 1}  # fmt: skip
    with pytest.raises(ValueError, match=msg):
        _steer_raw(h, torch.randn(4), **(sel | over))
    assert torch.equal(h, before)


def test_raw_steer_positions_out_of_range_raise_before_writing():
    h = torch.randn(3, 5, 4)
    before = h.clone()
    pos = torch.tensor([0, 5, -1])
    with pytest.raises(ValueError, match=r"positions must lie in \[-1, 5\), got positions\[1\]"):
        _steer_raw(h, torch.randn(4), positions=pos.data_ptr())
    assert torch.equal(h, before)


def _moments_raw(x: torch.Tensor, st: dict[str, torch.Tensor], **over: int) -> None:
    n, dx = x.shape
    shift = torch.zeros(dx)
    args = {
        "n": n, "dx": dx, "dy": 0, "x": x.data_ptr(), "x_dtype": F32, "x_s0": x.stride(0),
        "x_s1": x.stride(1), "y": 0, "y_dtype": F32, "y_s0": 0, "y_s1": 0, "weight": 0,
        "weight_stride": 0, "shift_x": shift.data_ptr(), "shift_y": 0,
        "sum_x": st["sum_x"].data_ptr(), "sum_y": 0, "gram_xx": st["gram_xx"].data_ptr(),
        "gram_yy": 0, "gram_xy": 0, "upper_only": False,
    }  # fmt: skip
    args.update(over)
    core.moments_accumulate_cpu(**args)


MOMENTS_BAD = [
    ({"n": -1}, "moments: bad shape: need n >= 0, dx >= 1 and dy >= 0, got n = -1"),
    ({"dx": 0}, "moments: bad shape"),
    ({"dx": 2**40}, "dx and dy must fit 32-bit BLAS sizes"),
    ({"x_s0": -3}, "moments: x: negative stride -3"),
    ({"x_s1": 2**62}, "moments: x: sizes and strides overflow int64"),
    ({"weight_stride": -1, "weight": 1}, "moments: weight: negative stride -1"),
    ({"dy": 2}, "moments: y needs shift_y, sum_y, gram_yy and gram_xy"),
    ({"x_dtype": 7}, "unknown dtype code 7"),
]


@pytest.mark.parametrize(("over", "msg"), MOMENTS_BAD, ids=[str(o) for o, _ in MOMENTS_BAD])
def test_raw_moments_refuse_inconsistent_sizes(over, msg):
    x = torch.randn(5, 3)
    st = {"sum_x": torch.zeros(3), "gram_xx": torch.zeros(3, 3)}
    if "weight" in over:
        over = over | {"weight": torch.ones(5).data_ptr()}
    with pytest.raises(ValueError, match=msg):
        _moments_raw(x, st, **over)
    assert float(st["gram_xx"].abs().sum()) == 0.0


def test_raw_moments_refuse_overlapping_state():
    x = torch.randn(5, 3)
    gram = torch.zeros(3, 3)
    st = {"sum_x": gram[1], "gram_xx": gram}
    with pytest.raises(ValueError, match="moments: gram_xx and sum_x overlap in memory"):
        _moments_raw(x, st)


def test_raw_rsvd_plan_and_checks_do_not_overflow():
    big = 2**63 - 1
    assert core.rsvd_plan(True, 10, 10, 2, big, 4, 0, False) == (10, True)
    assert core.rsvd_plan(True, 10, 10, 2, 3, big, 0, False)[0] == 5
    # min(k + oversample, d) once overflowed int64 (undefined behaviour, a negative width)
    values, _ = ops.eigh_topk(torch.diag(torch.arange(6.0)), 2, oversample=big)
    torch.testing.assert_close(values, torch.tensor([5.0, 4.0]))
    with pytest.raises(ValueError, match="too large for 32-bit LAPACK"):
        core.rsvd_plan(False, 2**40, 2**40, 1, 0, 0, 0, False)
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\], got 5"):
        core.rsvd_eigh_workspace_cpu(4, 5, 0, 0, F32, 0)
    a, values, vectors = torch.eye(4), torch.empty(2), torch.empty(4, 2)
    need = core.rsvd_eigh_workspace_cpu(4, 2, 0, 0, F32, 0)
    work = torch.empty(need, dtype=torch.uint8)

    def eigh(a_ptr: int, values_ptr: int, vectors_ptr: int, nbytes: int = need) -> None:
        core.rsvd_eigh_cpu(a_ptr, 4, 2, 0, 0, 0, F32, 0, values_ptr, vectors_ptr,
                           work.data_ptr(), nbytes)  # fmt: skip

    with pytest.raises(ValueError, match="workspace too small"):
        eigh(a.data_ptr(), values.data_ptr(), vectors.data_ptr(), need - 1)
    with pytest.raises(ValueError, match="eigh_topk: vectors and values overlap in memory"):
        eigh(a.data_ptr(), vectors.data_ptr(), vectors.data_ptr())
    with pytest.raises(ValueError, match="eigh_topk: vectors overlaps a in memory"):
        eigh(a.data_ptr(), values.data_ptr(), a.data_ptr())
    eigh(a.data_ptr(), values.data_ptr(), vectors.data_ptr())
    torch.testing.assert_close(values, torch.ones(2))


# -- CUDA: positions out of range, library status codes -------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.backends()["cuda"]), reason="needs a GPU build"
)
def test_cuda_positions_out_of_range_are_a_value_error_and_the_context_survives():
    """Checked before the launch: a ValueError, nothing changed, and the CUDA context stays
    usable (a device-side assertion would poison it for the whole process); the kernel
    itself leaves such a row alone."""
    h = torch.randn(2, 3, 8, device="cuda")
    before = h.clone()
    with pytest.raises(ValueError, match=r"positions must lie in \[-1, 3\)"):
        ops.steer_(h, torch.randn(8, device="cuda"), 0.5,
                   positions=torch.tensor([0, 3], device="cuda"))  # fmt: skip
    assert torch.equal(h, before)
    pos = torch.tensor([0, 3], device="cuda")
    ops.steer_unchecked_(h, torch.randn(8, device="cuda"), 0.5, 0, pos, None)
    torch.cuda.synchronize()
    assert torch.equal(h[1], before[1])  # the row with the bad position is left alone
    assert not torch.equal(h[0, 0], before[0, 0])


@pytest.mark.skipif(not (CSRC / "cuda").is_dir(), reason="needs the C++ sources")
def test_every_cublas_and_cusolver_call_is_checked_by_name():
    """Each library call goes through UNLOCK_CUBLAS / UNLOCK_CUSOLVER, which raise naming the
    function and its status; a bare call would drop the status."""
    call = re.compile(r"\b((?:cublas|cusolverDn)[A-Z]\w*)\s*\(")
    checked = re.compile(r"UNLOCK_CU(?:BLAS|SOLVER)\(\s*((?:cublas|cusolverDn)\w+)\s*,")
    names: set[str] = set()
    for path in sorted((CSRC / "cuda").glob("*.cu")):
        text = path.read_text()
        bare = [m.group(1) for m in call.finditer(text)]
        assert not bare, f"{path.name}: unchecked library calls {bare}"
        names.update(checked.findall(text))
    # the checked calls include the products and the dense solvers of both dtypes
    assert {"cublasSgemm", "cublasDgemm", "cusolverDnSsyevd", "cusolverDnDgesvd"} <= names
