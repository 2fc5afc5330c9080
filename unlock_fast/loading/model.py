"""``load_model``: a causal LM and its tokenizer from any model argument, ready to generate."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .._optional import require
from ._hf import dtype_kwarg, hf_progress, quiet_transformers
from .gguf import convert_gguf, gguf_cache_path
from .resolve import PathArg, ResolvedModel, parse_dtype, resolve_model
from .tokenizer import prepare_tokenizer

if TYPE_CHECKING:  # transformers' modeling stack takes seconds to import
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["load_model", "weights_source"]

DeviceMap = str | dict[str, int | str | torch.device]


def weights_source(
    resolved: ResolvedModel, *, cache_dir: PathArg | None = None, progress: bool = True
) -> str:
    """A hub id or a folder of HF weights for ``resolved``; a GGUF file is converted once
    into the cache and its folder returned (what ``unlock-fast serve`` hands vLLM)."""
    if resolved.gguf_file is None:
        return resolved.name_or_path
    dest = gguf_cache_path(resolved.gguf_file, cache_dir)
    if not (dest / "config.json").is_file():
        convert_gguf(resolved, dest, progress)
    return str(dest)


def load_model(
    name_or_path: PathArg,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    device_map: DeviceMap | None = None,
    cache_dir: PathArg | None = None,
    padding_side: str = "left",
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched prefill and generation.

    Args:
        name_or_path: hub id, local folder, path to a ``.gguf`` file, or a shipped model name
            (``gemma-3-270m``, ``smollm2-135m-instruct``).
        gguf_file: GGUF file inside the folder / hub repo ``name_or_path``.
        dtype: ``"auto"`` (float32 on CPU, bfloat16 on CUDA), a name or a ``torch.dtype``.
        device: where to put the model (default ``"cpu"``); ignored with ``device_map``.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to spread over GPUs);
            needs the optional ``accelerate`` package.
        cache_dir: folder for converted GGUF weights (default ``~/.cache/unlock-fast``).
        padding_side: tokenizer padding side (``"left"`` suits ``generate``).
        progress: print a note before a GGUF conversion and show transformers' progress bars.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer has a pad token.
    """
    if device is not None and device_map is not None:
        raise ValueError("give either device or device_map, not both")
    if device is None:
        device = "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:1', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if device_map is not None:
        require("accelerate", "accelerate", "Loading with device_map")
    torch_dtype = parse_dtype(dtype, dev)

    resolved = resolve_model(name_or_path, gguf_file=gguf_file, cache_dir=cache_dir)
    source = weights_source(resolved, cache_dir=cache_dir, progress=progress)

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source)
    kwargs: dict[str, object] = {**dtype_kwarg(torch_dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    with hf_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device_map is None and dev.type != "cpu":
        model = model.to(dev)  # type: ignore[arg-type]  # transformers' wrapper of .to
    model.eval()
    model.config._name_or_path = resolved.display_name  # the name artifacts record
    prepare_tokenizer(tokenizer, padding_side=padding_side)
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
