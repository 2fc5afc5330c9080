"""Serve UNLOCK keys in stock vLLM, per request (offline API).

    from unlock_fast.vllm import steered_llm, unlock_params
    llm = steered_llm("path/or/hub-id", keys={"cot": "keys/key"}, dtype="float32")
    outs = llm.generate(prompts, [unlock_params(sp, key="cot", alpha=0.1), sp])

Each key is loaded once into every worker and kept on its device; each request chooses its
key, alpha, mode and positions in ``SamplingParams.extra_args`` (:func:`unlock_params`), and
requests without one are served unsteered, in the same batch. Semantics equal
:func:`unlock_fast.steer` on the same model. The server is ``unlock-fast serve``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._optional import require

require("vllm", "vllm", "Serving with vLLM")

from vllm import LLM  # noqa: E402

from .serving.requests import cache_salt, parse_request, unlock_params  # noqa: E402

__all__ = ["EXTENSION", "SteeredLLM", "steered_llm", "unlock_params"]

EXTENSION = "unlock_fast.serving.worker.UnlockWorkerExtension"


class SteeredLLM(LLM):
    """A ``vllm.LLM`` that checks each request's UNLOCK arguments and salts its prefix cache
    (so no cached block carries one key's steered KV into a request with another or none)."""

    unlock_keys: frozenset[str] = frozenset()

    def _add_request(self, prompt: Any, params: Any, *args: Any, **kwargs: Any) -> str:
        req = parse_request(getattr(params, "extra_args", None), known_keys=self.unlock_keys)
        if req is not None and isinstance(prompt, dict):
            content = prompt.get("prompt_token_ids", prompt.get("prompt"))
            prompt = {**prompt, "cache_salt": cache_salt(req, content, prompt.get("cache_salt"))}
        return str(super()._add_request(prompt, params, *args, **kwargs))


def steered_llm(
    model: str | os.PathLike[str],
    keys: Mapping[str, str | os.PathLike[str]],
    *,
    check_fingerprint: bool = True,
    **llm_kwargs: Any,  # passed on to vllm.LLM
) -> SteeredLLM:
    """A vLLM engine for ``model`` with the saved ``keys`` ({name: key folder}) loaded.

    ``enforce_eager`` is on (the hooks must run every step: a compiled or captured graph
    would skip them). A key made for another model is refused here, in every worker.
    """
    if isinstance(keys, str | os.PathLike) or not isinstance(keys, Mapping):
        raise TypeError(f"keys must map names to key folders, got {type(keys).__name__}")
    for name, path in keys.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"key names must be non-empty str, got {name!r}")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"key {name!r}: no artifact folder at {path}")
    if llm_kwargs.pop("enforce_eager", True) is False:
        raise ValueError("steering needs enforce_eager=True: compiled graphs skip the hooks")
    llm = SteeredLLM(
        model=str(model), worker_extension_cls=EXTENSION, enforce_eager=True, **llm_kwargs
    )
    llm.collective_rpc("unlock_install")
    for name, path in keys.items():
        llm.collective_rpc("unlock_load_key", args=(name, str(path), check_fingerprint))
    llm.unlock_keys = frozenset(keys)
    return llm
