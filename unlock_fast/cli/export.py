"""``unlock-fast export``: a saved key as a file another engine runs (llama.cpp)."""

from __future__ import annotations

import argparse

from .. import load_artifact
from ..artifacts import KeyLike
from ..export import to_llamacpp
from .common import UsageError
from .options import add_command

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "export",
        help="export a steering key to a llama.cpp control vector",
        description="Write a saved key (or direction) as a llama.cpp control vector GGUF "
        "(--control-vector FILE). llama.cpp adds the vector at every token and cannot steer "
        "block 0 or rotate at the last prompt token, so the file holds alpha*r for blocks "
        "1..L-1: unlock-fast's --mode add --positions all.",
    )
    p.add_argument("key", help="steering key or direction folder")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--to", choices=("gguf",), default="gguf", help="the format (llama.cpp GGUF)")
    p.add_argument("--alpha", type=float, required=True, help="steering strength baked in")
    p.add_argument(
        "--model-hint", default=None, help="controlvector.model_hint (default: the key's model)"
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    obj = load_artifact(args.key)
    if not isinstance(obj, KeyLike):
        raise UsageError(f"{args.key} holds a {type(obj).__name__}, not a key or direction")
    result = to_llamacpp(obj, args.out, alpha=args.alpha, model_hint=args.model_hint)
    print(f"note: {result.note}")
    print(f"wrote {result.path} (layers {result.layers[0]}..{result.layers[-1]})")
    return 0
