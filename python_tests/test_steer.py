"""Fused in-place residual steering against the reference rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unlock_fast import ops, reference

ACT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_hidden(b: int, s: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, s, d, generator=g) * 2
    h[..., 0] += 30.0  # a large-magnitude dimension, as residual streams have
    return h.to(dtype)


def assert_steered(out, ref, before, selected, tol):
    """Selected rows match the reference; every other row is untouched bit for bit."""
    out, ref, before = out.cpu(), ref.cpu(), before.cpu()
    sel = selected.cpu()
    torch.testing.assert_close(out[sel].float(), ref[sel].float(), **tol)
    assert torch.equal(out[~sel], before[~sel])


def positions_mask(pos: torch.Tensor, s: int) -> torch.Tensor:
    mask = torch.zeros(pos.shape[0], s, dtype=torch.bool)
    rows = torch.nonzero(pos >= 0).squeeze(1)
    mask[rows, pos[rows]] = True
    return mask


@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("mode", ["rotate", "add"])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("d", [1, 7, 64, 2051])
def test_positions_match_reference(device, dtype, mode, per_row, d, tolerances):
    b, s = 5, 9
    h = make_hidden(b, s, d, dtype, seed=d)
    g = torch.Generator().manual_seed(1)
    vec = torch.randn(b, d, generator=g) if per_row else torch.randn(d, generator=g)
    pos = torch.tensor([8, -1, 0, 4, 8])
    ref = reference.steer_reference(h, vec, 0.3, positions=pos, mode=mode)
    before = h.clone()
    hd = h.to(device)
    out = ops.steer_(hd, vec.to(device), 0.3, positions=pos.to(device), mode=mode)
    assert out is hd
    assert_steered(hd, ref, before, positions_mask(pos, s), tolerances[dtype])


@pytest.mark.parametrize("padding", ["left", "right"])
def test_last_real_token_of_padded_batches(device, padding, tolerances):
    """Positions from the attention mask, whichever side the padding is on."""
    b, s, d = 4, 11, 96
    lengths = torch.tensor([11, 3, 7, 1])
    attn = torch.zeros(b, s, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        if padding == "right":
            attn[i, :n] = 1
        else:
            attn[i, s - n :] = 1
    # last index where the mask is 1, on either side
    pos = (attn * torch.arange(s)).argmax(dim=1)
    expected = lengths - 1 if padding == "right" else torch.full((b,), s - 1)
    assert torch.equal(pos, expected)
    h = make_hidden(b, s, d, torch.bfloat16, seed=3)
    vec = torch.randn(d)
    ref = reference.steer_reference(h, vec, 0.5, positions=pos)
    before = h.clone()
    hd = h.to(device)
    ops.steer_(hd, vec.to(device), 0.5, positions=pos.to(device))
    assert_steered(hd, ref, before, positions_mask(pos, s), tolerances[torch.bfloat16])


@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("mode", ["rotate", "add"])
def test_mask_matches_reference(device, dtype, mode, tolerances):
    b, s, d = 3, 13, 130
    h = make_hidden(b, s, d, dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(b, s, generator=g) > 0.6
    mask[2] = False  # a row with nothing selected
    vec = torch.randn(b, d, generator=g)
    ref = reference.steer_reference(h, vec, 0.2, mask=mask, mode=mode)
    before = h.clone()
    hd = h.to(device)
    ops.steer_(hd, vec.to(device), 0.2, mask=mask.to(device), mode=mode)
    assert_steered(hd, ref, before, mask, tolerances[dtype])


def test_rotate_keeps_norm_and_turns_towards_vector(device):
    h = make_hidden(2, 3, 256, torch.float32, seed=6).to(device)
    vec = torch.randn(256, device=device)
    pos = torch.tensor([1, 2], device=device)
    rows = h[torch.arange(2), pos].clone()
    ops.steer_(h, vec, 0.5, positions=pos)
    new = h[torch.arange(2), pos]
    torch.testing.assert_close(new.norm(dim=-1), rows.norm(dim=-1), rtol=1e-6, atol=0)
    cos = lambda a: torch.nn.functional.cosine_similarity(a, vec[None], dim=-1)  # noqa: E731
    assert (cos(new) > cos(rows)).all()
    # alpha = 0 leaves the direction alone
    again = h.clone()
    ops.steer_(again, vec, 0.0, positions=pos)
    torch.testing.assert_close(again, h, rtol=1e-6, atol=1e-5)


def test_rotate_with_cancelling_terms(device):
    """alpha = 1 and r = -h: h/|h| + r/|r| nearly vanishes; the result still follows the rule."""
    d = 512
    g = torch.Generator().manual_seed(7)
    row = torch.randn(d, generator=g)
    vec = -row + 1e-3 * torch.randn(d, generator=g)
    h = row.reshape(1, 1, d).clone()
    ref = reference.steer_reference(h.double(), vec.double(), 1.0, positions=torch.tensor([0]))
    hd = h.to(device)
    ops.steer_(hd, vec.to(device), 1.0, positions=torch.tensor([0], device=device))
    torch.testing.assert_close(hd.cpu().double(), ref, rtol=0, atol=2e-3 * float(row.norm()))
    torch.testing.assert_close(hd.norm().cpu(), row.norm(), rtol=1e-5, atol=0)


def test_zero_rows_and_zero_vector(device):
    h = torch.zeros(2, 2, 8, device=device)
    h[1, 1, 0] = 1.0
    ops.steer_(h, torch.zeros(8, device=device), 0.5, positions=torch.tensor([0, 1], device=device))
    assert torch.equal(h[0, 0], torch.zeros(8, device=device))  # zero row stays zero
    assert torch.equal(h[1, 1], torch.eye(8, device=device)[0])  # zero vector: no turn


def test_strided_hidden_is_handled(device, tolerances):
    base = make_hidden(3, 10, 48, torch.float16, seed=8).to(device)
    view = base[:, ::2]  # [3, 5, 48], last dim contiguous
    assert not view.is_contiguous()
    vec = torch.randn(48, device=device)
    pos = torch.tensor([4, 0, 2], device=device)
    ref = reference.steer_reference(view, vec, 0.2, positions=pos)
    before = base.clone()
    ops.steer_(view, vec, 0.2, positions=pos)
    torch.testing.assert_close(view.float(), ref.float(), **tolerances[torch.float16])
    assert torch.equal(base[:, 1::2], before[:, 1::2])  # the rows between are untouched


def test_non_contiguous_positions_mask_and_vector(device, tolerances):
    h = make_hidden(4, 6, 40, torch.float32, seed=9).to(device)
    vec = torch.randn(40, 8, device=device).T[:4]  # [4, 40] with a non-unit last stride
    pos = torch.tensor([5, 0, 5, 0, 1, 3, 2, 2], device=device)[::2]
    mask = torch.ones(6, 4, dtype=torch.bool, device=device).T
    for sel in ({"positions": pos}, {"mask": mask}):
        ref = reference.steer_reference(h, vec, 0.1, **sel)
        out = h.clone()
        ops.steer_(out, vec, 0.1, **sel)
        torch.testing.assert_close(out, ref, **tolerances[torch.float32])


def test_numpy_hidden_in_place(tolerances):
    rng = np.random.default_rng(10)
    h = rng.standard_normal((2, 4, 33)).astype(np.float16)
    vec = rng.standard_normal(33).astype(np.float32)
    pos = np.array([3, -1])
    ref = reference.steer_reference(torch.from_numpy(h.copy()), torch.from_numpy(vec), 0.2,
                                    positions=torch.from_numpy(pos))  # fmt: skip
    out = ops.steer_(h, vec, 0.2, positions=pos)
    assert out is h
    torch.testing.assert_close(
        torch.from_numpy(h).float(), ref.float(), **tolerances[torch.float16]
    )


def test_vector_dtypes_and_int32_positions(tolerances):
    h = make_hidden(2, 3, 16, torch.bfloat16, seed=11)
    vec = torch.randn(16)
    pos = torch.tensor([2, 1], dtype=torch.int32)
    ref = reference.steer_reference(h, vec.bfloat16(), 0.3, positions=pos.long())
    ops.steer_(h, vec.bfloat16(), 0.3, positions=pos)
    torch.testing.assert_close(h.float(), ref.float(), **tolerances[torch.bfloat16])


def test_invalid_inputs_leave_hidden_unchanged():
    h = make_hidden(2, 5, 8, torch.float32)
    before = h.clone()
    vec = torch.randn(8)
    pos = torch.tensor([1, 4])
    cases = [
        (ValueError, r"positions must lie in \[-1, 5\), got positions\[1\] = 5",
         dict(positions=torch.tensor([1, 5]))),
        (ValueError, r"got positions\[0\] = -2", dict(positions=torch.tensor([-2, 0]))),
        (ValueError, "exactly one of positions or mask", dict()),
        (ValueError, "exactly one of positions or mask",
         dict(positions=pos, mask=torch.ones(2, 5, dtype=torch.bool))),
        (TypeError, "positions must have dtype int64, got torch.float32",
         dict(positions=pos.float())),
        (ValueError, r"positions must have shape \[2\], got \[3\]",
         dict(positions=torch.tensor([0, 1, 2]))),
        (TypeError, "mask must have dtype bool", dict(mask=torch.ones(2, 5))),
        (ValueError, r"mask must have shape \[2, 5\], got \[5, 2\]",
         dict(mask=torch.ones(5, 2, dtype=torch.bool))),
        (ValueError, "mode must be 'rotate' or 'add', got 'turn'",
         dict(positions=pos, mode="turn")),
    ]  # fmt: skip
    for exc, msg, kw in cases:
        with pytest.raises(exc, match=msg):
            ops.steer_(h, vec, 0.2, **kw)
    with pytest.raises(ValueError, match=r"vector must have shape \[8\] or \[2, 8\], got \[7\]"):
        ops.steer_(h, torch.randn(7), 0.2, positions=pos)
    with pytest.raises(TypeError, match="vector must be a floating-point tensor"):
        ops.steer_(h, torch.ones(8, dtype=torch.long), 0.2, positions=pos)
    with pytest.raises(TypeError, match="alpha must be a real number, got str"):
        ops.steer_(h, vec, "0.2", positions=pos)
    with pytest.raises(TypeError, match="hidden must have dtype float32, float16, bfloat16"):
        ops.steer_(h.double(), vec, 0.2, positions=pos)
    with pytest.raises(ValueError, match=r"hidden must have shape \[B, S, d\], got \[10, 8\]"):
        ops.steer_(h.reshape(10, 8), vec, 0.2, positions=pos)
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        ops.steer_(h.transpose(1, 2).contiguous().transpose(1, 2), vec, 0.2, positions=pos)
    with pytest.raises(ValueError, match="unsupported device meta"):
        ops.steer_(h.to("meta"), vec.to("meta"), 0.2, positions=pos.to("meta"))
    with pytest.raises(ValueError, match="vector is on meta, but hidden is on cpu"):
        ops.steer_(h, vec.to("meta"), 0.2, positions=pos)
    with pytest.raises(ValueError, match="hidden requires grad"):
        ops.steer_(h.clone().requires_grad_(), vec, 0.2, positions=pos)
    frozen = h.numpy().copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only NumPy array"):
        ops.steer_(frozen, vec, 0.2, positions=pos)
    assert torch.equal(h, before)


def test_requires_grad_is_fine_without_grad_mode():
    h = make_hidden(1, 2, 8, torch.float32).requires_grad_()
    with torch.no_grad():
        ops.steer_(h, torch.randn(8), 0.2, positions=torch.tensor([1]))
    assert h.requires_grad


@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_non_finite_values_follow_the_reference(device, dtype):
    h = make_hidden(2, 2, 40, dtype, seed=12)
    h[0, 1, 5] = float("nan")
    h[1, 0, 7] = float("inf")
    vec = torch.randn(40)
    for mode in ("rotate", "add"):
        for pos in ([1, 0], [0, 1]):
            p = torch.tensor(pos)
            ref = reference.steer_reference(h, vec, 0.3, positions=p, mode=mode)
            out = h.clone().to(device)
            ops.steer_(out, vec.to(device), 0.3, positions=p.to(device), mode=mode)
            out = out.cpu()
            assert torch.equal(out.isnan(), ref.isnan()), (mode, pos)
            assert torch.equal(out.isinf(), ref.isinf()), (mode, pos)
            finite = ref.isfinite()
            torch.testing.assert_close(
                out[finite].float(), ref[finite].float(), atol=1e-2, rtol=1e-2
            )
