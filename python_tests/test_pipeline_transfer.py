"""One lockstep pass for the direction and the alignment, and the seams around it: the key
protocol, the artifact registry and the models' train/eval modes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import PROMPTS, bpe_tokenizer, make_model, word_tokenizer

from unlock_fast import (
    SteeringKey,
    collect_alignment_stats,
    collect_transfer,
    extract_direction,
    load_artifact,
    steer,
)
from unlock_fast.artifacts import register_kind, registered_kinds
from unlock_fast.layers import decoder_layers

COT = [p + " Answer: Let's think step by step." for p in PROMPTS]


@pytest.fixture(scope="module")
def models():
    stok, ttok = word_tokenizer(), bpe_tokenizer()
    src = make_model("llama", len(stok))
    tgt = make_model("qwen2", len(ttok), seed=1)
    return src, stok, tgt, ttok


def _count_forwards(model: torch.nn.Module) -> list[int]:
    """A list whose length counts the forward passes through the first decoder block."""
    calls: list[int] = []
    decoder_layers(model)[0].register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("method", ["mean", "pca"])
def test_one_pass_equals_the_two_collectors(models, method):
    src, stok, tgt, ttok = models
    target_prompts = [p.lower() for p in PROMPTS]
    direction, stats = collect_transfer(
        src, stok, tgt, ttok, PROMPTS, COT, target_prompts=target_prompts, method=method,
        batch_size=5, progress=False,
    )  # fmt: skip
    want_d = extract_direction(src, stok, PROMPTS, COT, method=method, batch_size=5, progress=False)
    want_s = collect_alignment_stats(
        src, stok, tgt, ttok, PROMPTS, target_prompts=target_prompts, batch_size=5, progress=False
    )
    torch.testing.assert_close(direction.vectors, want_d.vectors, atol=1e-6, rtol=1e-5)
    assert direction.layers == want_d.layers
    assert direction.num_prompts == want_d.num_prompts == len(PROMPTS)
    assert stats.layer_map == want_s.layer_map
    assert stats.num_prompts == want_s.num_prompts
    for got, want in zip(stats.moments, want_s.moments, strict=True):
        for which in ("xx", "yy", "xy"):
            torch.testing.assert_close(got.gram(which), want.gram(which), atol=1e-5, rtol=1e-5)
    a, b = stats.fit(rank=4).transfer(direction), want_s.fit(rank=4).transfer(want_d)
    torch.testing.assert_close(a.vectors, b.vectors, atol=1e-5, rtol=1e-4)


def test_one_pass_runs_each_locked_prompt_through_the_source_once():
    stok, ttok = word_tokenizer(), bpe_tokenizer()
    src = make_model("llama", len(stok))
    tgt = make_model("qwen2", len(ttok), seed=1)
    calls = _count_forwards(src)
    collect_transfer(src, stok, tgt, ttok, PROMPTS, COT, batch_size=4, progress=False)
    batches = -(-len(PROMPTS) // 4)
    assert len(calls) == 2 * batches  # locked and unlocked passes; no second locked pass
    calls.clear()
    extract_direction(src, stok, PROMPTS, COT, batch_size=4, progress=False)
    collect_alignment_stats(src, stok, tgt, ttok, PROMPTS, batch_size=4, progress=False)
    assert len(calls) == 3 * batches


def test_modes_are_restored_when_one_model_serves_two_sides():
    tok = word_tokenizer()
    model = make_model("llama", len(tok))
    model.train()
    decoder_layers(model)[1].eval()  # a mixed state must come back as it was
    before = {name: m.training for name, m in model.named_modules()}
    extract_direction(model, tok, PROMPTS, COT, progress=False)
    collect_alignment_stats(model, tok, model, tok, PROMPTS, progress=False)
    collect_transfer(model, tok, model, tok, PROMPTS, COT, progress=False)
    assert {name: m.training for name, m in model.named_modules()} == before


def test_steer_takes_anything_with_as_key(models):
    src, stok, _, _ = models
    direction = extract_direction(src, stok, PROMPTS[:4], COT[:4], progress=False)

    class Wrapped:  # a user's own type: only as_key() matters
        def as_key(self) -> SteeringKey:
            return direction.as_key()

    enc = stok(PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.inference_mode():
        with steer(src, direction, alpha=0.5):
            want = src(**enc).logits
        with steer(src, Wrapped(), alpha=0.5):
            got = src(**enc).logits
        plain = src(**enc).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)
    with pytest.raises(TypeError, match="as_key"):
        steer(src, object())


def test_registry_opens_every_kind_and_refuses_unknown_ones(tmp_path, models):
    src, stok, tgt, ttok = models
    assert registered_kinds() == ["alignment", "alignment_stats", "direction", "steering_key"]
    direction, stats = collect_transfer(src, stok, tgt, ttok, PROMPTS, COT, progress=False)
    alignment = stats.fit(rank=3)
    for obj in (direction, stats, alignment, alignment.transfer(direction)):
        obj.save_pretrained(tmp_path / type(obj).__name__)
        assert type(load_artifact(tmp_path / type(obj).__name__)) is type(obj)
    with pytest.raises(ValueError, match="registered already"):
        register_kind("direction", SteeringKey.from_pretrained)
    meta = tmp_path / "Direction" / "unlock.json"
    meta.write_text(meta.read_text().replace('"kind": "direction"', '"kind": "lens"'))
    with pytest.raises(ValueError, match="unknown artifact kind 'lens'"):
        load_artifact(tmp_path / "Direction")
