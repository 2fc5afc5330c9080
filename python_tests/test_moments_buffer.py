"""Row blocks in Moments: the same sums as updating on every call, fewer Gram updates.

Rows are drawn from {-1, 0, 1} and the first batch has 8 unweighted rows, so the shift is a
multiple of 1/8 and every sum is exact in fp32: buffered and unbuffered states must agree
bit for bit, whatever the order of the additions.
"""

from __future__ import annotations

import random

import pytest
import torch

from unlock_fast import ops
from unlock_fast.stats import DEFAULT_BUFFER_ROWS, Moments

DX, DY = 12, 7


def batches(seed: int, count: int, *, paired: bool, device: str):
    """(x, y, w) batches: sizes 1..40, fp32 or bf16 rows, with or without weights."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        n = 8 if i == 0 else rng.randint(1, 40)
        dtype = torch.float32 if i == 0 or rng.random() < 0.5 else torch.bfloat16
        x = torch.randint(-1, 2, (n, DX), generator=g).to(dtype)
        y = torch.randint(-1, 2, (n, DY), generator=g).to(dtype) if paired else None
        w = None
        if i > 0 and rng.random() < 0.4:
            w = torch.tensor([0.0, 0.25, 1.0, 4.0])[torch.randint(0, 4, (n,), generator=g)]
        yield (
            x.to(device),
            None if y is None else y.to(device),
            None if w is None else w.to(device),
        )


def assert_same_state(a: Moments, b: Moments, *, exact: bool = True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        if isinstance(v, torch.Tensor) and exact:
            assert torch.equal(v, sb[k]), k
        elif isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, sb[k], rtol=1e-5, atol=1e-5, msg=k)
        else:
            assert v == sb[k], k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_buffered_equals_unbuffered_bit_for_bit(device, dtype, paired, seed):
    dy = DY if paired else None
    held = Moments(DX, dy, device=device, dtype=dtype, buffer_rows=64)
    direct = Moments(DX, dy, device=device, dtype=dtype, buffer_rows=0)
    rng = random.Random(seed + 100)
    for x, y, w in batches(seed, 30, paired=paired, device=device):
        held.update(x, y, w)
        direct.update(x, y, w)
        assert (held.count, held.rows) == (direct.count, direct.rows)  # held rows counted
        if rng.random() < 0.15:  # a read part-way flushes the block
            assert torch.equal(held.gram("xx"), direct.gram("xx"))
    assert_same_state(held, direct)


def test_the_grams_are_updated_once_per_block(monkeypatch):
    calls: list[int] = []
    kernel = ops.moments_accumulate_

    def counting(x, *args, **kw):
        calls.append(int(x.shape[0]))
        kernel(x, *args, **kw)

    monkeypatch.setattr(ops, "moments_accumulate_", counting)
    g = torch.Generator().manual_seed(0)
    m = Moments(DX, DY, buffer_rows=64)
    for _ in range(100):
        m.update(torch.randn(8, DX, generator=g), torch.randn(8, DY, generator=g))
    assert calls == [64] * 12  # 800 rows: twelve full blocks, 32 rows still held
    assert m.rows == 800
    m.flush()
    assert calls == [64] * 12 + [32]
    m.update(torch.randn(100, DX, generator=g), torch.randn(100, DY, generator=g))
    assert calls[-1] == 100  # a batch as large as the block goes straight to the kernel

    calls.clear()
    m0 = Moments(DX, DY, buffer_rows=0)
    for _ in range(5):
        m0.update(torch.randn(8, DX, generator=g), torch.randn(8, DY, generator=g))
    assert calls == [8] * 5


def test_a_change_of_dtype_or_weighting_flushes_first(monkeypatch):
    calls: list[tuple[int, torch.dtype, bool]] = []
    kernel = ops.moments_accumulate_

    def counting(x, y, w, *args, **kw):
        calls.append((int(x.shape[0]), x.dtype, w is not None))
        kernel(x, y, w, *args, **kw)

    monkeypatch.setattr(ops, "moments_accumulate_", counting)
    m = Moments(DX, buffer_rows=64)
    m.update(torch.ones(3, DX))
    m.update(torch.ones(4, DX, dtype=torch.bfloat16))
    m.update(torch.ones(5, DX, dtype=torch.bfloat16), weight=torch.full((5,), 2.0))
    m.flush()
    assert calls == [
        (3, torch.float32, False),
        (4, torch.bfloat16, False),
        (5, torch.bfloat16, True),
    ]
    assert m.count == 3 + 4 + 10


def test_every_read_sees_the_held_rows():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, DX, generator=g), torch.randn(10, DY, generator=g)
    held = Moments(DX, DY, buffer_rows=1000)
    held.update(x[:8], y[:8])  # the first batch sets the shift; nothing reaches the Grams yet
    held.update(x[8:], y[8:])
    direct = Moments(DX, DY, buffer_rows=0).update(x[:8], y[:8]).update(x[8:], y[8:])
    reads = [
        lambda m: m.sum_x,
        lambda m: m.sum_y,
        lambda m: m.gram_xx_s,
        lambda m: m.gram_yy_s,
        lambda m: m.gram_xy_s,
        lambda m: m.mean("y"),
        lambda m: torch.tensor(m.trace("xx", centered=True)),
        lambda m: m.gram("xy", centered=True),
    ]
    for read in reads:
        fresh = Moments(DX, DY, buffer_rows=1000).update(x[:8], y[:8]).update(x[8:], y[8:])
        torch.testing.assert_close(read(fresh), read(direct), rtol=1e-6, atol=1e-6)
    assert_same_state(held, direct, exact=False)


def test_merge_flushes_both_and_leaves_the_other_equal():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, DX, generator=g), torch.randn(40, DY, generator=g)
    a = Moments(DX, DY, buffer_rows=64).update(x[:20], y[:20])
    b = Moments(DX, DY, buffer_rows=64).update(x[20:], y[20:])
    whole = Moments(DX, DY, buffer_rows=0).update(x, y)
    before = Moments(DX, DY, buffer_rows=0).update(x[20:], y[20:]).state_dict()
    a.merge(b)
    assert (a.rows, b.rows) == (40, 20)
    torch.testing.assert_close(
        a.gram("xy", centered=True), whole.gram("xy", centered=True), rtol=1e-5, atol=1e-5
    )
    for k, v in b.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-6)


def test_state_round_trip_with_held_rows():
    g = torch.Generator().manual_seed(3)
    m = Moments(DX, buffer_rows=64).update(torch.randn(5, DX, generator=g))
    back = Moments.from_state_dict(m.state_dict())
    assert back.rows == 5
    torch.testing.assert_close(back.gram("xx"), m.gram("xx"))


def test_the_default_block_and_bad_sizes():
    assert Moments(DX)._buffer.capacity == DEFAULT_BUFFER_ROWS
    for bad in (-1, True, 1.5, "64"):
        with pytest.raises(ValueError, match="buffer_rows"):
            Moments(DX, buffer_rows=bad)
