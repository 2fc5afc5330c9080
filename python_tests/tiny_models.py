"""Tiny random-weight Hugging Face models and offline tokenizers for the pipeline tests."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SENTENCES = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Question: A train travels 60 miles in 2 hours. What is its speed?",
    "Answer: Let's think step by step.",
    "Answer:",
    "The final answer is 7.",
    "Sara reads 12 pages a day for 5 days. How many pages does she read?",
    "There are 9 birds on a tree and 4 fly away. How many are left?",
    "A box holds 6 eggs. How many eggs are in 8 boxes?",
    "the cat sat on the mat while the dog slept near the door",
    "one two three four five six seven eight nine ten eleven twelve",
]

PROMPTS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:",
    "Question: A train travels 60 miles in 2 hours. What is its speed?\nAnswer:",
    "Question: Sara reads 12 pages a day for 5 days. How many pages?\nAnswer:",
    "Question: There are 9 birds and 4 fly away. How many are left?\nAnswer:",
    "Question: A box holds 6 eggs. How many eggs are in 8 boxes?\nAnswer:",
    "the cat sat on the mat",
    "one two three",
    "Question: How many?",
    "seven eight nine ten eleven twelve the dog slept near the door",
    "Answer: Let's think step by step.",
    "the final answer is 7",
    "A",
]

SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def _wrap(tok: Tokenizer, padding_side: str) -> PreTrainedTokenizerFast:
    bos = tok.token_to_id("[BOS]")
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        padding_side=padding_side,
        model_input_names=["input_ids", "attention_mask"],
    )


@functools.cache
def _word_level() -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.train_from_iterator(SENTENCES + PROMPTS, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    return tok


@functools.cache
def _bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES + PROMPTS, trainer)
    return tok


def word_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A word-level tokenizer (about 100 tokens)."""
    return _wrap(Tokenizer.from_str(_word_level().to_str()), padding_side)


def bpe_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (300 tokens): a different vocabulary from word_tokenizer."""
    return _wrap(Tokenizer.from_str(_bpe().to_str()), padding_side)


def _common(vocab: int) -> dict:
    return dict(vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=3)


# Decoders built the same way: config class, default hidden size and depth, extra settings.
_GQA = {"num_key_value_heads": 2}
_DECODERS: dict[str, tuple[type, int, int, dict]] = {
    "llama": (LlamaConfig, 32, 3, _GQA),
    "qwen2": (Qwen2Config, 48, 5, _GQA),
    "gemma3": (Gemma3TextConfig, 40, 4, {**_GQA, "head_dim": 16, "sliding_window": 8}),
    "gpt_neox": (GPTNeoXConfig, 36, 3, {"max_position_embeddings": 128}),
}


def make_model(
    arch: str, vocab: int, *, seed: int = 0, hidden: int | None = None, layers: int | None = None
) -> torch.nn.Module:
    """A tiny random model of ``arch`` in eval mode with eager attention."""
    if arch in _DECODERS:
        cls, h0, n0, extra = _DECODERS[arch]
        h, n = hidden or h0, layers or n0
        cfg = cls(
            hidden_size=h,
            intermediate_size=2 * h,
            num_hidden_layers=n,
            num_attention_heads=4,
            **extra,
            **_common(vocab),
        )
    elif arch == "gpt2":
        h, n = hidden or 24, layers or 2
        cfg = GPT2Config(n_embd=h, n_layer=n, n_head=4, n_positions=128, **_common(vocab))
    else:
        raise ValueError(arch)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.eval()


def save_pair(
    root: os.PathLike[str] | str,
    *,
    target_arch: str = "gemma3",
    target_hidden: int = 40,
    target_layers: int = 4,
    target_seed: int = 1,
) -> dict[str, str]:
    """A tiny Source (llama, BPE tokenizer) and Target (word tokenizer) saved with their
    tokenizers under ``root``/src and ``root``/tgt, as the command line loads them."""
    out = {}
    for name, arch, tok, kw in [
        ("src", "llama", bpe_tokenizer(), {"hidden": 32, "layers": 3}),
        ("tgt", target_arch, word_tokenizer(), {
            "hidden": target_hidden, "layers": target_layers, "seed": target_seed
        }),
    ]:  # fmt: skip
        path = Path(root) / name
        make_model(arch, len(tok), **kw).save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = str(path)
    return out
