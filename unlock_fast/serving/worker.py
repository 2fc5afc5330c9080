"""The vLLM worker extension: keys in the model's table, and each step's rows planned.

vLLM mixes this class into its worker when the engine is started with
``worker_extension_cls="unlock_fast.serving.worker.UnlockWorkerExtension"``; its public
methods are then reachable with ``collective_rpc("unlock_...", args=...)``. Every name is
prefixed ``unlock_`` because vLLM refuses an extension whose names clash with the worker's.

The steering itself is inside the model's forward (:mod:`.model`). This side:

- checks, at install, that the engine runs vLLM's V1 model runner
  (``vllm/v1/worker/gpu_model_runner.py``; in vLLM 0.32 and 0.33 it is chosen with
  ``VLLM_USE_V2_MODEL_RUNNER=0``) and that its model carries the steering buffers, and raises
  a one-line error through ``collective_rpc`` otherwise;
- writes each loaded key into a slot of the model's key table;
- before each step's forward (the runner's ``_model_forward``, which V1 calls once per step
  with the batch prepared, whether the forward then runs eagerly or replays a graph), reads
  the runner's batch layout (request ids, computed and prompt token counts,
  ``query_start_loc``) and each request's ``sampling_params.extra_args`` (parsed once per
  request), and fills the per-row buffers with one non-blocking copy per buffer.

Nothing here raises inside the engine loop: a malformed request is refused by the front end,
a request naming a key that is not loaded is served unsteered (logged once), and a step that
cannot be planned is served unsteered (logged once).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..artifacts import KeyLike, ModelInfo, load_artifact
from .model import SteeringBuffers, steering_buffers
from .plan import ScheduledRequest, fill_step
from .requests import UnlockRequest, parse_request

__all__ = [
    "FINGERPRINT_ENV",
    "KEYS_ENV",
    "UnlockWorkerExtension",
    "check_runner",
    "keys_from_env",
]

KEYS_ENV = "UNLOCK_FAST_KEYS"  # JSON {name: artifact folder}, read by every worker and server
FINGERPRINT_ENV = "UNLOCK_FAST_CHECK_FINGERPRINT"  # "0": load keys whatever their fingerprint
_log = logging.getLogger("unlock_fast.serving")
_RUNNER_NEEDS = ("input_batch", "requests", "query_start_loc", "_model_forward")


def keys_from_env() -> dict[str, str]:
    """The {name: path} keys that ``unlock-fast serve`` hands its workers."""
    text = os.environ.get(KEYS_ENV, "")
    if not text:
        return {}
    keys = json.loads(text)
    if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
        raise ValueError(f"${KEYS_ENV} must be a JSON object of name -> artifact path")
    return {str(k): v for k, v in keys.items()}


def check_runner(runner: object) -> None:
    """RuntimeError, in one line, unless ``runner`` is vLLM's V1 model runner (or a subclass,
    as the CPU one is) with the batch layout this module reads."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: PLC0415  # vLLM only

    cls = type(runner)
    if isinstance(runner, GPUModelRunner) and all(hasattr(cls, a) or hasattr(runner, a)
                                                  for a in _RUNNER_NEEDS):  # fmt: skip
        return
    raise RuntimeError(
        f"unlock-fast steers on vLLM's V1 model runner, but this engine runs "
        f"{cls.__module__}.{cls.__qualname__}; start the engine with "
        "VLLM_USE_V2_MODEL_RUNNER=0 (steered_llm and unlock-fast serve set it)"
    )


@dataclass
class _Host:
    """One set of host buffers (pinned where the device is a GPU) and the event of the copy
    that last read them."""

    slots: torch.Tensor
    alphas: torch.Tensor
    modes: torch.Tensor
    written: int = 0  # rows [0, written) may hold a slot
    event: Any = None

    @classmethod
    def make(cls, rows: int, pin: bool) -> _Host:
        return cls(
            torch.full((rows,), -1, dtype=torch.int32, pin_memory=pin),
            torch.zeros(rows, dtype=torch.float32, pin_memory=pin),
            torch.zeros(rows, dtype=torch.uint8, pin_memory=pin),
        )


