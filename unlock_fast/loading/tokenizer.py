"""Tokenizers for loaded models: the rebuild of a GGUF SentencePiece-BPE vocabulary (Gemma's)
as a fast BPE tokenizer, and the padding setup for batched generation.

transformers converts Gemma GGUF vocabularies into a Unigram model whose scores are BPE merge
ranks, which splits common words into fragments (" world" -> " w", "or", "ld"). SentencePiece
BPE instead merges, at each step, the adjacent pair whose joined piece has the highest score;
a BPE model whose merges are ranked by that score does exactly this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

if TYPE_CHECKING:
    import numpy.typing as npt
    from gguf import GGUFReader

__all__ = [
    "gguf_scalar",
    "prepare_tokenizer",
    "rebuilds_gguf_vocabulary",
    "sentencepiece_bpe_tokenizer",
]

TokenizerT = TypeVar("TokenizerT", bound=PreTrainedTokenizerBase)

# llama.cpp token types (tokenizer.ggml.token_type)
_NORMAL, _CONTROL, _USER_DEFINED, _BYTE = 1, 3, 4, 6

# tokenizer.ggml.<key>_token_id -> the tokenizer's attribute
_SPECIAL_NAMES = {
    "bos": "bos_token",
    "eos": "eos_token",
    "unknown": "unk_token",
    "padding": "pad_token",
}


def _gguf_values(reader: GGUFReader, key: str) -> list[npt.NDArray[Any]] | None:
    """The raw values of a GGUF metadata field (one array per element), None if absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    return [field.parts[i] for i in field.data]


def gguf_scalar(reader: GGUFReader, key: str) -> str | int | float | bool | None:
    """A single-valued GGUF metadata field as a Python value (strings decoded), or None."""
    vals = _gguf_values(reader, key)
    if not vals:
        return None
    v = vals[0]
    if v.dtype.kind == "u" and v.dtype.itemsize == 1:
        return bytes(v).decode("utf-8")  # a string
    value: str | int | float | bool = v.tolist()[0]
    return value


def rebuilds_gguf_vocabulary(reader: GGUFReader) -> bool:
    """Whether :func:`sentencepiece_bpe_tokenizer` replaces transformers' own conversion of
    this file's vocabulary: a SentencePiece vocabulary (``llama``) of a Gemma model."""
    arch = gguf_scalar(reader, "general.architecture")
    spm = gguf_scalar(reader, "tokenizer.ggml.model") == "llama"
    return spm and str(arch).startswith("gemma")


def sentencepiece_bpe_tokenizer(reader: GGUFReader) -> PreTrainedTokenizerFast:
    """A fast tokenizer for a GGUF SentencePiece-BPE vocabulary (Gemma's).

    Reads ``tokenizer.ggml.{tokens,scores,token_type}``, the bos/eos/unknown/padding ids,
    ``add_bos_token``/``add_eos_token`` and ``tokenizer.chat_template``. Normal pieces merge by
    score; control tokens become special tokens, user-defined ones plain added tokens, and
    byte tokens (``<0x41>``) give byte fallback for characters outside the vocabulary.
    """
    tokens = [bytes(p).decode("utf-8") for p in _gguf_values(reader, "tokenizer.ggml.tokens") or []]
    scores = [float(p[0]) for p in _gguf_values(reader, "tokenizer.ggml.scores") or []]
    types = [int(p[0]) for p in _gguf_values(reader, "tokenizer.ggml.token_type") or []]
    if not tokens or len(scores) != len(tokens) or len(types) != len(tokens):
        raise ValueError(
            "GGUF file lacks a complete SentencePiece vocabulary (tokens/scores/types): got "
            f"{len(tokens)} tokens, {len(scores)} scores, {len(types)} types"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[float, int, str, str]] = []
    for i, (piece, ty) in enumerate(zip(tokens, types, strict=True)):
        if ty != _NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            ia, ib = vocab.get(a), vocab.get(b)
            if ia is not None and ib is not None and types[ia] == _NORMAL and types[ib] == _NORMAL:
                merges.append((-scores[i], i, a, b))
    merges.sort()
    ids = {k: gguf_scalar(reader, f"tokenizer.ggml.{k}_token_id") for k in _SPECIAL_NAMES}
    named = {
        _SPECIAL_NAMES[k]: tokens[i]
        for k, i in ids.items()
        if isinstance(i, int) and 0 <= i < len(tokens)
    }
    bpe = models.BPE(
        vocab=vocab,
        merges=[(a, b) for _, _, a, b in merges],
        unk_token=named.get("unk_token"),
        fuse_unk=True,
        byte_fallback=any(t == _BYTE for t in types),
    )
    tk = Tokenizer(bpe)
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tk.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _CONTROL
        ]
    )
    tk.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _USER_DEFINED
        ]
    )
    add_bos = gguf_scalar(reader, "tokenizer.ggml.add_bos_token")
    add_eos = gguf_scalar(reader, "tokenizer.ggml.add_eos_token")
    if add_bos or add_eos:
        bos, eos = named.get("bos_token"), named.get("eos_token")
        single = (
            ([f"{bos}:0"] if add_bos and bos else [])
            + ["$A:0"]
            + ([f"{eos}:0"] if add_eos and eos else [])
        )
        pair = single + [s.replace("$A", "$B").replace(":0", ":1") for s in single]
        specials = [
            (t, vocab[t]) for t in (bos if add_bos else None, eos if add_eos else None) if t
        ]
        tk.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=specials
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, model_input_names=["input_ids", "attention_mask"], **named
    )
    template = gguf_scalar(reader, "tokenizer.chat_template")
    if isinstance(template, str):
        fast.chat_template = template
    return fast


def prepare_tokenizer(tokenizer: TokenizerT, *, padding_side: str = "left") -> TokenizerT:
    """Give the tokenizer a pad token (eos, else unk) and left padding for batched generation."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if tokenizer.pad_token is None:
        for tok in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
            if tok is not None:
                tokenizer.pad_token = tok
                break
        else:
            raise ValueError("tokenizer has no pad, eos, unk or bos token to pad with")
    tokenizer.padding_side = padding_side
    return tokenizer
