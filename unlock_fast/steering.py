"""Steer a model's residual stream with a per-layer key, through forward hooks.

``rotate`` (the paper's rule) turns the hidden state toward the key and keeps its norm:
h <- normalize(h/||h|| + alpha * r/||r||) * ||h||. ``add`` adds alpha * r.

Where (``positions``):

- ``last_prompt``: the last real prompt token of each row (the paper); generated tokens feel
  it through the KV cache;
- ``prompt``: every real prompt token;
- ``generated``: every token after the prompt (decoding steps);
- ``all``: both.

Steering follows the prompt, not the cache: ``generate(..., use_cache=False)`` re-runs the
whole sequence at every step, and each re-run steers the same tokens as the prefill and the
decoding steps with a cache would (see :mod:`unlock_fast.steering_state` for how a re-run is
told from a new prompt). The attention mask and cache are read by a pre-hook on the module
that runs the decoder blocks, so padding on either side is handled row by row. A call
without an attention mask takes every token as real, and refuses a batch whose rows start or
end with the model's pad token id; a prompt row with no real token is an error. Hooks are
removed on exit, also on exceptions; the model is then bit-for-bit what it was.

Cost: the key, alpha and mode are checked once, when the hooks are installed, and each call's
positions or mask once per call and device; a layer hook then checks only the hidden states
and calls the kernel (:func:`unlock_fast.ops.steer_unchecked_`), which never synchronises
with the device. ``add`` keeps alpha·r and the kernel computes h + (alpha·r), one rounding:
the bits of torch's ``h.add_(alpha·r)``. When grad is on and the hidden states need it, a
layer step is the differentiable :func:`unlock_fast.reference.steer_reference` instead.

``torch.compile``: a steered model compiles without graph breaks from the hooks (also with
``fullgraph=True``). Under compilation the layer hooks call the same kernel entry as the
registered operator ``torch.ops.unlock_fast.steer_unchecked_`` and the pre-hook reads the
mask and cache without a host sync; see :mod:`unlock_fast.steering_state` for the two
refusals that become asynchronous assertions there, and for the one kind of call (a no-cache
re-run) that still compares tokens on the host (a graph break).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import reference
from .artifacts import KeyLike, ModelInfo, SteeringKey
from .capture import layer_output
from .layers import (
    decoder_layers,
    hidden_size,
    legacy_model_fingerprint,
    model_fingerprint,
    model_name,
    resolve_layer_indices,
)
from .ops.library import steer_unchecked_op
from .ops.steer import STEER_MODES, kernel_operands, steer_unchecked_
from .steering_state import POSITIONS, CallTracker

__all__ = ["Key", "SteeringHandle", "steer", "MODES", "POSITIONS"]

MODES = tuple(STEER_MODES)  # ("rotate", "add"): the kernel's modes, by name


Key = KeyLike | Sequence[KeyLike | None] | torch.Tensor


class _KeyCheck:
    """Checks keys against the model: shapes, and the config fingerprint in its current
    format or, for keys saved before that format, the first one."""

    def __init__(self, model: nn.Module, info: ModelInfo, check_fingerprint: bool) -> None:
        self.model, self.info, self.check_fingerprint = model, info, check_fingerprint
        self._legacy: str | None = None

    def __call__(self, key: SteeringKey) -> None:
        check = self.check_fingerprint and key.model.fingerprint != self.info.fingerprint
        if check:
            if self._legacy is None:
                self._legacy = legacy_model_fingerprint(self.model)
            check = key.model.fingerprint != self._legacy
        key.model.check(self.info, what="this steering key", check_fingerprint=check)


def _normalise_key(
    key: Key, info: ModelInfo, check: Callable[[SteeringKey], None]
) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """Return (vectors [L_sel, d] or [B, L_sel, d], layers, row_on [B] bool or None)."""
    d_model, num_layers = info.hidden_size, info.num_layers
    if isinstance(key, KeyLike):
        key = key.as_key()
    if isinstance(key, SteeringKey):
        check(key)
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
            check(k)
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


@dataclass
class _OnDevice:
    """A call's selection on one device, checked once for all the layers on it."""

    positions: torch.Tensor | None
    mask: torch.Tensor | None
    rows: tuple[int, ...]  # (B,) for positions, (B, S) for a mask: what hidden must match


@dataclass
class _Call:
    """What the current forward call steers, computed once by the pre-hook."""

    positions: torch.Tensor | None  # [B] long, -1 = leave the row alone
    mask: torch.Tensor | None  # [B, S] bool
    per_device: dict[int, _OnDevice] = field(default_factory=dict)  # by get_device()

    def on(self, h: torch.Tensor) -> _OnDevice:
        """The selection on ``h``'s device: moved there and checked the first time only."""
        sel = self.per_device.get(h.get_device())
        if sel is None:
            sel = _checked(self.positions, self.mask, h.device)
            self.per_device[h.get_device()] = sel
        return sel


