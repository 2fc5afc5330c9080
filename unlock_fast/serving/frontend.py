"""The OpenAI server's side: refuse bad requests with HTTP 400, salt steered ones.

``unlock-fast serve`` starts vLLM's server with

- ``--logits-processors unlock_fast.serving.frontend:UnlockArgsValidator``: a logits processor
  that changes nothing; vLLM calls its ``validate_params`` on every request at admission,
  and a ValueError there is answered with HTTP 400 (unknown key, bad alpha, mode or
  positions);
- ``--middleware unlock_fast.serving.frontend.UnlockMiddleware``: an ASGI middleware that gives
  each steered request a ``cache_salt`` (:func:`.requests.cache_salt`), and on the first
  request asks every worker to install its hooks and load the keys.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

from .requests import cache_salt, parse_request
from .worker import keys_from_env

__all__ = ["UnlockArgsValidator", "UnlockMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
_PATHS = {"/v1/completions", "/v1/chat/completions"}


class UnlockArgsValidator(LogitsProcessor):
    """Checks each request's UNLOCK arguments in the front end; leaves logits alone."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        parse_request(sampling_params.extra_args, known_keys=keys_from_env())

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        del vllm_config, device, is_pin_memory

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Any) -> None:
        del batch_update


class UnlockMiddleware:
    """Salts steered completion requests and installs the workers' hooks once."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.installed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope["path"] not in _PATHS:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        if not self.installed:
            await scope["app"].state.engine_client.collective_rpc("unlock_install")
            self.installed = True
        body, scope = _salted(body, scope)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _salted(body: bytes, scope: Scope) -> tuple[bytes, Scope]:
    """The body with a cache salt when it asks for steering (malformed: left to vLLM)."""
    try:
        data = json.loads(body)
        xargs = data.get("vllm_xargs") if isinstance(data, dict) else None
        req = parse_request(xargs) if isinstance(xargs, dict) else None
    except ValueError:
        return body, scope
    if req is None:
        return body, scope
    content = data.get("prompt", data.get("messages"))
    data["cache_salt"] = cache_salt(req, content, data.get("cache_salt"))
    body = json.dumps(data).encode()
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    return body, {**scope, "headers": headers}
