"""vLLM model classes that carry the steering inside their forward, compiled and captured.

An engine started by :func:`unlock_fast.vllm.steered_llm` or ``unlock-fast serve`` registers,
for its model's architectures, a subclass of vLLM's own class (``ModelRegistry.register_model``,
vLLM's documented way to bring a model class; here lazily, ``"unlock_fast.serving.model:<arch>"``).
The subclass builds the model as usual and, when the engine's ``additional_config`` carries an
``"unlock_fast"`` entry, adds :class:`SteeringBuffers` and one forward hook per decoder block
before vLLM compiles the forward and captures its graphs. Each hook is one call of the
``unlock_fast::steer_tokens_`` operator on the block's (hidden, residual) output, reading only
persistent buffers: the key table [slots × layers × d] and, per flattened row, the key slot,
alpha and mode, refilled in place before each step by the worker (:mod:`.worker`), as vLLM's
multi-LoRA keeps its per-token adapter indices. No host sync, no data-dependent shape, so the
hook is traced into the compiled graph. An engine without that entry gets its class unchanged.

vLLM's decoder blocks return ``(hidden_states, residual)`` and leave the add to the next
block's fused add-norm: the stream after block l is their sum. The operator writes the steered
sum into ``hidden_states`` and zeroes the residual row, so the next add gives it exactly.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..layers import decoder_layers
from ..ops.library import steer_tokens_op
from .engine import CONFIG_KEY

__all__ = ["SteeringBuffers", "register_architectures", "steering_buffers"]

_ORIGINALS: dict[str, tuple[str, str]] = {}  # arch -> (vLLM module, class) it wraps


class SteeringBuffers(nn.Module):
    """The device state the steering hooks read: keys by slot, and each row's choice.

    table: fp32 [slots, layers, d], zero where no key is loaded; slots (int32, -1 = not
    steered), alphas (fp32) and modes (uint8): one entry per flattened row, sized to the
    engine's largest step. Buffers, not parameters: vLLM loads no weights into them, and
    their addresses never change, so captured graphs stay valid.
    """

    def __init__(self, slots: int, layers: int, dim: int, rows: int) -> None:
        super().__init__()
        # dtypes spelled out: vLLM builds models under the model's default dtype
        f32 = torch.float32
        self.register_buffer("table", torch.zeros(slots, layers, dim, dtype=f32), persistent=False)
        self.register_buffer("slots", torch.full((rows,), -1, dtype=torch.int32), persistent=False)
        self.register_buffer("alphas", torch.zeros(rows, dtype=f32), persistent=False)
        self.register_buffer("modes", torch.zeros(rows, dtype=torch.uint8), persistent=False)

    table: torch.Tensor
    slots: torch.Tensor
    alphas: torch.Tensor
    modes: torch.Tensor


def steering_buffers(model: nn.Module) -> SteeringBuffers | None:
    """The buffers of a model built by a steered class, None for any other model."""
    found = getattr(model, "unlock_steering", None)
    return found if isinstance(found, SteeringBuffers) else None


def _block_hook(buffers: SteeringBuffers, layer: int) -> Callable[[nn.Module, Any, Any], None]:
    def hook(_block: nn.Module, _args: Any, output: Any) -> None:
        if isinstance(output, tuple):
            hidden = output[0]
            residual = output[1] if len(output) > 1 else None
        else:
            hidden, residual = output, None
        if not isinstance(residual, torch.Tensor) or residual.shape != hidden.shape:
            residual = None
        steer_tokens_op(
            hidden,
            residual,
            buffers.table,
            layer,
            buffers.slots,
            buffers.alphas,
            buffers.modes,
        )

    return hook


def _install(model: nn.Module, vllm_config: Any, settings: dict[str, Any]) -> None:
    blocks = decoder_layers(model)
    hf = vllm_config.model_config.hf_text_config
    sched = vllm_config.scheduler_config
    rows = int(sched.max_num_batched_tokens) + int(sched.max_num_seqs)  # room for padding
    buffers = SteeringBuffers(int(settings["slots"]), len(blocks), int(hf.hidden_size), rows)
    model.unlock_steering = buffers
    for layer, block in enumerate(blocks):
        block.register_forward_hook(_block_hook(buffers, layer))


@functools.cache
def _steered_class(arch: str) -> type[nn.Module]:
    module, name = _ORIGINALS.get(arch) or _vllm_entry(arch)
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)

    def __init__(self: nn.Module, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        extra = getattr(vllm_config, "additional_config", None)
        settings = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
        if isinstance(settings, dict):
            _install(self, vllm_config, settings)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__})


def _vllm_entry(arch: str) -> tuple[str, str]:
    from vllm.model_executor.models import registry  # noqa: PLC0415  # vLLM only on demand

    entry = registry._VLLM_MODELS.get(arch)
    if entry is None:
        raise ValueError(
            f"unlock-fast cannot steer the architecture {arch!r}: vLLM has no such model"
        )
    return entry


def __getattr__(name: str) -> type[nn.Module]:
    """``unlock_fast.serving.model:<arch>``, the lazy name the registry imports."""
    if name.startswith("_") or not name[:1].isupper():
        raise AttributeError(name)
    return _steered_class(name)


def register_architectures(architectures: list[str]) -> None:
    """Point vLLM's registry at the steered classes for ``architectures`` (this process)."""
    from vllm import ModelRegistry  # noqa: PLC0415  # vLLM only on demand
    from vllm.model_executor.model_loader import utils as loader_utils  # noqa: PLC0415
    from vllm.model_executor.models import registry  # noqa: PLC0415

    for arch in architectures:
        entry = registry._VLLM_MODELS.get(arch)
        if entry is None:
            raise ValueError(
                f"unlock-fast serves vLLM's own model classes; {arch!r} is not one of them"
            )
        _ORIGINALS[arch] = entry
        ModelRegistry.register_model(arch, f"{__name__}:{arch}")
    # vllm/model_executor/model_loader/utils.py keeps the class it resolved per model
    # (_MODEL_ARCH_BY_HASH): an engine started earlier in this process would pin vLLM's own.
    resolved = getattr(loader_utils, "_MODEL_ARCH_BY_HASH", None)
    if isinstance(resolved, dict):
        resolved.clear()