def _checked(
    positions: torch.Tensor | None, mask: torch.Tensor | None, device: torch.device
) -> _OnDevice:
    """The selection in the form the unchecked kernel entry takes (int64 contiguous
    positions or a bool mask, on ``device``); ValueError when it is neither."""
    if positions is not None and mask is None:
        p = positions.to(device=device, dtype=torch.int64).contiguous()
        if p.dim() == 1:
            return _OnDevice(p, None, (int(p.shape[0]),))
    elif mask is not None and positions is None:
        m = mask if mask.device == device else mask.to(device)
        if m.dtype == torch.bool and m.dim() == 2:
            return _OnDevice(None, m, (int(m.shape[0]), int(m.shape[1])))
    raise ValueError("a steering call needs [B] int positions or a [B, S] bool mask")


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
        self._mode_code = STEER_MODES[mode]
        self.positions = positions
        self.layers = layers
        # add: alpha·r once here, so that h + (alpha·r) is one rounding, as torch's add_
        # [L_sel, d] or [B, L_sel, d], fp32; a shared key's per-layer rows ready for the kernel
        self._vectors, self._kernel_alpha = kernel_operands(vectors, self.alpha, mode)
        shared = self._vectors.dim() == 2
        self._rows = list(self._vectors.contiguous().unbind(0)) if shared else []
        self._row_on = row_on
        self._call: _Call | None = None
        self._tracker = CallTracker(model, positions)
        # (layer, h.get_device(), rows; 0 for a shared key) -> fp32 contiguous vector(s)
        self._vec_cache: dict[tuple[int, int, int], torch.Tensor] = {}
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
        self._tracker.reset()
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
        self._call = None
        sel = self._tracker.select(self._arguments(args, kwargs))
        if sel is None:
            return
        on = self._rows_on(int(sel.where.shape[0]), sel.where.device)
        if on is not None:
            sel = sel.only_rows(on)
        self._call = _Call(positions=sel.positions, mask=sel.mask)

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

    def _vector(self, i: int, h: torch.Tensor) -> torch.Tensor:
        shared = self._vectors.dim() == 2
        if shared and h.is_cpu and self._vectors.is_cpu:  # rows of the contiguous fp32 key
            return self._rows[i]
        k = (i, h.get_device(), 0 if shared else h.shape[0])
        v = self._vec_cache.get(k)
        if v is None:
            v = self._vec_cache[k] = self._vector_on(i, h)
        return v

    def _vector_on(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s vector for ``h``: fp32, contiguous, on its device, [d] for a shared
        key or [B, d] with the key's rows expanded to the batch."""
        v = (
            self._vectors[i]
            if self._vectors.dim() == 2
            else self._expand(self._vectors[:, i], h.shape[0])
        )
        return v.to(device=h.device, dtype=torch.float32).contiguous()

    def _layer_hook(self, i: int) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            call = self._call
            if call is None:
                return None
            h = layer_output(output)
            vec, sel = self._operands(i, h, call)
            alpha = self._kernel_alpha
            if torch.is_grad_enabled() and h.requires_grad:  # autograd: the reference rule
                new = reference.steer_reference(
                    h, vec, alpha, positions=sel.positions, mask=sel.mask, mode=self.mode
                )
                return _replace(output, new)
            target = h if h.is_contiguous() else h.contiguous()
            if target.shape[: len(sel.rows)] != sel.rows:
                raise ValueError(
                    f"the call selects tokens of a {list(sel.rows)} batch, but layer "
                    f"{self.layers[i]} returned hidden states of shape {list(target.shape)}"
                )
            # alpha, mode and the vector were checked at installation, the selection once
            # per call and device: the kernel entry checks only hidden. Under torch.compile
            # the same entry runs as the operator ``torch.ops.unlock_fast.steer_unchecked_``
            # (one graph node, not a break).
            kernel = steer_unchecked_op if torch.compiler.is_compiling() else steer_unchecked_
            kernel(target, vec, alpha, self._mode_code, sel.positions, sel.mask)
            return None if target is h else _replace(output, target)

        return hook

    def _operands(self, i: int, h: torch.Tensor, call: _Call) -> tuple[torch.Tensor, _OnDevice]:
        """Layer ``i``'s vector (fp32, contiguous, [d] or [B, d]) and the call's selection on
        ``h``'s device; cached, except under ``torch.compile``, whose tensors must not
        outlive the trace."""
        if torch.compiler.is_compiling():
            return self._vector_on(i, h), _checked(call.positions, call.mask, h.device)
        return self._vector(i, h), call.on(h)


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
    A key's config fingerprint must match the model's (keys saved with the first fingerprint
    format are accepted while the config is the one they were made with);
    ``check_fingerprint=False`` checks shapes only. Inputs are checked before any hook is
    installed, so a bad call leaves the model as it was.

    Forward calls should pass the attention mask of a padded batch: without one every token
    is taken as real, and a row that starts or ends with ``config.pad_token_id`` is refused.
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
        fingerprint=model_fingerprint(model, layer_path) if check_fingerprint else "",
        hidden_size=hidden_size(model, layer_path),
        num_layers=len(blocks),
    )
    num_layers = info.num_layers
    check = _KeyCheck(model, info, check_fingerprint)
    vectors, key_layers, row_on = _normalise_key(key, info, check)
    if layers is not None:
        chosen = resolve_layer_indices(num_layers, layers)
        missing = [i for i in chosen if i not in key_layers]
        if missing:
            raise ValueError(f"layers {missing} are not in the key (it covers {key_layers})")
        idx = [key_layers.index(i) for i in chosen]
        vectors = vectors[..., idx, :]
        key_layers = chosen
    return SteeringHandle(model, vectors, key_layers, row_on, float(alpha), mode, positions, blocks)
