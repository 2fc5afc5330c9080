"""Per-row steering from persistent buffers (the serving engine's op): against the reference,
as a torch operator, inside torch.compile, and against steer_ on the same rows."""

from __future__ import annotations

import pytest
import torch

from unlock_fast import ops, reference
from unlock_fast.ops.steer import kernel_operands

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def buffers(n: int, m: int, k: int, layers: int, d: int, seed: int = 0):
    """Rows, residual, a key table and per-row buffers with every kind of row: none, each
    slot, both modes, an out-of-range slot (left alone), and rows past n (never read)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g) * 2
    hidden[:, 0] += 20
    residual = torch.randn(n, d, generator=g)
    table = torch.randn(k, layers, d, generator=g)
    slots = torch.full((m,), -1, dtype=torch.int32)
    alphas = torch.zeros(m, dtype=torch.float32)
    modes = torch.zeros(m, dtype=torch.uint8)
    for i in range(n):
        slots[i] = [-1, 0, 1, k - 1, k, -1][i % 6]
        alphas[i] = [0.0, 0.3, 1.7, 2.5, 0.4, 0.0][i % 6]
        modes[i] = i % 2
    slots[n:] = 0  # beyond the batch: must not be touched
    return hidden, residual, table, slots, alphas, modes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("d", [1, 7, 64, 133])
def test_equals_the_reference(dtype, with_residual, d, tolerances):
    h, res, table, slots, alphas, modes = buffers(13, 20, 3, 4, d)
    h, res = h.to(dtype), res.to(dtype) if with_residual else None
    want_h, want_res = reference.steer_tokens_reference(h, res, table, 2, slots, alphas, modes)
    got_h = h.clone()
    got_res = None if res is None else res.clone()
    ops.steer_tokens_(got_h, got_res, table, 2, slots, alphas, modes)
    torch.testing.assert_close(got_h, want_h, **tolerances[dtype])
    untouched = (slots[:13] < 0) | (slots[:13] >= 3)
    assert torch.equal(got_h[untouched], h[untouched])  # bit for bit
    if res is not None:
        assert want_res is not None
        assert torch.equal(got_res, want_res)
        assert bool((got_res[~untouched] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_as_steer_on_the_summed_stream(dtype):
    """Each steered row equals steer_ on hidden + residual with that row's key, alpha and mode
    (for add, the operands steer() hands the kernel): the engine and HF generate agree."""
    h, res, table, slots, alphas, modes = buffers(12, 12, 3, 2, 96, seed=4)
    h, res = h.to(dtype), res.to(dtype)
    got_h, got_res = h.clone(), res.clone()
    ops.steer_tokens_(got_h, got_res, table, 1, slots, alphas, modes)
    for i in range(12):
        if not 0 <= int(slots[i]) < 3:
            continue
        mode = "add" if int(modes[i]) else "rotate"
        vec, alpha = kernel_operands(table[int(slots[i]), 1], float(alphas[i]), mode)
        row = (h[i] + res[i])[None, None].clone()
        ops.steer_(row, vec, alpha, positions=torch.zeros(1, dtype=torch.long), mode=mode)
        assert torch.equal(got_h[i], row[0, 0]), (i, mode)


def test_bad_buffers_are_refused_and_nothing_changes():
    h, res, table, slots, alphas, modes = buffers(5, 8, 2, 3, 16)
    before = h.clone()
    cases = [
        ((h[None], res, table, 0, slots, alphas, modes), "hidden must have shape"),
        ((h, res[:, :8], table, 0, slots, alphas, modes), "residual must be like hidden"),
        ((h, res, table.double(), 0, slots, alphas, modes), "table must be float32"),
        ((h, res, table, 3, slots, alphas, modes), r"layer must lie in \[0, 3\)"),
        ((h, res, table, 0, slots.long(), alphas, modes), "slots must be"),
        ((h, res, table, 0, slots[:4], alphas, modes), "at least 5 rows"),
        ((h, res, table, 0, slots, alphas.double(), modes), "alphas must be"),
        ((h, res, table, 0, slots, alphas, modes.int()), "modes must be"),
        ((h.t(), None, table, 0, slots, alphas, modes), "hidden must have shape|contiguous"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            ops.steer_tokens_(*args)
    assert torch.equal(h, before)
    with pytest.raises(TypeError, match="hidden must have dtype"):
        ops.steer_tokens_(h.double(), None, table, 0, slots, alphas, modes)


@pytest.mark.parametrize("with_residual", [True, False])
def test_operator_passes_opcheck(with_residual):
    h, res, table, slots, alphas, modes = buffers(6, 9, 2, 2, 32)
    args = (h, res if with_residual else None, table, 1, slots, alphas, modes)
    torch.library.opcheck(torch.ops.unlock_fast.steer_tokens_, args)


def test_compiled_graph_reads_the_buffers_each_call():
    """One compiled function, buffers refilled in place between calls: each call steers what
    the buffers say then, with no recompilation and no graph break."""
    table = torch.randn(2, 1, 48)
    slots = torch.full((16,), -1, dtype=torch.int32)
    alphas = torch.zeros(16)
    modes = torch.zeros(16, dtype=torch.uint8)

    def block(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(x) * 3
        res = r + 1
        torch.ops.unlock_fast.steer_tokens_(h, res, table, 0, slots, alphas, modes)
        return h, res

    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(10, 48, generator=g), torch.randn(10, 48, generator=g)
    for fill in [[], [(3, 0, 0.5, 0)], [(0, 1, 2.0, 1), (9, 0, 0.1, 0)], []]:
        slots.fill_(-1)
        for row, slot, alpha, mode in fill:
            slots[row], alphas[row], modes[row] = slot, alpha, mode
        want = block(x, r)
        got = compiled(x, r)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1])
        if fill:
            assert not torch.allclose(want[0], torch.tanh(x) * 3)
