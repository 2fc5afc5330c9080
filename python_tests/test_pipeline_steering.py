"""Steering hooks: where they act, what they compute, and that they leave no trace."""

from __future__ import annotations

import pytest
import torch
from tiny_models import PROMPTS, bpe_tokenizer, make_model, word_tokenizer
from transformers import DynamicCache

from unlock_fast import ModelInfo, SteeringKey, steer
from unlock_fast.capture import last_positions, layer_output
from unlock_fast.layers import decoder_layers
from unlock_fast.reference import steer_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def random_key(model, seed=0, layers=None) -> SteeringKey:
    info = ModelInfo.of(model)
    layers = list(range(info.num_layers)) if layers is None else layers
    g = torch.Generator().manual_seed(seed)
    return SteeringKey(torch.randn(len(layers), info.hidden_size, generator=g), layers, info)


def hooks_left(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def layer_out(model, layer, **inputs):
    """Output of decoder layer ``layer`` (after any steering hook) and the logits."""
    seen = []
    h = decoder_layers(model)[layer].register_forward_hook(
        lambda _m, _a, o: seen.append(layer_output(o).clone())
    )
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        h.remove()
    return seen[0], logits


def batch(tok, prompts):
    return dict(tok(prompts, return_tensors="pt", padding=True))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("positions", ["last_prompt", "prompt", "all", "generated"])
@pytest.mark.parametrize("mode", ["rotate", "add"])
def test_prefill_steers_exactly_the_right_positions(arch, side, positions, mode):
    tok = word_tokenizer(side)
    model = make_model(arch, len(tok))
    key = random_key(model)
    inputs = batch(tok, PROMPTS[:4])
    before, _ = layer_out(model, 1, **inputs)
    with steer(model, key, alpha=0.3, mode=mode, positions=positions, layers=[1]):
        after, _ = layer_out(model, 1, **inputs)
    mask = inputs["attention_mask"]
    if positions == "last_prompt":
        want = steer_reference(
            before, key.vector(1), 0.3, positions=last_positions(mask), mode=mode
        )
    elif positions == "generated":  # prefill is not touched
        want = before
    else:
        want = steer_reference(before, key.vector(1), 0.3, mask=mask.bool(), mode=mode)
    changed = (after != before).any(-1)
    assert torch.equal(changed, (want != before).any(-1))
    torch.testing.assert_close(after, want, atol=1e-5, rtol=1e-5)
    if positions == "last_prompt":
        assert changed.sum() == 4
        assert not changed[mask == 0].any()
    assert hooks_left(model) == 0


def _prefill_then_step(model, tok, prompts, steering=None, keep_for_step=True):
    """Prefill (optionally steered), then one decoding step; returns both logits."""
    inputs = batch(tok, prompts)
    cache = DynamicCache()
    handle = steering() if steering else None
    try:
        with torch.no_grad():
            out = model(**inputs, past_key_values=cache, use_cache=True)
            if handle is not None and not keep_for_step:
                handle.remove()
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
            step = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
    finally:
        if handle is not None:
            handle.remove()
    return out.logits, step.logits


def test_decoding_steps_are_steered_only_when_asked():
    tok = word_tokenizer("left")
    model = make_model("llama", len(tok))
    key = random_key(model)
    prompts = PROMPTS[:3]
    base_pre, base_step = _prefill_then_step(model, tok, prompts)
    # last_prompt: the decoding step runs unsteered on the steered cache
    a_pre, a_step = _prefill_then_step(model, tok, prompts, lambda: steer(model, key, 0.5))
    b_pre, b_step = _prefill_then_step(
        model, tok, prompts, lambda: steer(model, key, 0.5), keep_for_step=False
    )
    assert not torch.equal(a_pre, base_pre)
    assert torch.equal(a_pre, b_pre)
    assert torch.equal(a_step, b_step)
    # generated: prefill untouched, the decoding step steered
    g_pre, g_step = _prefill_then_step(
        model, tok, prompts, lambda: steer(model, key, 0.5, positions="generated")
    )
    assert torch.equal(g_pre, base_pre)
    assert not torch.equal(g_step, base_step)
    assert hooks_left(model) == 0


def test_logits_bit_identical_after_exit_and_after_exceptions():
    tok = bpe_tokenizer("left")
    model = make_model("qwen2", len(tok))
    inputs = batch(tok, PROMPTS[:5])
    with torch.no_grad():
        ref = model(**inputs).logits
    key = random_key(model)
    with steer(model, key, alpha=0.5, positions="all"), torch.no_grad():
        assert not torch.equal(model(**inputs).logits, ref)

    def forward_then_raise() -> None:
        with steer(model, key, alpha=0.5):
            with torch.no_grad():
                model(**inputs)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        forward_then_raise()
    handle = steer(model, key, alpha=0.2, mode="add")
    assert handle.active
    assert hooks_left(model) > 0
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.active
    assert hooks_left(model) == 0
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def _first_logits(model, tok, prompts, key, alpha=0.4):
    """Steered next-token logits at each row's last real token (positions from the mask)."""
    inputs = batch(tok, prompts)
    mask = inputs["attention_mask"]
    with steer(model, key, alpha=alpha), torch.no_grad():
        logits = model(**inputs, position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits
    return logits[torch.arange(len(prompts)), last_positions(mask)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_one_key_per_row_in_generate(side):
    tok = word_tokenizer(side)
    model = make_model("llama", len(tok))
    k1, k2 = random_key(model, 1), random_key(model, 2)
    prompts = PROMPTS[:3]
    batched = _first_logits(model, tok, prompts, [k1, None, k2])
    single = [
        _first_logits(model, tok, [prompts[0]], k1),
        _first_logits(model, tok, [prompts[1]], k1, alpha=0.0),
        _first_logits(model, tok, [prompts[2]], k2),
    ]
    with torch.no_grad():
        plain = model(**batch(tok, [prompts[1]])).logits[:, -1]
    torch.testing.assert_close(single[1], plain, atol=1e-5, rtol=1e-5)
    for i in range(3):
        torch.testing.assert_close(batched[i], single[i][0], atol=1e-4, rtol=1e-4)
    # the same through a [B, L, d] tensor
    stacked = torch.stack([k1.vectors, torch.zeros_like(k1.vectors), k2.vectors])
    via_tensor = _first_logits(model, tok, prompts, stacked)
    torch.testing.assert_close(via_tensor[[0, 2]], batched[[0, 2]], atol=1e-5, rtol=1e-5)


def test_generate_greedy_sampling_and_expanded_rows():
    tok = word_tokenizer("left")
    model = make_model("gpt_neox", len(tok))
    key = random_key(model)
    inputs = batch(tok, PROMPTS[:2])
    kw = dict(max_new_tokens=6, pad_token_id=tok.pad_token_id)
    base = model.generate(**inputs, do_sample=False, **kw)
    with steer(model, key, alpha=1.0):
        steered = model.generate(**inputs, do_sample=False, **kw)
        torch.manual_seed(0)
        sampled = model.generate(**inputs, do_sample=True, num_return_sequences=2, **kw)
    with steer(model, [key, key], alpha=1.0):
        torch.manual_seed(0)
        per_row = model.generate(**inputs, do_sample=True, num_return_sequences=2, **kw)
    assert not torch.equal(base, steered)
    assert sampled.shape == (4, base.shape[1])
    assert torch.equal(sampled, per_row)
    assert torch.equal(model.generate(**inputs, do_sample=False, **kw), base)
    assert hooks_left(model) == 0


def test_bad_arguments_raise_and_leave_model_unhooked():
    tok = word_tokenizer()
    model = make_model("llama", len(tok))
    other = make_model("qwen2", len(tok))
    key = random_key(model)
    with pytest.raises(ValueError, match="hidden size"):
        steer(model, random_key(other))
    with pytest.raises(ValueError, match="mode"):
        steer(model, key, mode="spin")
    with pytest.raises(ValueError, match="positions"):
        steer(model, key, positions="first")
    with pytest.raises(ValueError, match="alpha"):
        steer(model, key, alpha=float("nan"))
    with pytest.raises(ValueError, match=r"\[3, 32\]"):
        steer(model, torch.zeros(2, 32))
    with pytest.raises(TypeError, match="SteeringKey"):
        steer(model, "key")
    with pytest.raises(ValueError, match="not in the key"):
        steer(model, random_key(model, layers=[0, 1]), layers=[2])
    with pytest.raises(ValueError, match="same layers"):
        steer(model, [random_key(model, layers=[0]), random_key(model, layers=[1])])
    renamed = make_model("llama", len(tok), hidden=32)
    renamed.config.rms_norm_eps = 1e-3
    with pytest.raises(ValueError, match="fingerprint"):
        steer(renamed, key)
    steer(renamed, key, check_fingerprint=False).remove()
    assert hooks_left(model) == 0
    assert hooks_left(renamed) == 0
    # a batch that does not match the per-row keys fails inside forward; hooks still go
    inputs = batch(tok, PROMPTS[:3])
    with (
        pytest.raises(ValueError, match="per-row vector sets"),
        steer(model, [key, key]),
        torch.no_grad(),
    ):
        model(**inputs)
    assert hooks_left(model) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    tok = word_tokenizer("left")
    model = make_model("qwen2", len(tok)).to(dtype)
    key = random_key(model)
    inputs = batch(tok, PROMPTS[:3])
    before, _ = layer_out(model, 2, **inputs)
    with steer(model, key, alpha=0.3, layers=[2]):
        after, _ = layer_out(model, 2, **inputs)
    pos = last_positions(inputs["attention_mask"])
    want = steer_reference(before, key.vector(2), 0.3, positions=pos)
    assert after.dtype == dtype
    torch.testing.assert_close(after, want, atol=2e-2, rtol=2e-2)
    changed = (after != before).any(-1)
    assert changed.sum() == 3
    assert changed[torch.arange(3), pos].all()
