"""Decoder-layer discovery and activation capture on tiny HF models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import PROMPTS, bpe_tokenizer, make_model, word_tokenizer
from torch import nn

from unlock_fast.capture import iter_activations, last_positions
from unlock_fast.layers import decoder_layers, model_fingerprint, resolve_layer_indices

ARCHS = ["llama", "qwen2", "gemma3", "gpt2", "gpt_neox"]
EXPECTED_PATH = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "gemma3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["mistral", "qwen3", "gemma2"])
def test_decoder_layers_found_in_more_architectures(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"head_dim": 8} if name != "mistral" else {}
    cfg = AutoConfig.for_model(
        name,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    assert decoder_layers(model) is model.model.layers


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_found(arch):
    model = make_model(arch, 100)
    found = decoder_layers(model)
    assert found is model.get_submodule(EXPECTED_PATH[arch])
    assert decoder_layers(model, EXPECTED_PATH[arch]) is found


def test_layer_discovery_error_says_how_to_name_layers():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])

    with pytest.raises(ValueError, match=r"layer_path='model.layers'"):
        decoder_layers(Odd())
    model = make_model("llama", 100)
    with pytest.raises(ValueError, match="has no attribute 'decoder'"):
        decoder_layers(model, "model.decoder")
    with pytest.raises(ValueError, match="expected a non-empty nn.ModuleList"):
        decoder_layers(model, "model.norm")


def test_resolve_layer_indices():
    assert resolve_layer_indices(4, None) == [0, 1, 2, 3]
    assert resolve_layer_indices(4, [-1, 0]) == [0, 3]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer_indices(4, [4])
    with pytest.raises(ValueError, match="twice"):
        resolve_layer_indices(4, [1, -3])
    with pytest.raises(TypeError, match="layer_path"):
        resolve_layer_indices(4, "model.layers")


def test_fingerprint_ignores_name_but_not_shape():
    a, b = make_model("llama", 100), make_model("llama", 100, seed=3)
    b.config._name_or_path = "somewhere/else"
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(make_model("llama", 100, hidden=48))


def test_last_positions_any_padding_side():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert last_positions(mask).tolist() == [3, 2, 0, 3]


def _reference_rows(model, tok, prompts):
    """Activations via output_hidden_states, unpadded, one prompt at a time."""
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        out.append(torch.stack([h[0] for h in hs[1:]]))  # [L, S, d]
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_capture_matches_hidden_states(arch, side):
    tok = word_tokenizer(side)
    model = make_model(arch, len(tok))
    n_layers = len(decoder_layers(model))
    layers = list(range(n_layers - 1))  # the last hidden_states entry is after the final norm
    prompts = PROMPTS[:7]
    ref = _reference_rows(model, tok, prompts)
    got = {}
    for b in iter_activations(model, tok, prompts, layers, batch_size=3):
        for row, i in enumerate(b.indices):
            got[i] = torch.stack([b.rows[layer][row] for layer in layers])
    assert sorted(got) == list(range(len(prompts)))
    for i in range(len(prompts)):
        torch.testing.assert_close(got[i], ref[i][layers, -1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_capture_token_level_and_last_layer_before_final_norm(side):
    tok = bpe_tokenizer(side)
    model = make_model("qwen2", len(tok))
    prompts = PROMPTS[:5]
    last = len(decoder_layers(model)) - 1
    seen = []
    hook = model.model.layers[last].register_forward_hook(lambda _m, _a, o: seen.append(o))
    try:
        batches = list(
            iter_activations(model, tok, prompts, [0, last], token_level=True, batch_size=5)
        )
    finally:
        hook.remove()
    (b,) = batches
    ref = _reference_rows(model, tok, [prompts[i] for i in b.indices])
    want0 = torch.cat([r[0] for r in ref])
    torch.testing.assert_close(b.rows[0], want0, atol=2e-5, rtol=1e-4)
    # The last layer's rows are its raw output, not HF's normed hidden_states[-1].
    lengths = [r.shape[1] for r in ref]
    assert b.rows[last].shape == (sum(lengths), model.config.hidden_size)
    normed = torch.cat([r[last] for r in ref])
    assert not torch.allclose(b.rows[last], normed, atol=1e-3)
    ids = torch.cat([tok(prompts[i], return_tensors="pt")["input_ids"][0] for i in b.indices])
    assert torch.equal(b.token_ids, ids)


def test_capture_dtype_device_and_model_state():
    tok = word_tokenizer()
    model = make_model("llama", len(tok)).train()
    hooks_before = [len(m._forward_hooks) for m in model.modules()]
    (b,) = list(
        iter_activations(
            model, tok, PROMPTS[:4], [1], batch_size=8, dtype=torch.bfloat16, device="cpu"
        )
    )
    assert b.rows[1].dtype == torch.bfloat16
    assert b.rows[1].shape == (4, 32)
    assert model.training  # restored
    assert [len(m._forward_hooks) for m in model.modules()] == hooks_before
    with pytest.raises(ValueError, match="dtype"):
        next(iter_activations(model, tok, PROMPTS[:2], [0], dtype=torch.float64))
    with pytest.raises(TypeError, match="list of str"):
        next(iter_activations(model, tok, "one prompt", [0]))
    with pytest.raises(ValueError, match="layers"):
        next(iter_activations(model, tok, PROMPTS[:2], [7]))
    assert [len(m._forward_hooks) for m in model.modules()] == hooks_before


def test_models_spread_with_device_map_and_disk_offload(tmp_path):
    from transformers import AutoModelForCausalLM

    import unlock_fast as uf

    tok = word_tokenizer("left")
    model = make_model("llama", len(tok), layers=4)
    model.save_pretrained(tmp_path / "m")
    where = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu"}
    where |= {f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(4)}
    spread = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m",
        device_map=where | {"lm_head": "cpu"},
        offload_folder=str(tmp_path / "offload"),
        attn_implementation="eager",
    )
    assert hasattr(spread.model.layers[1], "_hf_hook")
    cot = [p + " Answer: Let's think step by step." for p in PROMPTS]
    a = uf.extract_direction(model, tok, PROMPTS, cot, progress=False)
    b = uf.extract_direction(spread, tok, PROMPTS, cot, progress=False)
    torch.testing.assert_close(a.vectors, b.vectors, atol=1e-6, rtol=1e-6)
    inputs = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    with uf.steer(model, a, alpha=0.5):
        want = model.generate(**inputs, **kw)
    with uf.steer(spread, b, alpha=0.5):
        got = spread.generate(**inputs, **kw)
    assert torch.equal(got, want)
