"""Every public entry point leaves the model as it was: modes, hooks, parameters, config.

Also: a model whose blocks can't be found gets the ``layer_path=`` hint everywhere, and the
config fingerprint follows what determines the activations, not bookkeeping fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tiny_models import PROMPTS, bpe_tokenizer, make_model, word_tokenizer
from torch import nn

from unlock_fast import (
    ModelInfo,
    SteeringKey,
    collect_alignment_stats,
    collect_transfer,
    extract_direction,
    steer,
)
from unlock_fast.capture import iter_activations
from unlock_fast.layers import (
    decoder_layers,
    fingerprint_matches,
    hidden_size,
    legacy_model_fingerprint,
    model_fingerprint,
)

pytestmark = pytest.mark.usefixtures("one_thread")

COT = [p + " Let's think step by step." for p in PROMPTS]
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def snapshot(model: nn.Module, tokenizer: Any = None) -> dict[str, Any]:
    """Everything a call could leave changed on a model (and its tokenizer)."""
    snap: dict[str, Any] = {
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: {d: list(getattr(m, d)) for d in HOOK_DICTS} for n, m in model.named_modules()
        },
        "tensors": {
            n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]
        },
        "grad": {n: (p.requires_grad, p.grad is None) for n, p in model.named_parameters()},
        "config": model.config.to_dict(),
        "generation_config": model.generation_config.to_dict(),
        "torch": (torch.is_grad_enabled(), torch.is_inference_mode_enabled()),
    }
    if tokenizer is not None:
        snap["tokenizer"] = (
            tokenizer.padding_side,
            tokenizer.truncation_side,
            tokenizer.pad_token_id,
            len(tokenizer),
        )
    return snap


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    for part in ("modes", "hooks", "grad", "config", "generation_config", "torch", "tokenizer"):
        assert before.get(part) == after.get(part), part
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, t in before["tensors"].items():
        assert torch.equal(t, after["tensors"][name]), name


def set_state(model: nn.Module, state: str) -> nn.Module:
    """train, eval, or mixed: some submodules in train mode, some in eval, one block frozen."""
    if state == "eval":
        return model.eval()
    model.train()
    if state == "mixed":
        blocks = decoder_layers(model)
        blocks[1].eval()
        blocks[0].requires_grad_(False)
        model.get_output_embeddings().eval()
    return model


STATES = ["train", "eval", "mixed"]


def _models(state):
    stok, ttok = word_tokenizer(), bpe_tokenizer()
    src = set_state(make_model("llama", len(stok)), state)
    tgt = set_state(make_model("qwen2", len(ttok)), state)
    return src, stok, tgt, ttok


def _check(run: Callable[[], object], *pairs: tuple[nn.Module, Any]) -> None:
    before = [snapshot(m, t) for m, t in pairs]
    run()
    for b, (m, t) in zip(before, pairs, strict=True):
        assert_same(b, snapshot(m, t))


@pytest.mark.parametrize("state", STATES)
def test_extract_direction_prompt_contrast(state):
    src, stok, _, _ = _models(state)
    _check(
        lambda: extract_direction(src, stok, PROMPTS[:5], COT[:5], batch_size=2, progress=False),
        (src, stok),
    )


@pytest.mark.parametrize("state", STATES)
def test_extract_direction_model_contrast(state):
    src, stok, _, _ = _models(state)
    other = set_state(
        make_model("llama", len(stok), seed=1), "train" if state == "mixed" else "mixed"
    )
    _check(
        lambda: extract_direction(
            src, stok, PROMPTS[:5], unlocked_model=other, method="pca", progress=False
        ),
        (src, stok),
        (other, stok),
    )


PAIR_COLLECTORS = {
    "collect_alignment_stats": lambda s, st, t, tt: collect_alignment_stats(
        s, st, t, tt, PROMPTS[:6], progress=False
    ),
    "collect_transfer": lambda s, st, t, tt: collect_transfer(
        s, st, t, tt, PROMPTS[:5], COT[:5], progress=False
    ),
}


@pytest.mark.parametrize("collector", PAIR_COLLECTORS)
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("same", [False, True])
def test_source_target_collectors(collector, state, same):
    src, stok, tgt, ttok = _models(state)
    if same:
        tgt, ttok = src, stok
    collect = PAIR_COLLECTORS[collector]
    _check(lambda: collect(src, stok, tgt, ttok), (src, stok), (tgt, ttok))


def test_iter_activations_alone_leaves_the_model_as_it_was_between_batches():
    src, stok, _, _ = _models("mixed")
    before = snapshot(src, stok)
    gen = iter_activations(src, stok, PROMPTS[:6], [0, 2], batch_size=2)
    next(gen)  # handed out, not finished: the model is already as it was
    assert_same(before, snapshot(src, stok))
    # two captures interleaved on one model, closed in the order they were opened
    a = iter_activations(src, stok, PROMPTS[:4], [1], batch_size=2)
    b = iter_activations(src, stok, PROMPTS[:4], [1], batch_size=2)
    next(a), next(b)
    a.close()
    assert_same(before, snapshot(src, stok))
    b.close()
    gen.close()
    assert list(iter_activations(src, stok, PROMPTS[:3], [2], batch_size=2))
    assert_same(before, snapshot(src, stok))


def test_iter_activations_restores_after_a_failing_forward():
    src, stok, _, _ = _models("train")
    before = snapshot(src, stok)

    def boom(*_: object) -> None:
        raise RuntimeError("boom")

    handle = decoder_layers(src)[0].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        list(iter_activations(src, stok, PROMPTS[:3], [1]))
    handle.remove()
    assert_same(before, snapshot(src, stok))


def _key(model: nn.Module) -> SteeringKey:
    info = ModelInfo.of(model)
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(info.num_layers, info.hidden_size, generator=g)
    return SteeringKey(vectors, list(range(info.num_layers)), info)


@pytest.mark.parametrize("state", STATES)
def test_steer_exit_remove_and_errors(state):
    src, stok, _, _ = _models(state)
    key = _key(src)
    tok = word_tokenizer("left")
    inputs = dict(tok(PROMPTS[:2], return_tensors="pt", padding=True))
    before = snapshot(src, tok)
    with steer(src, key, alpha=0.5, positions="all"), torch.no_grad():
        src(**inputs)
        src.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert_same(before, snapshot(src, tok))
    handle = steer(src, key, alpha=0.5)
    with torch.no_grad():
        src(**inputs)
    handle.remove()
    assert_same(before, snapshot(src, tok))
    for bad in (
        dict(key=key, mode="spin"),
        dict(key=key, positions="first"),
        dict(key=key, alpha=float("inf")),
        dict(key=torch.zeros(2, 2)),
        dict(key=key, layers=[7]),
    ):
        with pytest.raises((ValueError, TypeError)):
            steer(src, **bad)
        assert_same(before, snapshot(src, tok))
    # a failure inside the forward (a per-row key set that does not fit the batch)
    with (
        pytest.raises(ValueError, match="per-row vector sets"),
        steer(src, [key, key, key]),
        torch.no_grad(),
    ):
        src(**inputs)
    assert_same(before, snapshot(src, tok))


# -- blocks that can't be found: the layer_path= hint, before anything else ----------------


class NoBlocks(nn.Module):
    """A custom model with no recognisable block list and no config."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.parts = nn.ModuleList([nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)])

    def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        h = self.embed(input_ids)
        for p in self.parts:
            h = p(h)
        return h


