"""The vLLM worker extension: keys on the device, and hooks that steer each step's rows.

vLLM mixes this class into its worker when the engine is started with
``worker_extension_cls="unlock_fast.serving.worker.UnlockWorkerExtension"``; its public
methods are then reachable with ``LLM.collective_rpc("unlock_...", args=...)``. Every name is
prefixed ``unlock_`` because vLLM refuses an extension whose names clash with the worker's.

Each step, a pre-forward hook on the model reads the model runner's batch (request ids,
computed and prompt token counts, ``query_start_loc``) and each request's
``sampling_params.extra_args``, and plans which flattened rows to steer
(:mod:`.plan`). A forward hook on each keyed decoder block then applies the fused steering
kernel to those rows of the residual stream. vLLM's decoder blocks return
``(hidden_states, residual)`` and defer the add to the next block's fused add-norm, so the
stream after block l is their sum: the steered sum goes into ``hidden_states`` and the
residual row is zeroed. Nothing here raises on request data (that would stop the engine): a
malformed request is refused earlier, by the front end (:mod:`.validation`), and a request
naming a key this worker does not hold is logged and served unsteered.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import ops
from ..artifacts import KeyLike, ModelInfo, load_artifact
from ..capture import layer_output
from ..layers import decoder_layers
from .plan import ScheduledRequest, SteerGroup, plan_step
from .requests import parse_request

__all__ = ["FINGERPRINT_ENV", "KEYS_ENV", "UnlockWorkerExtension", "keys_from_env"]

KEYS_ENV = "UNLOCK_FAST_KEYS"  # JSON {name: artifact folder}, read by every worker and server
FINGERPRINT_ENV = "UNLOCK_FAST_CHECK_FINGERPRINT"  # "0": load keys whatever their fingerprint
_log = logging.getLogger("unlock_fast.serving")


def keys_from_env() -> dict[str, str]:
    """The {name: path} keys that ``unlock-fast serve`` hands its workers."""
    text = os.environ.get(KEYS_ENV, "")
    if not text:
        return {}
    keys = json.loads(text)
    if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
        raise ValueError(f"${KEYS_ENV} must be a JSON object of name -> artifact path")
    return {str(k): v for k, v in keys.items()}


@dataclass
class _State:
    model: nn.Module
    blocks: nn.ModuleList
    info: ModelInfo
    device: torch.device
    keys: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    plan: dict[int, list[SteerGroup]] = field(default_factory=dict)
    hooks: list[Any] = field(default_factory=list)
    record: bool = False
    log: list[tuple[str, int, int]] = field(default_factory=list)
    warned: set[str] = field(default_factory=set)


class UnlockWorkerExtension:
    """Per-request UNLOCK steering inside a vLLM worker (see the module docstring)."""

    model_runner: Any  # provided by the vLLM worker this class is mixed into

    # -- what collective_rpc reaches --------------------------------------------------------
    def unlock_install(self) -> list[str]:
        """Install the hooks (once) and load the keys named in ``$UNLOCK_FAST_KEYS``."""
        state = self._unlock_state()
        check = os.environ.get(FINGERPRINT_ENV, "1") != "0"
        for name, path in keys_from_env().items():
            if name not in state.keys:
                self.unlock_load_key(name, path, check)
        return sorted(state.keys)

    def unlock_load_key(self, name: str, path: str, check_fingerprint: bool = True) -> list[int]:
        """Load the key (or direction) saved at ``path`` under ``name``; returns its layers.

        A key made for another model (hidden size, depth, config fingerprint) is refused.
        """
        state = self._unlock_state()
        obj = load_artifact(path)
        if not isinstance(obj, KeyLike):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a steering key")
        key = obj.as_key()
        key.model.check(
            state.info, what=f"the key {name!r} ({path})", check_fingerprint=check_fingerprint
        )
        state.keys[name] = {
            layer: key.vectors[i].to(state.device, torch.float32).contiguous()
            for i, layer in enumerate(key.layers)
        }
        return list(key.layers)

    def unlock_unload_key(self, name: str) -> bool:
        return self._unlock_state().keys.pop(name, None) is not None

    def unlock_keys(self) -> list[str]:
        return sorted(self._unlock_state().keys)

    def unlock_record(self, on: bool = True) -> list[tuple[str, int, int]]:
        """Start (or stop) recording (request id, position, row) of steered rows; returns and
        clears what was recorded so far."""
        state = self._unlock_state()
        state.record = bool(on)
        out, state.log = state.log, []
        return out

    # -- hooks ------------------------------------------------------------------------------
    def _unlock_state(self) -> _State:
        state: _State | None = getattr(self, "_unlock", None)
        if state is not None:
            return state
        model = self.model_runner.get_model()
        blocks = decoder_layers(model)
        state = _State(model, blocks, ModelInfo.of(model), self.model_runner.device)
        state.hooks.append(model.register_forward_pre_hook(self._unlock_plan, with_kwargs=True))
        state.hooks.append(model.register_forward_hook(self._unlock_clear, always_call=True))
        for layer, block in enumerate(blocks):
            state.hooks.append(block.register_forward_hook(self._unlock_block_hook(layer)))
        self._unlock = state
        return state

    def _unlock_plan(self, _model: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        state = self._unlock
        state.plan = {}
        if not state.keys:
            return
        runner = self.model_runner
        batch = runner.input_batch
        n = int(batch.num_reqs)
        qsl = runner.query_start_loc.np
        positions = kwargs.get("positions") if state.record else None
        scheduled = []
        for i, req_id in enumerate(batch.req_ids[:n]):
            params = getattr(runner.requests.get(req_id), "sampling_params", None)
            try:
                req = parse_request(getattr(params, "extra_args", None))
            except ValueError as e:  # refused by the front end; never stop the engine here
                self._unlock_warn(req_id, f"request {req_id}: {e}; served unsteered")
                continue
            if req is None:
                continue
            if req.key not in state.keys:
                self._unlock_warn(req.key, f"key {req.key!r} is not loaded; served unsteered")
                continue
            computed, prompt = (
                int(batch.num_computed_tokens_cpu[i]),
                int(batch.num_prompt_tokens[i]),
            )
            r = ScheduledRequest(req, computed, prompt, int(qsl[i]), int(qsl[i + 1]))
            scheduled.append(r)
            if state.record and req.positions == "last_prompt":
                self._unlock_note(req_id, r, positions)
        state.plan = plan_step(scheduled, state.keys, state.device)

    def _unlock_note(self, req_id: str, r: ScheduledRequest, positions: object) -> None:
        """Record a steered last prompt token, checked against the model's positions input."""
        row = r.start + r.num_prompt - 1 - r.num_computed
        if not r.start <= row < r.end:
            return
        if isinstance(positions, torch.Tensor) and positions.dim() == 1:
            got = int(positions[row])
            if got != r.num_prompt - 1:  # the batch layout is not what this module reads
                raise RuntimeError(
                    f"{req_id}: row {row} holds position {got}, not {r.num_prompt - 1}"
                )
        self._unlock.log.append((req_id, r.num_prompt - 1, row))

    def _unlock_clear(self, *_: Any) -> None:
        self._unlock.plan = {}

    def _unlock_block_hook(self, layer: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_block: nn.Module, _args: Any, output: Any) -> None:
            groups = self._unlock.plan.get(layer)
            if not groups:
                return
            hidden = layer_output(output)
            residual = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(residual, torch.Tensor):
                residual = None
            for g in groups:
                rows = hidden[g.rows] if residual is None else hidden[g.rows] + residual[g.rows]
                stream = rows.float().unsqueeze(1).contiguous()  # [n, 1, d]
                at = torch.zeros(len(g.rows), dtype=torch.long, device=stream.device)
                ops.steer_(stream, g.vector, g.alpha, positions=at, mode=g.mode)
                hidden[g.rows] = stream.squeeze(1).to(hidden.dtype)
                if residual is not None:
                    residual[g.rows] = 0

        return hook

    def _unlock_warn(self, what: str, message: str) -> None:
        if what not in self._unlock.warned:
            self._unlock.warned.add(what)
            _log.warning("unlock-fast: %s", message)
