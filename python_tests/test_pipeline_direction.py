"""Capability directions: prompt and model contrast, mean and PCA."""

from __future__ import annotations

import pytest
import torch
from tiny_models import PROMPTS, bpe_tokenizer, make_model, word_tokenizer

from unlock_fast import Direction, extract_direction
from unlock_fast.capture import iter_activations

COT = [p + " Answer: Let's think step by step." for p in PROMPTS]


pytestmark = pytest.mark.usefixtures("one_thread")


def _last_rows(model, tok, prompts, layers):
    """[N, L, d] activations in prompt order, one prompt per batch."""
    rows = []
    for p in prompts:
        (b,) = list(iter_activations(model, tok, [p], layers))
        rows.append(torch.stack([b.rows[layer][0] for layer in layers]))
    return torch.stack(rows).double()


@pytest.mark.parametrize("side", ["left", "right"])
def test_mean_direction_prompt_contrast(side):
    tok = word_tokenizer(side)
    model = make_model("llama", len(tok))
    d = extract_direction(model, tok, PROMPTS, COT, batch_size=5, progress=False)
    want = _last_rows(model, tok, COT, [0, 1, 2]) - _last_rows(model, tok, PROMPTS, [0, 1, 2])
    torch.testing.assert_close(d.vectors.double(), want.mean(0), atol=1e-5, rtol=1e-4)
    assert d.contrast == "prompt"
    assert d.num_prompts == len(PROMPTS)
    assert d.method == "mean"
    assert d.vectors.dtype == torch.float32
    assert d.layers == [0, 1, 2]


def test_pca_direction_sign_and_axis():
    tok = bpe_tokenizer()
    model = make_model("gemma3", len(tok))
    d = extract_direction(model, tok, PROMPTS, COT, method="pca", layers=[1, 3], progress=False)
    mean = extract_direction(model, tok, PROMPTS, COT, layers=[1, 3], progress=False)
    diffs = _last_rows(model, tok, COT, [1, 3]) - _last_rows(model, tok, PROMPTS, [1, 3])
    for i in range(2):
        x = diffs[:, i]
        axis = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[0]
        v = d.vectors[i].double()
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-5)
        assert abs(float(v @ axis)) == pytest.approx(1.0, abs=1e-4)
        assert float(v @ mean.vectors[i].double()) > 0  # sign fixed against the mean
    assert d.layers == [1, 3]


def test_model_contrast_two_models():
    tok = word_tokenizer()
    base, tuned = make_model("qwen2", len(tok), seed=0), make_model("qwen2", len(tok), seed=5)
    d = extract_direction(base, tok, PROMPTS[:6], unlocked_model=tuned, progress=False)
    want = _last_rows(tuned, tok, PROMPTS[:6], list(range(5))) - _last_rows(
        base, tok, PROMPTS[:6], list(range(5))
    )
    torch.testing.assert_close(d.vectors.double(), want.mean(0), atol=1e-5, rtol=1e-4)
    assert d.contrast == "model"
    assert d.unlocked_model is not None


def test_bad_inputs_raise_and_leave_model_unhooked():
    tok = word_tokenizer()
    model = make_model("llama", len(tok))
    other = make_model("qwen2", len(tok))
    with pytest.raises(ValueError, match="method"):
        extract_direction(model, tok, PROMPTS, COT, method="median", progress=False)
    with pytest.raises(ValueError, match="pair up"):
        extract_direction(model, tok, PROMPTS, COT[:3], progress=False)
    with pytest.raises(ValueError, match="prompts_unlocked"):
        extract_direction(model, tok, PROMPTS, progress=False)
    with pytest.raises(ValueError, match="same shape"):
        extract_direction(model, tok, PROMPTS, unlocked_model=other, progress=False)
    with pytest.raises(TypeError, match="list of str"):
        extract_direction(model, tok, "a prompt", "another", progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        extract_direction(model, tok, PROMPTS[:1], COT[:1], method="pca", progress=False)
    assert all(not m._forward_hooks for m in model.modules())


def test_direction_as_key_and_round_trip(tmp_path):
    tok = word_tokenizer()
    model = make_model("llama", len(tok))
    d = extract_direction(model, tok, PROMPTS[:4], COT[:4], progress=False)
    d.save_pretrained(tmp_path / "dir")
    back = Direction.from_pretrained(tmp_path / "dir", model)
    assert torch.equal(back.vectors, d.vectors)
    assert back.model == d.model
    key = d.as_key()
    assert torch.equal(key.vectors, d.vectors)
    assert key.layers == d.layers