class Wrapper(nn.Module):
    """Holds a Hugging Face model without exposing its config or embeddings."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs: object) -> object:
        return self.inner(**kwargs)


def test_unfound_blocks_give_the_layer_path_hint_everywhere():
    odd = NoBlocks()
    src, stok, tgt, ttok = _models("eval")
    hint = r"layer_path='model.layers'"
    with pytest.raises(ValueError, match=hint):
        extract_direction(odd, stok, PROMPTS[:2], COT[:2], progress=False)
    with pytest.raises(ValueError, match=hint):
        extract_direction(src, stok, PROMPTS[:2], unlocked_model=odd, progress=False)
    with pytest.raises(ValueError, match=hint):
        collect_alignment_stats(odd, stok, tgt, ttok, PROMPTS[:2], progress=False)
    with pytest.raises(ValueError, match=hint):
        collect_alignment_stats(src, stok, odd, ttok, PROMPTS[:2], progress=False)
    with pytest.raises(ValueError, match=hint):
        collect_transfer(odd, stok, tgt, ttok, PROMPTS[:2], COT[:2], progress=False)
    with pytest.raises(ValueError, match=hint):
        steer(odd, torch.zeros(3, 8))
    with pytest.raises(ValueError, match=hint):
        ModelInfo.of(odd)
    # blocks named by hand, but nothing tells the width: says what is missing
    with pytest.raises(ValueError, match="cannot tell the hidden size.*get_input_embeddings"):
        hidden_size(nn.Sequential(nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])))


def test_a_wrapper_is_described_by_the_model_holding_its_blocks():
    src, stok, _, _ = _models("eval")
    wrapped = Wrapper(src)
    assert ModelInfo.of(wrapped).hidden_size == ModelInfo.of(src).hidden_size == 32
    assert model_fingerprint(wrapped) == model_fingerprint(src)
    mine = extract_direction(src, stok, PROMPTS[:3], COT[:3], progress=False)
    theirs = extract_direction(wrapped, stok, PROMPTS[:3], COT[:3], progress=False)
    torch.testing.assert_close(theirs.vectors, mine.vectors)
    steer(wrapped, mine.as_key()).remove()


# -- the fingerprint follows what determines the activations ------------------------------


def test_bookkeeping_config_fields_do_not_refuse_earlier_keys(tmp_path):
    src, _, _, _ = _models("eval")
    key = _key(src)
    key.save_pretrained(tmp_path / "k")
    cfg = src.config
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 5, 6, [7, 8]
    cfg.use_cache = False
    cfg.output_attentions = True
    cfg.return_dict = False
    cfg._name_or_path = "renamed"
    cfg.tie_word_embeddings = not cfg.tie_word_embeddings
    cfg.id2label = {0: "a", 1: "b", 2: "c"}
    cfg.initializer_range = 0.5
    assert model_fingerprint(src) == key.model.fingerprint
    steer(src, key).remove()
    SteeringKey.from_pretrained(tmp_path / "k", src)


@pytest.mark.parametrize(
    "change",
    [
        lambda c: setattr(c, "rms_norm_eps", 1e-3),
        lambda c: c.rope_parameters.update(rope_theta=1234.0),
        lambda c: setattr(c, "rope_theta", 99.0),
        lambda c: setattr(c, "hidden_act", "gelu"),
        lambda c: setattr(c, "vocab_size", c.vocab_size + 1),
        lambda c: setattr(c, "num_key_value_heads", 4),
        lambda c: setattr(c, "max_position_embeddings", 64),
    ],
)
def test_config_fields_that_change_activations_refuse_keys(change):
    src, _, _, _ = _models("eval")
    key = _key(src)
    change(src.config)
    assert model_fingerprint(src) != key.model.fingerprint
    with pytest.raises(ValueError, match="fingerprint"):
        steer(src, key)
    steer(src, key, check_fingerprint=False).remove()


def test_keys_with_the_first_fingerprint_format_still_apply():
    src, _, _, _ = _models("eval")
    key = _key(src)
    legacy = ModelInfo(
        key.model.name, legacy_model_fingerprint(src), key.model.hidden_size, key.model.num_layers
    )
    old = SteeringKey(key.vectors, key.layers, legacy)
    assert legacy.fingerprint != key.model.fingerprint
    assert fingerprint_matches(legacy.fingerprint, src)
    steer(src, old).remove()
    steer(src, [old, None]).remove()
    # the first format hashed the pad id: such keys need the config they were made with
    src.config.pad_token_id = 9
    assert not fingerprint_matches(legacy.fingerprint, src)
    with pytest.raises(ValueError, match="fingerprint"):
        steer(src, old)
    steer(src, key).remove()


def test_a_model_info_taken_from_the_model_accepts_what_steer_accepts():
    """The server checks keys against a ModelInfo (vLLM's model, or a meta skeleton of the
    config), not the HF model: an old-format key that steer() takes passes there too, and a
    CLI's refusal names its own flag."""
    src, _, _, _ = _models("eval")
    key = _key(src)
    info = ModelInfo.of(src)
    old = ModelInfo(info.name, legacy_model_fingerprint(src), info.hidden_size, info.num_layers)
    old.check(info, what="the key")
    assert info.to_dict() == key.model.to_dict()  # the legacy fingerprint is never saved
    assert "legacy_fingerprint" not in info.to_dict()
    other = ModelInfo(info.name, "0" * 16, info.hidden_size, info.num_layers)
    with pytest.raises(ValueError, match="pass check_fingerprint=False"):
        other.check(info, what="the key")
    with pytest.raises(ValueError, match="pass --no-check-fingerprint if"):
        other.check(info, what="the key", override="pass --no-check-fingerprint")
    other.check(info, what="the key", check_fingerprint=False)