@dataclass
class _State:
    model: nn.Module
    buffers: SteeringBuffers
    info: ModelInfo
    device: torch.device
    hosts: list[_Host]
    slot_of: dict[str, int] = field(default_factory=dict)
    requests: dict[str, UnlockRequest | None] = field(default_factory=dict)
    step: int = 0
    device_end: int = 0  # rows [0, device_end) of the device buffers may hold a slot
    record: bool = False
    log: list[tuple[str, int, int]] = field(default_factory=list)
    warned: set[str] = field(default_factory=set)


class UnlockWorkerExtension:
    """Per-request UNLOCK steering inside a vLLM worker (see the module docstring)."""

    model_runner: Any  # provided by the vLLM worker this class is mixed into

    # -- what collective_rpc reaches --------------------------------------------------------
    def unlock_install(self) -> list[str]:
        """Check the engine, start planning steps (once) and load the keys named in
        ``$UNLOCK_FAST_KEYS``; returns the loaded keys."""
        state = self._unlock_state()
        check = os.environ.get(FINGERPRINT_ENV, "1") != "0"
        for name, path in keys_from_env().items():
            if name not in state.slot_of:
                self.unlock_load_key(name, path, check)
        return sorted(state.slot_of)

    def unlock_load_key(self, name: str, path: str, check_fingerprint: bool = True) -> list[int]:
        """Load the key (or direction) saved at ``path`` under ``name`` into a free slot (or
        the slot ``name`` already has); returns its layers. A key made for another model
        (hidden size, depth, config fingerprint) is refused, and so is a key when every slot
        is taken."""
        state = self._unlock_state()
        obj = load_artifact(path)
        if not isinstance(obj, KeyLike):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a steering key")
        key = obj.as_key()
        key.model.check(
            state.info, what=f"the key {name!r} ({path})", check_fingerprint=check_fingerprint
        )
        slot = state.slot_of.get(name)
        if slot is None:
            taken = set(state.slot_of.values())
            free = [s for s in range(state.buffers.table.shape[0]) if s not in taken]
            if not free:
                raise ValueError(
                    f"cannot load {name!r}: all {len(taken)} key slots are taken (unload a key, "
                    "or start the engine with a larger max_keys)"
                )
            slot = free[0]
        row = torch.zeros_like(state.buffers.table[slot])
        for i, layer in enumerate(key.layers):
            row[layer] = key.vectors[i].to(row.device, torch.float32)
        state.buffers.table[slot].copy_(row)
        state.slot_of[name] = slot
        return list(key.layers)

    def unlock_unload_key(self, name: str) -> bool:
        """Free ``name``'s slot; requests still naming it are served unsteered."""
        state = self._unlock_state()
        slot = state.slot_of.pop(name, None)
        if slot is None:
            return False
        state.buffers.table[slot].zero_()
        return True

    def unlock_keys(self) -> list[str]:
        return sorted(self._unlock_state().slot_of)

    def unlock_record(self, on: bool = True) -> list[tuple[str, int, int]]:
        """Start (or stop) recording (request id, position, row) of steered last prompt
        tokens; returns and clears what was recorded so far."""
        state = self._unlock_state()
        state.record = bool(on)
        out, state.log = state.log, []
        return out

    # -- each step ----------------------------------------------------------------------------
    def _unlock_state(self) -> _State:
        state: _State | None = getattr(self, "_unlock", None)
        if state is not None:
            return state
        runner = self.model_runner
        check_runner(runner)
        model = runner.get_model()
        buffers = steering_buffers(model)
        if buffers is None:
            raise RuntimeError(
                "this vLLM engine's model has no steering buffers: start it with "
                "unlock_fast.vllm.steered_llm or unlock-fast serve"
            )
        device = buffers.slots.device
        pin = device.type == "cuda"
        rows = buffers.slots.shape[0]
        state = _State(model, buffers, ModelInfo.of(model), device,
                       [_Host.make(rows, pin), _Host.make(rows, pin)])  # fmt: skip
        self._unlock = state
        forward = runner._model_forward

        def planned_forward(*args: Any, **kwargs: Any) -> Any:
            self._unlock_step(kwargs.get("positions"))
            return forward(*args, **kwargs)

        runner._model_forward = planned_forward
        return state

    def _unlock_step(self, positions: object) -> None:
        state = self._unlock
        try:
            scheduled = self._unlock_scheduled(positions) if state.slot_of else []
            if not scheduled and state.device_end == 0:
                return  # nothing steered now or before: the device buffers are all -1
            host = state.hosts[state.step % 2]
            state.step += 1
            if host.event is not None:
                host.event.synchronize()  # the copy that read this set two steps ago
            host.slots[: host.written].fill_(-1)
            end = host.written = fill_step(scheduled, state.slot_of, *_arrays(host))
            self._unlock_copy(host, max(end, state.device_end))
            state.device_end = end
        except Exception as e:  # never stop the engine: serve this step unsteered
            self._unlock_warn("step", f"a step could not be planned ({e!r}); served unsteered")
            state.buffers.slots.fill_(-1)
            state.device_end = 0

    def _unlock_copy(self, host: _Host, span: int) -> None:
        b = self._unlock.buffers
        for dst, src in ((b.slots, host.slots), (b.alphas, host.alphas), (b.modes, host.modes)):
            dst[:span].copy_(src[:span], non_blocking=True)
        if b.slots.is_cuda:
            host.event = torch.cuda.Event()
            host.event.record()

    def _unlock_scheduled(self, positions: object) -> list[ScheduledRequest]:
        state = self._unlock
        runner = self.model_runner
        batch = runner.input_batch
        n = int(batch.num_reqs)
        ids = batch.req_ids[:n]
        cache = state.requests
        if len(cache) > 4 * n + 64:  # finished requests: keep only the live ones
            state.requests = cache = {r: cache[r] for r in ids if r in cache}
        qsl = runner.query_start_loc.np
        out = []
        for i, req_id in enumerate(ids):
            req = cache.get(req_id, _MISSING)
            if req is _MISSING:
                req = cache[req_id] = self._unlock_parse(req_id)
            if req is None:
                continue
            assert isinstance(req, UnlockRequest)
            if req.key not in state.slot_of:
                self._unlock_warn(req.key, f"key {req.key!r} is not loaded; served unsteered")
                continue
            r = ScheduledRequest(
                req,
                int(batch.num_computed_tokens_cpu[i]),
                int(batch.num_prompt_tokens[i]),
                int(qsl[i]),
                int(qsl[i + 1]),
            )
            out.append(r)
            if state.record and req.positions == "last_prompt":
                self._unlock_note(req_id, r, positions)
        return out

    def _unlock_parse(self, req_id: str) -> UnlockRequest | None:
        params = getattr(self.model_runner.requests.get(req_id), "sampling_params", None)
        try:
            return parse_request(getattr(params, "extra_args", None))
        except ValueError as e:  # refused by the front end; never stop the engine here
            self._unlock_warn(req_id, f"request {req_id}: {e}; served unsteered")
            return None

    def _unlock_note(self, req_id: str, r: ScheduledRequest, positions: object) -> None:
        """Record a steered last prompt token with the position the model gets at its row
        (the prompt length - 1 when the batch layout is what this module reads)."""
        row = r.start + r.num_prompt - 1 - r.num_computed
        if not r.start <= row < r.end:
            return
        got = r.num_prompt - 1
        if isinstance(positions, torch.Tensor) and positions.dim() == 1:
            got = int(positions[row])
        self._unlock.log.append((req_id, got, row))

    def _unlock_warn(self, what: str, message: str) -> None:
        if what not in self._unlock.warned:
            self._unlock.warned.add(what)
            _log.warning("unlock-fast: %s", message)


_MISSING: Any = object()


def _arrays(host: _Host) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return host.slots.numpy(), host.alphas.numpy(), host.modes.numpy()
