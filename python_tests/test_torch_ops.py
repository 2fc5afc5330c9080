"""The kernels as torch operators, the thin steering entry, and steering under torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from tiny_models import make_model
from transformers import DynamicCache

from unlock_fast import ModelInfo, SteeringKey, ops, reference, steer
from unlock_fast.ops.steer import STEER_MODES

pytestmark = pytest.mark.usefixtures("one_thread")

ACT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def hidden_states(b: int, s: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, s, d, generator=g) * 2
    h[..., 0] += 30.0
    return h.to(dtype)


def selection(kind: str, b: int, s: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if kind == "positions":
        return torch.tensor([s - 1, -1, 0, 2][:b]), None
    g = torch.Generator().manual_seed(3)
    return None, torch.rand(b, s, generator=g) > 0.5


# -- torch.library registration ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["positions", "mask"])
@pytest.mark.parametrize("mode", ["rotate", "add"])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_steer_op_passes_opcheck(dtype, kind, mode, per_row):
    b, s, d = 4, 6, 24
    h = hidden_states(b, s, d, dtype)
    vec = torch.randn(b, d) if per_row else torch.randn(d)
    pos, mask = selection(kind, b, s)
    torch.library.opcheck(torch.ops.unlock_fast.steer_, (h, vec, 0.3, pos, mask, mode))


@pytest.mark.parametrize("kind", ["positions", "mask"])
@pytest.mark.parametrize("mode", ["rotate", "add"])
def test_unchecked_op_passes_opcheck_and_writes_like_the_function(kind, mode):
    b, s, d = 4, 6, 24
    h = hidden_states(b, s, d, torch.bfloat16)
    vec = torch.randn(d)
    pos, mask = selection(kind, b, s)
    args = (vec, 0.3, STEER_MODES[mode], pos, mask)
    torch.library.opcheck(torch.ops.unlock_fast.steer_unchecked_, (h.clone(), *args))
    got = h.clone()
    assert ops.steer_unchecked_op(got, *args) is None
    assert torch.equal(got, ops.steer_unchecked_(h.clone(), *args))


def test_steer_op_writes_like_the_function():
    h = hidden_states(3, 5, 16, torch.bfloat16)
    vec = torch.randn(16)
    pos = torch.tensor([4, -1, 1])
    want = ops.steer_(h.clone(), vec, 0.4, positions=pos)
    got = h.clone()
    assert torch.ops.unlock_fast.steer_(got, vec, 0.4, pos, None, "rotate") is None
    assert torch.equal(got, want)
    schema = str(torch.ops.unlock_fast.steer_.default._schema)
    assert "Tensor(a0!) hidden" in schema
    assert "Tensor vector" in schema  # only hidden is written


def test_steer_op_keeps_the_checks():
    h = hidden_states(2, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="positions must lie in"):
        torch.ops.unlock_fast.steer_(h, torch.randn(8), 0.1, torch.tensor([3, 0]), None, "add")
    with pytest.raises(ValueError, match="mode must be 'rotate' or 'add'"):
        torch.ops.unlock_fast.steer_(h, torch.randn(8), 0.1, torch.tensor([1, 0]), None, "x")


@pytest.mark.parametrize("with_y", [False, True], ids=["x_only", "x_and_y"])
@pytest.mark.parametrize("weighted", [False, True])
def test_moments_op_passes_opcheck(with_y, weighted):
    n, dx, dy = 7, 5, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dx, generator=g).bfloat16()
    y = torch.randn(n, dy, generator=g) if with_y else None
    w = torch.rand(n, generator=g) if weighted else None
    state = (
        torch.zeros(dx),
        torch.zeros(dy) if with_y else None,
        torch.zeros(dx, dx),
        torch.zeros(dy, dy) if with_y else None,
        torch.zeros(dx, dy) if with_y else None,
    )
    shifts = (torch.randn(dx, generator=g), torch.randn(dy, generator=g) if with_y else None)
    args = (x, y, w, shifts[0], shifts[1], *state)
    torch.library.opcheck(torch.ops.unlock_fast.moments_accumulate_, args)
    want = [t.clone() if t is not None else None for t in state]
    ops.moments_accumulate_(x, y, w, shifts[0], shifts[1], *want)
    got = [t.clone() if t is not None else None for t in state]
    torch.ops.unlock_fast.moments_accumulate_(x, y, w, shifts[0], shifts[1], *got)
    for a, e in zip(got, want, strict=True):
        assert (a is None and e is None) or torch.equal(a, e)


# -- the thin entry the hooks call ---------------------------------------------------------


@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("kind", ["positions", "mask"])
@pytest.mark.parametrize("mode", ["rotate", "add"])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_unchecked_entry_equals_public_path_and_reference(dtype, kind, mode, per_row, tolerances):
    b, s, d = 4, 7, 67
    h = hidden_states(b, s, d, dtype, seed=1)
    vec = torch.randn(b, d) if per_row else torch.randn(d)
    pos, mask = selection(kind, b, s)
    public = ops.steer_(h.clone(), vec, 0.3, positions=pos, mask=mask, mode=mode)
    lean = h.clone()
    out = ops.steer_unchecked_(lean, vec, 0.3, STEER_MODES[mode], pos, mask)
    assert out is lean
    assert torch.equal(lean, public)  # bit for bit: the same kernel call
    ref = reference.steer_reference(h, vec, 0.3, positions=pos, mask=mask, mode=mode)
    torch.testing.assert_close(lean.float(), ref.float(), **tolerances[dtype])


def test_unchecked_entry_still_refuses_bad_hidden():
    vec, pos = torch.randn(8), torch.tensor([0, 1])
    code = STEER_MODES["rotate"]
    with pytest.raises(TypeError, match="hidden must have dtype float32, float16, bfloat16"):
        ops.steer_unchecked_(torch.zeros(2, 3, 8, dtype=torch.float64), vec, 0.1, code, pos, None)
    with pytest.raises(ValueError, match=r"hidden must have shape \[B, S, d\]"):
        ops.steer_unchecked_(torch.zeros(2, 8), vec, 0.1, code, pos, None)
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        ops.steer_unchecked_(torch.zeros(2, 8, 3).transpose(1, 2), vec, 0.1, code, pos, None)
    with pytest.raises(ValueError, match="at least one feature"):
        ops.steer_unchecked_(torch.zeros(2, 3, 0), vec, 0.1, code, pos, None)
    with pytest.raises(ValueError, match="positions must lie in"):  # the core checks the range
        ops.steer_unchecked_(torch.zeros(2, 3, 8), vec, 0.1, code, torch.tensor([3, 0]), None)
    with pytest.raises(ValueError, match="exactly one of positions or mask"):
        ops.steer_unchecked_(torch.zeros(2, 3, 8), vec, 0.1, code, None, None)


# -- hooks: the lean path and torch.compile ------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = make_model("llama", 64)
    info = ModelInfo.of(model)
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(info.num_layers, info.hidden_size, generator=g)
    key = SteeringKey(vectors, list(range(info.num_layers)), info)
    ids = torch.randint(4, 64, (2, 7), generator=g)
    am = torch.ones_like(ids)
    am[1, :2] = 0
    return model, key, ids, am


def forward(model, ids, am):
    return model(input_ids=ids, attention_mask=am, use_cache=False).logits


@pytest.mark.parametrize("positions", ["last_prompt", "prompt", "all"])
@pytest.mark.parametrize("mode", ["rotate", "add"])
def test_hooks_match_the_reference_rule(tiny, positions, mode):
    """Steering with the lean hook path equals steering each layer output with the reference."""
    model, key, ids, am = tiny
    blocks = model.model.layers
    real = am.bool()
    last = (real.long() * torch.arange(ids.shape[1])).argmax(dim=1)
    captured: list[torch.Tensor] = []

    def reference_hook(i):
        def hook(_m, _a, out):
            h = out[0] if isinstance(out, tuple) else out
            vec = key.vectors[i]
            if positions == "last_prompt":
                new = reference.steer_reference(h, vec, 0.3, positions=last, mode=mode)
            else:
                new = reference.steer_reference(h, vec, 0.3, mask=real, mode=mode)
            captured.append(new)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return hook

    with torch.no_grad():
        handles = [b.register_forward_hook(reference_hook(i)) for i, b in enumerate(blocks)]
        try:
            want = forward(model, ids, am)
        finally:
            for hd in handles:
                hd.remove()
        with steer(model, key, alpha=0.3, mode=mode, positions=positions):
            got = forward(model, ids, am)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hook_refuses_an_unsupported_hidden_dtype(tiny):
    _, key, ids, am = tiny
    model64 = make_model("llama", 64).double()
    with (
        torch.no_grad(),
        steer(model64, key.vectors.double(), alpha=0.3),
        pytest.raises(TypeError, match="hidden must have dtype float32, float16, bfloat16"),
    ):
        forward(model64, ids, am)


def graph_breaks(fn, *args) -> tuple[int, int]:
    dynamo.reset()
    e = dynamo.explain(fn)(*args)
    return e.graph_count, e.graph_break_count


@pytest.mark.parametrize("positions", ["last_prompt", "all"])
def test_steered_model_compiles_without_graph_breaks(tiny, positions):
    model, key, ids, am = tiny
    with torch.no_grad():
        plain = graph_breaks(forward, model, ids, am)
        with steer(model, key, alpha=0.3, positions=positions):
            steered = graph_breaks(forward, model, ids, am)
    assert plain == (1, 0)
    assert steered == (1, 0)


def test_compiled_steered_forward_matches_eager(tiny):
    model, key, ids, am = tiny
    with torch.no_grad(), steer(model, key, alpha=0.3, positions="last_prompt"):
        want = forward(model, ids, am)
        dynamo.reset()
        compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
        got = compiled(model, ids, am)
        again = compiled(model, ids, am)  # the tracker state across compiled calls
    plain = forward(model, ids, am).detach()
    assert not torch.allclose(want, plain)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_compiled_decoding_steps_match_eager(tiny):
    model, key, ids, am = tiny
    nxt = torch.tensor([[5], [9]])
    am2 = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], dim=1)

    def step(ids, am, cache):
        return model(input_ids=ids, attention_mask=am, cache=cache, use_cache=True).logits

    with torch.no_grad(), steer(model, key, alpha=0.3, positions="generated"):
        cache = DynamicCache()
        step(ids, am, cache)
        want = step(nxt, am2, cache)
        dynamo.reset()
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        cache = DynamicCache()
        compiled(ids, am, cache)
        got = compiled(nxt, am2, cache)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_forward_refuses_an_empty_row(tiny):
    model, key, ids, am = tiny
    empty = am.clone()
    empty[0] = 0
    with torch.no_grad(), steer(model, key, alpha=0.3):
        dynamo.reset()
        compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
        with pytest.raises(RuntimeError, match="no real token"):
            compiled(model, ids, empty)
