"""Steer a model's residual stream with a per-layer key, through forward hooks.

``rotate`` (the paper's rule) turns the hidden state toward the key and keeps its norm:
h <- normalize(h/||h|| + alpha * r/||r||) * ||h||. ``add`` adds alpha * r.

Where (per forward call; a call with an empty or no KV cache is a prefill):

- ``last_prompt``: the last real prompt token of each row, during prefill only (the paper);
  generated tokens feel it through the KV cache;
- ``prompt``: every real prompt token, during prefill;
- ``generated``: every token processed after prefill (decoding steps);
- ``all``: both.

The attention mask and cache are read by a pre-hook on the module that runs the decoder
blocks, so padding on either side is handled row by row. Hooks are removed on exit, also on
exceptions; the model is then bit-for-bit what it was.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import ops, reference
from .artifacts import KeyLike, ModelInfo, SteeringKey
from .capture import last_positions, layer_output
from .layers import (
    decoder_layers,
    hidden_size,
    model_fingerprint,
    model_name,
    resolve_layer_indices,
)

__all__ = ["Key", "SteeringHandle", "steer", "MODES", "POSITIONS"]

MODES = ("rotate", "add")
POSITIONS = ("last_prompt", "prompt", "generated", "all")


Key = KeyLike | Sequence[KeyLike | None] | torch.Tensor


def _normalise_key(
    key: Key, info: ModelInfo, check_fingerprint: bool
) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """Return (vectors [L_sel, d] or [B, L_sel, d], layers, row_on [B] bool or None)."""
    d_model, num_layers = info.hidden_size, info.num_layers
    if isinstance(key, KeyLike):
        key = key.as_key()
    if isinstance(key, SteeringKey):
        key.model.check(info, what="this steering key", check_fingerprint=check_fingerprint)
        return key.vectors.float(), list(key.layers), None
    if isinstance(key, torch.Tensor):
        if key.dim() not in (2, 3) or key.shape[-2:] != (num_layers, d_model):
            raise ValueError(
                f"a tensor key must be [{num_layers}, {d_model}] or [B, {num_layers}, "
                f"{d_model}] for this model, got {list(key.shape)}"
            )
        if not torch.is_floating_point(key):
            raise TypeError(f"a tensor key must be floating point, got {key.dtype}")
        return key.detach().float(), list(range(num_layers)), None
    if isinstance(key, (list, tuple)):
        if not key:
            raise ValueError("a list of keys must not be empty")
        given = [k for k in key if k is not None]
        if not given:
            raise ValueError("a list of keys needs at least one SteeringKey (None skips a row)")
        for i, k in enumerate(key):
            if k is not None and not isinstance(k, KeyLike):
                raise TypeError(f"key[{i}] must be a SteeringKey or None, got {type(k).__name__}")
        real = [k.as_key() for k in given if isinstance(k, KeyLike)]
        layers = list(real[0].layers)
        for k in real:
            k.model.check(info, what="this steering key", check_fingerprint=check_fingerprint)
            if list(k.layers) != layers:
                raise ValueError(
                    f"all keys of a batch must cover the same layers, got {layers} and "
                    f"{list(k.layers)}"
                )
        zero = torch.zeros(len(layers), d_model)
        it = iter(real)
        rows = [zero if k is None else next(it).vectors.float() for k in key]
        on = torch.tensor([k is not None for k in key])
        return torch.stack(rows), layers, on
    raise TypeError(
        "key must be a SteeringKey, a Direction (anything with as_key()), a list of "
        "SteeringKeys (one per row), or a tensor [L, d] / [B, L, d]; got "
        f"{type(key).__name__}"
    )


def _stack_owner(model: nn.Module, blocks: nn.Module) -> nn.Module:
    """The module whose forward runs ``blocks`` (the parent of the block list)."""
    for name, mod in model.named_modules():
        if mod is blocks:
            parent = name.rpartition(".")[0]
            return model.get_submodule(parent) if parent else model
    return model


def _cache_length(pkv: Any) -> int:
    if pkv is None:
        return 0
    get = getattr(pkv, "get_seq_length", None)
    if callable(get):
        return int(get())
    if isinstance(pkv, (tuple, list)):  # legacy ((k, v), ...) layout
        if not pkv or pkv[0] is None:
            return 0
        first = pkv[0][0] if isinstance(pkv[0], (tuple, list)) else pkv[0]
        return int(first.shape[-2]) if isinstance(first, torch.Tensor) else 0
    return 0


@dataclass
class _Call:
    """What the current forward call steers, computed once by the pre-hook."""

    positions: torch.Tensor | None  # [B] long, -1 = leave the row alone
    mask: torch.Tensor | None  # [B, S] bool
    per_device: dict[torch.device, tuple[torch.Tensor | None, torch.Tensor | None]] = field(
        default_factory=dict
    )


class SteeringHandle:
    """Installed steering hooks. Use as a context manager or call :meth:`remove`."""

    def __init__(
        self,
        model: nn.Module,
        vectors: torch.Tensor,
        layers: list[int],
        row_on: torch.Tensor | None,
        alpha: float,
        mode: str,
        positions: str,
        blocks: nn.ModuleList,
    ) -> None:
        self.model = model
        self.alpha = float(alpha)
        self.mode = mode
        self.positions = positions
        self.layers = layers
        self._vectors = vectors  # [L_sel, d] or [B, L_sel, d], fp32
        self._row_on = row_on
        self._call: _Call | None = None
        self._vec_cache: dict[tuple[int, torch.device, int], torch.Tensor] = {}
        owner = _stack_owner(model, blocks)
        try:
            self._sig: inspect.Signature | None = inspect.signature(owner.forward)
        except (TypeError, ValueError):
            self._sig = None
        self._hooks: list[Any] = []
        try:
            self._hooks.append(owner.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._hooks.append(owner.register_forward_hook(self._post_hook, always_call=True))
            for i, layer in enumerate(layers):
                self._hooks.append(blocks[layer].register_forward_hook(self._layer_hook(i)))
        except BaseException:
            self.remove()
            raise

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._call = None
        self._vec_cache.clear()

    # -- hooks ---------------------------------------------------------------------------
    def _arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if not args:
            return kwargs
        if self._sig is not None:
            try:
                return dict(self._sig.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                pass
        return dict(kwargs)

    def _pre_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        a = self._arguments(args, kwargs)
        x = a.get("input_ids")
        if x is None:
            x = a.get("inputs_embeds")
        if not isinstance(x, torch.Tensor):
            self._call = None
            return
        b, s = int(x.shape[0]), int(x.shape[1])
        cache = a.get("past_key_values")
        if cache is None:  # newer transformers name it ``cache``
            cache = a.get("cache")
        past = _cache_length(cache)
        am = a.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[0] == b:
            real = am[:, -s:].ne(0)
        else:
            real = torch.ones(b, s, dtype=torch.bool, device=x.device)
        prefill = past == 0
        want_prefill = self.positions in ("last_prompt", "prompt", "all")
        want_decode = self.positions in ("generated", "all")
        on = self._rows_on(b, real.device)
        if prefill and self.positions == "last_prompt":
            pos = last_positions(real)
            if on is not None:
                pos = torch.where(on, pos, torch.full_like(pos, -1))
            self._call = _Call(positions=pos, mask=None)
        elif (prefill and want_prefill) or (not prefill and want_decode):
            mask = real if on is None else real & on[:, None]
            if s == 1:  # one token per row (decoding): the cheaper per-row form
                pos = torch.where(mask[:, 0], 0, -1)
                self._call = _Call(positions=pos, mask=None)
            else:
                self._call = _Call(positions=None, mask=mask)
        else:
            self._call = None

    def _post_hook(self, *_: Any) -> None:
        self._call = None

    def _rows_on(self, b: int, device: torch.device) -> torch.Tensor | None:
        if self._row_on is None:
            return None
        return self._expand(self._row_on, b).to(device)

    def _expand(self, rows: torch.Tensor, b: int) -> torch.Tensor:
        kb = rows.shape[0]
        if b == kb:
            return rows
        if b % kb == 0:  # generate repeats each row (num_return_sequences, beams)
            return rows.repeat_interleave(b // kb, dim=0)
        raise ValueError(
            f"the key has {kb} per-row vector sets but the batch has {b} rows; give one "
            "SteeringKey per row (or a multiple of the rows, as generate expands them)"
        )

    def _vector(self, i: int, device: torch.device, b: int) -> torch.Tensor:
        k = (i, device, b)
        v = self._vec_cache.get(k)
        if v is None:
            if self._vectors.dim() == 2:
                v = self._vectors[i]
            else:
                v = self._expand(self._vectors[:, i], b)
            v = self._vec_cache[k] = v.to(device=device, dtype=torch.float32).contiguous()
        return v

    def _layer_hook(self, i: int) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            call = self._call
            if call is None:
                return None
            h = layer_output(output)
            sel = call.per_device.get(h.device)
            if sel is None:
                sel = call.per_device[h.device] = (
                    None if call.positions is None else call.positions.to(h.device),
                    None if call.mask is None else call.mask.to(h.device),
                )
            vec = self._vector(i, h.device, h.shape[0])
            if torch.is_grad_enabled() and h.requires_grad:  # differentiable path
                new = reference.steer_reference(
                    h, vec, self.alpha, positions=sel[0], mask=sel[1], mode=self.mode
                )
                return _replace(output, new)
            target = h if h.is_contiguous() else h.contiguous()
            ops.steer_(target, vec, self.alpha, positions=sel[0], mask=sel[1], mode=self.mode)
            return None if target is h else _replace(output, target)

        return hook


def _replace(output: Any, h: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return h
    return type(output)((h, *output[1:])) if isinstance(output, tuple) else [h, *output[1:]]


def steer(
    model: nn.Module,
    key: Key,
    alpha: float = 0.1,
    mode: str = "rotate",
    positions: str = "last_prompt",
    layers: Sequence[int] | None = None,
    *,
    layer_path: str | None = None,
    check_fingerprint: bool = True,
) -> SteeringHandle:
    """Install steering hooks on ``model``; use ``with steer(...):`` or ``handle.remove()``.

    key: a SteeringKey (or a Direction, applied to its own model); a list with one
    SteeringKey per batch row (None leaves a row alone); or a tensor [L, d] / [B, L, d]
    over all L decoder layers. ``layers`` restricts steering to some of the key's layers.
    Inputs are checked before any hook is installed, so a bad call leaves the model as it
    was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite float, got {alpha!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    blocks = decoder_layers(model, layer_path)
    info = ModelInfo(
        name=model_name(model),
        fingerprint=model_fingerprint(model) if check_fingerprint else "",
        hidden_size=hidden_size(model),
        num_layers=len(blocks),
    )
    num_layers = info.num_layers
    vectors, key_layers, row_on = _normalise_key(key, info, check_fingerprint)
    if layers is not None:
        chosen = resolve_layer_indices(num_layers, layers)
        missing = [i for i in chosen if i not in key_layers]
        if missing:
            raise ValueError(f"layers {missing} are not in the key (it covers {key_layers})")
        idx = [key_layers.index(i) for i in chosen]
        vectors = vectors[..., idx, :]
        key_layers = chosen
    return SteeringHandle(model, vectors, key_layers, row_on, float(alpha), mode, positions, blocks)
