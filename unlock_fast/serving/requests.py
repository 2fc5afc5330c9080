"""What a request asks for: the UNLOCK arguments it carries in ``SamplingParams.extra_args``.

A request names a key loaded on the server and, optionally, how to apply it, with the same
choices as :func:`unlock_fast.steer`::

    extra_args = {"unlock_key": "cot", "unlock_alpha": 0.1,
                  "unlock_mode": "rotate", "unlock_positions": "last_prompt"}

Over the OpenAI API the same keys go in ``extra_body={"vllm_xargs": {...}}``. A request
without ``unlock_key`` is served unsteered.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..steering import MODES
from ..steering_state import POSITIONS

__all__ = [
    "ARG_ALPHA",
    "ARG_KEY",
    "ARG_MODE",
    "ARG_POSITIONS",
    "UnlockRequest",
    "cache_salt",
    "parse_request",
    "unlock_params",
]

ARG_KEY = "unlock_key"
ARG_ALPHA = "unlock_alpha"
ARG_MODE = "unlock_mode"
ARG_POSITIONS = "unlock_positions"
_ARGS = (ARG_KEY, ARG_ALPHA, ARG_MODE, ARG_POSITIONS)


@dataclass(frozen=True)
class UnlockRequest:
    """One request's steering: which key, how strong, which rule, where."""

    key: str
    alpha: float = 0.1
    mode: str = "rotate"
    positions: str = "last_prompt"

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"{ARG_KEY} must be a non-empty string, got {self.key!r}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a):
            raise ValueError(f"{ARG_ALPHA} must be a finite number, got {a!r}")
        object.__setattr__(self, "alpha", float(a))
        if self.mode not in MODES:
            raise ValueError(f"{ARG_MODE} must be one of {MODES}, got {self.mode!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"{ARG_POSITIONS} must be one of {POSITIONS}, got {self.positions!r}")

    def as_extra_args(self) -> dict[str, object]:
        return {
            ARG_KEY: self.key,
            ARG_ALPHA: float(self.alpha),
            ARG_MODE: self.mode,
            ARG_POSITIONS: self.positions,
        }


def parse_request(
    extra_args: Mapping[str, object] | None, known_keys: Collection[str] | None = None
) -> UnlockRequest | None:
    """The request's steering, None when it names no key; ValueError when it is malformed
    or (with ``known_keys``) names a key that is not loaded."""
    if not extra_args or ARG_KEY not in extra_args:
        stray = sorted(k for k in (extra_args or {}) if k in _ARGS)
        if stray:
            raise ValueError(f"{', '.join(stray)} given without {ARG_KEY}")
        return None
    key = extra_args[ARG_KEY]
    alpha = extra_args.get(ARG_ALPHA, 0.1)
    mode = extra_args.get(ARG_MODE, "rotate")
    positions = extra_args.get(ARG_POSITIONS, "last_prompt")
    req = UnlockRequest(key, alpha, mode, positions)  # type: ignore[arg-type]  # checked there
    if known_keys is not None and req.key not in known_keys:
        known = ", ".join(sorted(known_keys)) or "none"
        raise ValueError(f"unknown {ARG_KEY} {req.key!r}; loaded keys: {known}")
    return req


def cache_salt(
    request: UnlockRequest | None, prompt: object, user_salt: str | None = None
) -> str | None:
    """A prefix-cache salt that keeps a steered request's KV blocks to itself.

    Unsteered requests keep ``user_salt`` (and share blocks with each other). A steered
    request's salt covers the key, alpha, mode, positions and the prompt (its length decides
    which position is the last prompt token), so blocks are shared only between requests
    whose KV is identical by construction.
    """
    if request is None:
        return user_salt
    tag = json.dumps(
        [request.key, request.alpha, request.mode, request.positions, prompt, user_salt or ""],
        sort_keys=True,
        default=str,
    )
    return "unlock-" + hashlib.sha256(tag.encode()).hexdigest()[:40]


class _HasExtraArgs(Protocol):
    extra_args: dict[str, object] | None


P = TypeVar("P", bound=_HasExtraArgs)


def unlock_params(
    params: P,
    *,
    key: str,
    alpha: float = 0.1,
    mode: str = "rotate",
    positions: str = "last_prompt",
) -> P:
    """A copy of ``params`` (vLLM ``SamplingParams``) that asks for steering with ``key``."""
    req = UnlockRequest(key, alpha, mode, positions)
    out = copy.deepcopy(params)
    out.extra_args = {**(params.extra_args or {}), **req.as_extra_args()}
    return out
