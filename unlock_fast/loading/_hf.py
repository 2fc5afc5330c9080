"""Small adapters over transformers: its log noise, its progress bars, its dtype keyword."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers
from transformers.utils import logging as hf_logging

__all__ = ["dtype_kwarg", "hf_progress", "quiet_transformers"]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' log warnings that do not apply to a converted local checkpoint
    (e.g. the tokenizer-regex notice of transformers 4.57.3-4.57.x for any local tokenizer)."""
    names = ["transformers.tokenization_utils_base", "transformers.models.llama"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


@contextmanager
def hf_progress(show: bool) -> Iterator[None]:
    """Hide transformers' own progress bars (weight loading) unless ``show``."""
    was = hf_logging.is_progress_bar_enabled()
    if not show and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword: ``dtype`` since transformers 4.56, else
    ``torch_dtype``."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
