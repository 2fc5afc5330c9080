"""Load Hugging Face causal LMs from hub ids, local folders or GGUF files.

- :mod:`.resolve`: model names and paths -> what to load (shipped models, cache folder, dtype);
- :mod:`.gguf`: GGUF files -> a cached safetensors folder (needs the ``gguf`` extra);
- :mod:`.tokenizer`: the rebuild of Gemma's GGUF vocabulary, padding for generation;
- :mod:`.model`: :func:`load_model`, which puts these together.
"""

from __future__ import annotations

from .model import load_model, weights_source
from .resolve import (
    SHIPPED_MODELS,
    ModelNotFoundError,
    cache_root,
    gemma3_270m_gguf,
    parse_dtype,
    resolve_model,
    smollm2_135m_instruct_gguf,
)
from .tokenizer import prepare_tokenizer

__all__ = [
    "SHIPPED_MODELS",
    "ModelNotFoundError",
    "cache_root",
    "gemma3_270m_gguf",
    "load_model",
    "parse_dtype",
    "prepare_tokenizer",
    "resolve_model",
    "smollm2_135m_instruct_gguf",
    "weights_source",
]
