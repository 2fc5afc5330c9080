"""Serve UNLOCK keys in stock vLLM, per request (offline API).

    from unlock_fast.vllm import steered_llm, unlock_params
    llm = steered_llm("path/or/hub-id", keys={"cot": "keys/key"}, dtype="float32")
    outs = llm.generate(prompts, [unlock_params(sp, key="cot", alpha=0.1), sp])

Each key is loaded once into every worker and kept on its device; each request chooses its
key, alpha, mode and positions in ``SamplingParams.extra_args`` (:func:`unlock_params`), and
requests without one are served unsteered, in the same batch. Semantics equal
:func:`unlock_fast.steer` on the same model. The engine keeps vLLM's compilation and graph
capture: the steering is one operator per decoder block inside the compiled forward
(:mod:`unlock_fast.serving.model`). The server is ``unlock-fast serve``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._optional import require

require("vllm", "vllm", "Serving with vLLM")

from vllm import LLM  # noqa: E402

from .serving.engine import (  # noqa: E402
    ARCHITECTURES_ENV,
    DEFAULT_SLOTS,
    EXTENSION,
    engine_config,
    engine_environment,
)
from .serving.model import register_architectures  # noqa: E402
from .serving.requests import cache_salt, parse_request, unlock_params  # noqa: E402

__all__ = ["EXTENSION", "SteeredLLM", "steered_llm", "unlock_params"]


class SteeredLLM(LLM):
    """A ``vllm.LLM`` that checks each request's UNLOCK arguments and salts its prefix cache
    (so no cached block carries one key's steered KV into a request with another or none)."""

    unlock_keys: frozenset[str] = frozenset()

    def load_key(
        self, name: str, path: str | os.PathLike[str], check_fingerprint: bool = True
    ) -> list[int]:
        """Load (or replace) the key saved at ``path`` under ``name`` in every worker, while
        the engine runs; returns its layers. A key made for another model is refused."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"key names must be non-empty str, got {name!r}")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"key {name!r}: no artifact folder at {path}")
        layers = self.collective_rpc("unlock_load_key", args=(name, str(path), check_fingerprint))
        self.unlock_keys = self.unlock_keys | {name}
        return list(layers[0])

    def unload_key(self, name: str) -> bool:
        """Free ``name``'s slot in every worker; requests naming it are then refused."""
        self.unlock_keys = self.unlock_keys - {name}
        return bool(self.collective_rpc("unlock_unload_key", args=(name,))[0])

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
    max_keys: int = DEFAULT_SLOTS,
    **llm_kwargs: Any,  # passed on to vllm.LLM
) -> SteeredLLM:
    """A vLLM engine for ``model`` with the saved ``keys`` ({name: key folder}) loaded, and
    room for ``max_keys`` keys at once (more can be loaded later with
    ``collective_rpc("unlock_load_key", args=(name, path))``).

    Compilation and graph capture stay as vLLM's settings make them (``enforce_eager`` is
    yours to set). The engine runs vLLM's V1 model runner: this sets
    ``VLLM_USE_V2_MODEL_RUNNER=0`` in this process, which its engine processes inherit. A key
    made for another model is refused here, in every worker. Keys can be loaded and unloaded
    later with :meth:`SteeredLLM.load_key` and :meth:`SteeredLLM.unload_key`.
    """
    if isinstance(keys, str | os.PathLike) or not isinstance(keys, Mapping):
        raise TypeError(f"keys must map names to key folders, got {type(keys).__name__}")
    for name, path in keys.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"key names must be non-empty str, got {name!r}")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"key {name!r}: no artifact folder at {path}")
    if isinstance(max_keys, int) and max_keys < len(keys):
        raise ValueError(f"max_keys={max_keys} leaves no room for the {len(keys)} keys given")
    extra = dict(llm_kwargs.pop("additional_config", None) or {})
    extra.update(engine_config(max_keys))
    env = engine_environment(str(model))
    os.environ.update(env)
    register_architectures(env[ARCHITECTURES_ENV].split(","))
    llm = SteeredLLM(
        model=str(model), worker_extension_cls=EXTENSION, additional_config=extra, **llm_kwargs
    )
    llm.collective_rpc("unlock_install")
    for name, path in keys.items():
        llm.load_key(name, path, check_fingerprint)
    return llm
