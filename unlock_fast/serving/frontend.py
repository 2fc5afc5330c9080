"""The OpenAI server's side: refuse bad requests with HTTP 400, salt steered ones, manage keys.

``unlock-fast serve`` starts vLLM's server with
``--middleware unlock_fast.serving.frontend.UnlockMiddleware``, an ASGI middleware that, before
vLLM sees a request:

- checks the UNLOCK arguments of every completion and chat request (``vllm_xargs``) against
  the keys loaded now, and answers a bad one with HTTP 400 before any response starts,
  streaming or not (unknown key, bad alpha, mode or positions);
- gives each steered request a ``cache_salt`` (:func:`.requests.cache_salt`);
- on the first request, asks every worker to install itself and load the keys;
- serves the key routes, like vLLM's LoRA adapter routes:
  ``GET /v1/unlock_keys``, ``POST /v1/load_unlock_key`` ``{"name", "path"}`` (HTTP 400 for a
  key made for another model) and ``POST /v1/unload_unlock_key`` ``{"name"}``.

It depends on no model-runner interface: the workers are reached through ``collective_rpc``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .requests import cache_salt, parse_request
from .worker import FINGERPRINT_ENV, keys_from_env

__all__ = ["UnlockMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
_GENERATE = {"/v1/completions", "/v1/chat/completions"}
KEYS_PATH, LOAD_PATH, UNLOAD_PATH = (
    "/v1/unlock_keys",
    "/v1/load_unlock_key",
    "/v1/unload_unlock_key",
)


class UnlockMiddleware:
    """Checks and salts steered requests, installs the workers once, serves the key routes."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.installed = False
        self.keys = set(keys_from_env())
        self.check_fingerprint = os.environ.get(FINGERPRINT_ENV, "1") != "0"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path") if scope["type"] == "http" else None
        method = scope.get("method")
        if path == KEYS_PATH and method == "GET":
            await self._install(scope)
            await _reply(send, 200, {"keys": sorted(self.keys)})
            return
        if method != "POST" or path not in (_GENERATE | {LOAD_PATH, UNLOAD_PATH}):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:  # the client went away
            return
        await self._install(scope)
        if path in (LOAD_PATH, UNLOAD_PATH):
            status, out = await self._manage(scope, path, body)
            await _reply(send, status, out)
            return
        try:
            body = self._checked(body)
        except ValueError as e:
            await _reply(send, 400, _error(str(e)))
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)

    async def _install(self, scope: Scope) -> None:
        if not self.installed:
            await _engine(scope).collective_rpc("unlock_install")
            self.installed = True

    def _checked(self, body: bytes) -> bytes:
        """The body with a cache salt when it asks for steering; ValueError when its UNLOCK
        arguments are bad (a body that is not JSON is left to vLLM)."""
        try:
            data = json.loads(body)
        except ValueError:
            return body
        xargs = data.get("vllm_xargs") if isinstance(data, dict) else None
        if not isinstance(xargs, dict):
            return body
        req = parse_request(xargs, known_keys=self.keys)
        if req is None:
            return body
        content = data.get("prompt", data.get("messages"))
        data["cache_salt"] = cache_salt(req, content, data.get("cache_salt"))
        return json.dumps(data).encode()

    async def _manage(self, scope: Scope, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        name = data.get("name") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name:
            return 400, _error('the body must be JSON with a non-empty "name"')
        engine = _engine(scope)
        if path == UNLOAD_PATH:
            if name not in self.keys:
                return 404, _error(f"no key {name!r} is loaded", 404)
            await engine.collective_rpc("unlock_unload_key", args=(name,))
            self.keys.discard(name)
            return 200, {"unloaded": name, "keys": sorted(self.keys)}
        key_path = data.get("path") if isinstance(data, dict) else None
        if not isinstance(key_path, str) or not os.path.isdir(key_path):
            return 400, _error(f'"path" must name a key folder on the server, got {key_path!r}')
        try:
            (layers, *_) = await engine.collective_rpc(
                "unlock_load_key", args=(name, os.path.abspath(key_path), self.check_fingerprint)
            )
        except Exception as e:  # the workers' refusal (another model, no free slot, bad file)
            return 400, _error(_worker_message(e))
        self.keys.add(name)
        return 200, {"loaded": name, "layers": layers, "keys": sorted(self.keys)}


def _engine(scope: Scope) -> Any:
    return scope["app"].state.engine_client


def _worker_message(e: Exception) -> str:
    """The worker's own one-line message, out of whatever wraps it on the way back."""
    text = str(e).strip() or type(e).__name__
    for line in reversed(text.splitlines()):
        if "ValueError:" in line:
            return line.split("ValueError:", 1)[1].strip()
    return text.splitlines()[-1]


def _error(message: str, code: int = 400) -> dict[str, Any]:
    kind = "NotFoundError" if code == 404 else "BadRequestError"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


async def _read_body(receive: Receive) -> bytes | None:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        more = bool(message.get("more_body", False))
    return b"".join(chunks)


async def _reply(send: Send, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
