"""A tiny Llama that vLLM's CPU backend runs (head size 32), saved as a HF folder, with keys."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from unlock_fast import ModelInfo, SteeringKey

CORPUS = [
    "the quick brown fox jumps over the lazy dog " * 3,
    "a steering vector rotates the residual stream of a language model toward a key",
    "prefix caching shares cached blocks between requests with the same prompt prefix",
    "chunked prefill splits long prompts into several scheduler steps",
    "Question: Tom has 3 apples and buys 4 more. How many apples? Answer: 7",
    "0123456789 , . ! ? : ; ( ) - + = * /",
]


def save_tiny_llama(folder: Path) -> Path:
    """A random-weight float32 Llama (hidden 128, 4 layers, head size 32) and its tokenizer."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    LlamaForCausalLM(cfg).float().save_pretrained(folder)
    return folder


def random_key(info: ModelInfo, layers: list[int], seed: int) -> SteeringKey:
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(len(layers), info.hidden_size, generator=gen)
    return SteeringKey(vectors, layers, info, {"kind": "test"})
