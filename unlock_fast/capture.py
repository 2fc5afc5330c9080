"""Read residual-stream activations of decoder layers with forward hooks.

The output of decoder layer ``l`` is the residual stream after that block, the tensor HF
returns as ``hidden_states[l + 1]`` (before the final norm, which HF applies to its last
entry). Rows are taken at the last real prompt token of each row (found from the attention
mask, whichever side the padding is on) or at every real token. Each batch is a prefill
pass with no cache and no generation; the forward stops after the deepest layer needed.
Rows are handed on per batch, so callers stream them into accumulators instead of keeping
them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from .layers import decoder_layers, input_device

__all__ = [
    "CapturedBatch",
    "plan_batches",
    "iter_activations",
    "layer_output",
    "last_positions",
    "progress_bar",
]

_ROW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _StopForward(Exception):
    """Raised by the deepest hook to skip the rest of the network."""


def layer_output(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a decoder layer's output (a tensor or a tuple/list)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"decoder layer returned {type(output).__name__}; expected a tensor or a tuple whose "
        "first entry is the hidden states. Name the right blocks with layer_path=..."
    )


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a [B, S] mask (any padding side).

    A row with no real token (all zeros) has no such index: ValueError naming the row.
    """
    real = attention_mask.ne(0)
    empty = ~real.any(dim=1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"row {row} of the batch has no real token (its attention mask is all zeros); "
            "every row needs at least one"
        )
    ar = torch.arange(real.shape[1], device=real.device)
    return (real.long() * ar).argmax(dim=1)


def _tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int | None) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
    enc = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    out: list[list[int]] = []
    for i, ids in enumerate(enc):
        ids = list(ids)
        if max_length is not None:
            ids = ids[-max_length:]  # keep the end: the last token is what we read
        if not ids:
            raise ValueError(f"prompts[{i}] tokenizes to no tokens")
        out.append(ids)
    return out


def _pad(seqs: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def plan_batches(
    tokenizer: Any, prompts: Sequence[str], batch_size: int, max_length: int | None = None
) -> list[list[int]]:
    """Prompt indices grouped into batches of similar length (longest first)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    lengths = [len(t) for t in _tokenize(tokenizer, prompts, max_length)]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class CapturedBatch:
    """Activations of one batch.

    indices: the prompt indices of the batch, in row order.
    rows: {layer: [n, d]} with n = len(indices) (last token) or the number of real tokens.
    token_ids: the real token ids in row order, [n] (token level) or the last ones [B].
    """

    indices: list[int]
    rows: dict[int, torch.Tensor]
    token_ids: torch.Tensor


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def iter_activations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    batches: list[list[int]] | None = None,
    layer_path: str | None = None,
    token_level: bool = False,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_length: int | None = None,
    padding_side: str | None = None,
) -> Generator[CapturedBatch, None, None]:
    """Yield the activations of ``layers`` for each batch of ``prompts``.

    ``batches`` (lists of prompt indices) fixes the grouping, so that two models can be run
    on the same rows in the same order. Rows go to ``device`` (default: the device of the
    input embeddings) and to ``dtype`` (default: the layer's dtype if it is fp32, fp16 or
    bf16, else fp32). Each forward runs in eval mode; every module's train/eval mode is put
    back right after it, so the model is as it was whenever a batch is handed out.
    """
    blocks = decoder_layers(model, layer_path)
    layers = sorted(set(layers))
    if not layers or layers[0] < 0 or layers[-1] >= len(blocks):
        raise ValueError(f"layers must be indices in [0, {len(blocks)}), got {layers}")
    if dtype is not None and dtype not in _ROW_DTYPES:
        raise ValueError(f"dtype must be one of {_ROW_DTYPES} or None, got {dtype}")
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    tokens = _tokenize(tokenizer, prompts, max_length)
    if batches is None:
        batches = plan_batches(tokenizer, prompts, batch_size, max_length)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    dev_in = input_device(model)
    dev_out = torch.device(device) if device is not None else dev_in
    use_pos = _accepts(model, "position_ids")
    deepest = layers[-1]

    state: dict[str, Any] = {}
    store: dict[int, torch.Tensor] = {}

    def make_hook(idx: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            h = layer_output(output)
            sel = state["select"].get(h.device)
            if sel is None:
                sel = state["select"][h.device] = state["select_src"].to(h.device)
            rows = h[sel] if token_level else h[torch.arange(h.shape[0], device=h.device), sel]
            out_dtype = dtype or (rows.dtype if rows.dtype in _ROW_DTYPES else torch.float32)
            store[idx] = rows.detach().to(device=dev_out, dtype=out_dtype)
            if idx == deepest:
                raise _StopForward

        return hook

    for idx in batches:
        ids, mask = _pad([tokens[i] for i in idx], int(pad_id), side)
        if token_level:
            sel = mask.bool()
            tok = ids[sel]
        else:
            sel = last_positions(mask)
            tok = ids[torch.arange(len(idx)), sel]
        state["select_src"] = sel
        state["select"] = {}
        store.clear()
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(dev_in),
            "attention_mask": mask.to(dev_in),
            "use_cache": False,
        }
        if use_pos:
            kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp_min(0).to(dev_in)
        _forward(model, kwargs, [blocks[i].register_forward_hook(make_hook(i)) for i in layers])
        missing = [i for i in layers if i not in store]
        if missing:
            raise RuntimeError(
                f"decoder layers {missing} did not run during the forward pass; check layer_path"
            )
        yield CapturedBatch(list(idx), dict(store), tok)


def _forward(model: nn.Module, kwargs: dict[str, Any], handles: list[RemovableHandle]) -> None:
    """One capture forward in eval mode. The hooks (``handles``) live only for this forward
    and every module's train/eval mode is put back right after it, so the model is as it was
    between batches: captures may interleave, and an abandoned one leaves nothing behind."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.inference_mode():
            model(**kwargs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over prompts (silent when ``enabled`` is False)."""
    return tqdm(total=total, desc=desc, unit="prompt", disable=not enabled, leave=False)
