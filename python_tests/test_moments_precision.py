"""Tensor-core precisions of the moments update (CUDA only): "tf32" and "half".

On the GPU each is compared with the float64 formula at the tolerance its rounding allows;
everywhere, the choices are checked and refused where they cannot run.
"""

from __future__ import annotations

import pytest
import torch

from unlock_fast import ops, reference
from unlock_fast.ops.core import core_module
from unlock_fast.stats import Moments

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Largest error relative to the largest entry: tf32 products keep 10 mantissa bits, a half
# panel rounds each shifted value to 8 (bf16) or 11 (fp16) bits; the sums are fp32.
TOLERANCE = {"fp32": 2e-6, "tf32": 2e-3, "half": 8e-3}


def test_unknown_precision_is_refused():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'tf32', 'half'\)"):
        ops.moments_accumulate_(
            x, None, None, torch.zeros(3), None, torch.zeros(3), None, torch.zeros(3, 3), None,
            None, precision="bf16",
        )  # fmt: skip
    with pytest.raises(ValueError, match="precision must be one of"):
        Moments(3, precision="TF32")


@pytest.mark.parametrize("precision", ["tf32", "half"])
def test_tensor_core_precisions_need_cuda(precision):
    x, state = torch.randn(4, 3), (torch.zeros(3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ops.moments_accumulate_(
            x, None, None, torch.zeros(3), None, state[0], None, state[1], None, None,
            precision=precision,
        )  # fmt: skip
    assert not state[1].any()  # nothing written
    with pytest.raises(ValueError, match="for fp32 sums on a CUDA device"):
        Moments(3, precision=precision)
    with pytest.raises(ValueError, match="for fp32 sums on a CUDA device"):
        Moments(3, device="cuda", dtype=torch.float64, precision=precision)


def test_the_compiled_core_refuses_them_on_the_cpu():
    x, shift, s, g = torch.randn(4, 3), torch.zeros(3), torch.zeros(3), torch.zeros(3, 3)
    args = [4, 3, 0, x.data_ptr(), 0, 3, 1, 0, 0, 0, 0, 0, 0, shift.data_ptr(), 0]
    args += [s.data_ptr(), 0, g.data_ptr(), 0, 0, False]
    with pytest.raises(ValueError, match="need the CUDA backend"):
        core_module().moments_accumulate_cpu(*args, 1)
    with pytest.raises(ValueError, match="precision code must be 0"):
        core_module().moments_accumulate_cpu(*args, 7)
    assert not g.any()


def _run(precision, dtype, paired, weighted, upper_only):
    n, dx, dy = 1000, 96, 72
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, dx, generator=gen) + 3).to(dtype)
    y = (torch.randn(n, dy, generator=gen) - 2).to(dtype) if paired else None
    w = torch.rand(n, generator=gen) * 2 if weighted else None
    sx = torch.full((dx,), 3.0)
    sy = torch.full((dy,), -2.0) if paired else None
    z = torch.zeros
    st = [z(dx), z(dy) if paired else None, z(dx, dx), z(dy, dy) if paired else None]
    st.append(z(dx, dy) if paired else None)
    dev = [None if t is None else t.cuda() for t in (x, y, w, sx, sy, *st)]
    ops.moments_accumulate_(*dev, upper_only=upper_only, precision=precision)
    ref = reference.moments_reference(
        x.double() - sx.double(), None if y is None else y.double() - sy.double(), w
    )
    names = ["sum_x", "sum_y", "gram_xx", "gram_yy", "gram_xy"]
    for name, got in zip(names, dev[5:], strict=True):
        if got is None:
            continue
        got, want = got.double().cpu(), ref[name]
        if upper_only and name in ("gram_xx", "gram_yy"):
            got, want = torch.triu(got), torch.triu(want)
        err = float((got - want).abs().max() / want.abs().max())
        assert err < TOLERANCE[precision], (name, err)
        if not upper_only and name in ("gram_xx", "gram_yy"):
            assert torch.equal(got, got.T), name


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "tf32", "half"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("upper_only", [False, True])
def test_precisions_match_the_formula_on_cuda(precision, dtype, paired, weighted, upper_only):
    _run(precision, dtype, paired, weighted, upper_only)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["tf32", "half"])
def test_moments_accumulator_with_a_tensor_core_precision(precision):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(3000, 64, generator=gen) + 5).bfloat16().cuda()
    y = torch.randn(3000, 48, generator=gen).bfloat16().cuda()
    fast = Moments(64, 48, device="cuda", precision=precision, buffer_rows=512)
    exact = Moments(64, 48, device="cuda")
    for i in range(0, 3000, 24):
        fast.update(x[i : i + 24], y[i : i + 24])
        exact.update(x[i : i + 24], y[i : i + 24])
    for which in ("xx", "yy", "xy"):
        a, b = fast.gram(which, centered=True), exact.gram(which, centered=True)
        assert float((a - b).abs().max() / b.abs().max()) < TOLERANCE[precision], which
