"""Steering follows the prompt, not the cache; padding and empty rows are never steered."""

from __future__ import annotations

import pytest
import torch
from test_pipeline_steering import batch, hooks_left, layer_out, random_key
from tiny_models import PROMPTS, make_model, word_tokenizer
from transformers import DynamicCache

from unlock_fast import steer
from unlock_fast.capture import last_positions, layer_output
from unlock_fast.layers import decoder_layers
from unlock_fast.reference import steer_reference

pytestmark = pytest.mark.usefixtures("one_thread")

POSITIONS = ["last_prompt", "prompt", "generated", "all"]


def greedy(model, inputs, use_cache, n=6):
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        return model.generate(**inputs, use_cache=use_cache, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("positions", POSITIONS)
def test_generate_without_cache_equals_with_cache(arch, side, positions):
    tok = word_tokenizer(side)
    model = make_model(arch, len(tok))
    key = random_key(model)
    inputs = batch(tok, PROMPTS[:3])
    plain = greedy(model, inputs, use_cache=True)
    assert torch.equal(plain, greedy(model, inputs, use_cache=False))
    with steer(model, key, alpha=2.0, mode="add", positions=positions):
        cached = greedy(model, inputs, use_cache=True)
        rerun = greedy(model, inputs, use_cache=False)
        again = greedy(model, inputs, use_cache=False)  # a new generate: a new prefill
    assert not torch.equal(cached, plain)
    assert torch.equal(rerun, cached)
    assert torch.equal(again, cached)
    assert hooks_left(model) == 0


@pytest.mark.parametrize("positions", POSITIONS)
def test_each_generate_call_is_a_new_prompt(positions):
    tok = word_tokenizer("left")
    model = make_model("llama", len(tok))
    key = random_key(model)
    a, b = batch(tok, PROMPTS[:2]), batch(tok, PROMPTS[5:7])
    with steer(model, key, alpha=2.0, mode="add", positions=positions):
        want_b = greedy(model, b, use_cache=False)
    with steer(model, key, alpha=2.0, mode="add", positions=positions):
        greedy(model, a, use_cache=False)
        assert torch.equal(greedy(model, b, use_cache=False), want_b)
        # a one-token generation, then a prompt that extends it by that token: the second
        # generate (with a cache) starts from an empty cache, so it is a new prompt
        first = greedy(model, a, use_cache=True, n=1)
        grown = {
            "input_ids": first,
            "attention_mask": torch.cat([a["attention_mask"], torch.ones(2, 1)], 1).long(),
        }
        got = greedy(model, grown, use_cache=True)
    with steer(model, key, alpha=2.0, mode="add", positions=positions):
        assert torch.equal(got, greedy(model, grown, use_cache=True))


def test_full_rerun_steers_the_prompts_last_token():
    tok = word_tokenizer("right")
    model = make_model("llama", len(tok))
    key = random_key(model)
    inputs = batch(tok, PROMPTS[:3])
    mask = inputs["attention_mask"]
    pos = last_positions(mask)
    n = mask.shape[1]
    ids = torch.cat([inputs["input_ids"], torch.full((3, 1), 7)], 1)
    grown = {"input_ids": ids, "attention_mask": torch.cat([mask, torch.ones(3, 1).long()], 1)}
    before, _ = layer_out(model, 1, **grown)
    with steer(model, key, alpha=0.5, positions="last_prompt", layers=[1]):
        layer_out(model, 1, **inputs)  # the prefill
        after, _ = layer_out(model, 1, **grown)  # the same rows and one more token, no cache
    want = steer_reference(before[:, :n], key.vector(1), 0.5, positions=pos)
    torch.testing.assert_close(after[:, :n], want, atol=1e-5, rtol=1e-5)
    changed = (after != before).any(-1)
    assert changed[torch.arange(3), pos].all()
    assert not changed[:, n].any()  # the new token is not the prompt's last


def test_no_mask_takes_every_token_as_real():
    tok = word_tokenizer("left")
    model = make_model("llama", len(tok))
    key = random_key(model)
    ids = batch(tok, PROMPTS[:1])["input_ids"]
    with steer(model, key, alpha=0.5, positions="all"):
        bare, _ = layer_out(model, 2, input_ids=ids)
        masked, _ = layer_out(model, 2, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert torch.equal(bare, masked)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("positions", POSITIONS)
def test_padded_batch_without_mask_is_refused(side, positions):
    tok = word_tokenizer(side)
    model = make_model("llama", len(tok))
    key = random_key(model)
    inputs = batch(tok, PROMPTS[:3])
    padded_row = int((inputs["attention_mask"] == 0).any(1).nonzero()[0, 0])
    edge = "starts" if side == "left" else "ends"
    with (
        pytest.raises(ValueError, match=rf"row {padded_row} of input_ids {edge} .*attention_mask"),
        steer(model, key, positions=positions),
        torch.no_grad(),
    ):
        model(input_ids=inputs["input_ids"])
    assert hooks_left(model) == 0
    # with the mask it runs; with no pad id in the config it takes every token as real
    with steer(model, key, positions=positions), torch.no_grad():
        model(**inputs)
        model.config.pad_token_id = None
        model(input_ids=inputs["input_ids"])


def test_decoding_step_without_mask_may_be_the_pad_token():
    tok = word_tokenizer("left")
    model = make_model("llama", len(tok))
    key = random_key(model)
    inputs = batch(tok, PROMPTS[:2])
    cache = DynamicCache()
    with steer(model, key, positions="all"), torch.no_grad():
        model(**inputs, past_key_values=cache, use_cache=True)
        pad = torch.full((2, 1), tok.pad_token_id)
        model(input_ids=pad, past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("positions", POSITIONS)
def test_row_without_real_token_is_an_error(positions):
    tok = word_tokenizer("left")
    model = make_model("llama", len(tok))
    key = random_key(model)
    inputs = batch(tok, PROMPTS[:3])
    inputs["attention_mask"][1] = 0
    with (
        pytest.raises(ValueError, match="row 1 of the batch has no real token"),
        steer(model, key, positions=positions),
        torch.no_grad(),
    ):
        model(**inputs)
    assert hooks_left(model) == 0


def test_last_positions_refuses_an_empty_row():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="row 2 "):
        last_positions(mask)
    assert last_positions(mask[:2]).tolist() == [1, 0]


def test_per_row_keys_follow_the_prompt_without_cache():
    tok = word_tokenizer("left")
    model = make_model("gpt2", len(tok))
    k1, k2 = random_key(model, 1), random_key(model, 2)
    inputs = batch(tok, PROMPTS[:3])
    with steer(model, [k1, None, k2], alpha=2.0, mode="add"):
        cached = greedy(model, inputs, use_cache=True)
        rerun = greedy(model, inputs, use_cache=False)
    assert torch.equal(cached, rerun)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_at_every_token_has_the_bits_of_torchs_add(dtype):
    """``add`` keeps alpha·r and computes h + (alpha·r) with one rounding: at every token the
    steered model gives the bits of ``h.add_(alpha·r)`` in each layer."""
    tok = word_tokenizer("right")
    model = make_model("llama", len(tok)).to(dtype)
    key = random_key(model)
    inputs = batch(tok, PROMPTS[:2])
    full = {
        "input_ids": inputs["input_ids"][:, :3],
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
    }
    with steer(model, key, alpha=0.3, mode="add", positions="all"), torch.no_grad():
        steered = model(**full).logits
    hooks = [
        layer.register_forward_hook(
            lambda _m, _a, o, i=i: layer_output(o).add_((0.3 * key.vectors[i]).float())
        )
        for i, layer in enumerate(decoder_layers(model))
    ]
    try:
        with torch.no_grad():
            added = model(**full).logits
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(steered, added)
