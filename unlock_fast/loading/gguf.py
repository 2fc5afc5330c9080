"""GGUF files -> a cached safetensors folder.

GGUF files are dequantised by transformers (``gguf_file=``), which takes 30-90 s for a small
model on a CPU. The converted weights are saved once as safetensors in a cache folder
(``~/.cache/unlock-fast``, or ``$UNLOCK_FAST_CACHE``) and later loads read them directly.
The ``gguf`` package is optional (extra ``gguf``); it is imported only to convert.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .._optional import require
from ._hf import dtype_kwarg, quiet_transformers
from .resolve import PathArg, ResolvedModel, cache_root
from .tokenizer import rebuilds_gguf_vocabulary, sentencepiece_bpe_tokenizer

if TYPE_CHECKING:
    from gguf import GGUFReader

__all__ = ["convert_gguf", "gguf_cache_path"]

# Held while gguf.GGUFReader is swapped: conversions in two threads run one after the other.
_READER_PATCH_LOCK = threading.RLock()
_READER_ATTR = "GGUFReader"


def _file_fingerprint(path: Path, block: int = 1 << 22) -> str:
    """sha256 of size, head and tail: cheap and changes with any re-download."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(block))
        if size > block:
            f.seek(max(size - block, block))
            h.update(f.read(block))
    return h.hexdigest()[:16]


def gguf_cache_path(gguf_path: PathArg, cache_dir: PathArg | None = None) -> Path:
    """Folder where the safetensors conversion of a GGUF file is (or will be) kept."""
    p = Path(gguf_path)
    key = f"{p.stem}-{_file_fingerprint(p)}-tf{transformers.__version__}"
    return cache_root(cache_dir) / "converted" / key


@contextmanager
def _one_gguf_parse() -> Iterator[Callable[..., GGUFReader]]:
    """Share one ``gguf.GGUFReader`` per file while converting; yields the sharing factory.

    transformers parses a GGUF file's metadata separately for the tokenizer, the config and
    the weights, with no way to hand it a parsed reader; with a 262k-token vocabulary each
    parse takes 15-45 s on a small CPU. The reader is read-only (a memory map), so one
    instance serves all three: ``gguf.GGUFReader`` (which transformers imports at call time)
    is swapped for a caching factory for the duration of the block only, under a lock.
    """
    gguf = require("gguf", "gguf", "Loading GGUF files")
    with _READER_PATCH_LOCK:
        original: Callable[..., GGUFReader] = getattr(gguf, _READER_ATTR)
        readers: dict[tuple[str, str], GGUFReader] = {}

        def shared(path: PathArg, mode: str = "r") -> GGUFReader:
            key = (os.path.realpath(path), mode)
            if key not in readers:
                readers[key] = original(path, mode)
            return readers[key]

        # why: transformers parses the file 3 times (tokenizer, config, weights); parse it once
        setattr(gguf, _READER_ATTR, shared)
        try:
            yield shared
        finally:
            setattr(gguf, _READER_ATTR, original)


def convert_gguf(resolved: ResolvedModel, dest: Path, progress: bool) -> None:
    """Dequantise a GGUF file with transformers and save model + tokenizer as safetensors."""
    if resolved.gguf_file is None:
        raise ValueError(f"convert_gguf needs a GGUF file, got {resolved.name_or_path!r} only")
    require("gguf", "gguf", "Loading GGUF files")
    # transformers refuses gguf_file= without accelerate
    require("accelerate", "accelerate", "Converting GGUF files with transformers")
    if progress:
        print(
            f"Converting {Path(resolved.gguf_file).name} to safetensors "
            f"(once; cached in {dest.parent})...",
            file=sys.stderr,
            flush=True,
        )
    kwargs: dict[str, Any] = {"gguf_file": resolved.gguf_file}
    with _one_gguf_parse() as reader_for, quiet_transformers():
        reader = reader_for(resolved.gguf_file)
        tok: PreTrainedTokenizerBase
        if rebuilds_gguf_vocabulary(reader):
            tok = sentencepiece_bpe_tokenizer(reader)
        else:
            tok = AutoTokenizer.from_pretrained(resolved.name_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            resolved.name_or_path, **kwargs, **dtype_kwarg(torch.float32)
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    # The weights are dequantised now; newer transformers refuse to save a model that still
    # carries its GGUF quantizer, so drop it and its config entry.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if dest.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
