"""``unlock-fast extract``: the capability direction of one model (or a locked/unlocked
pair), per decoder layer."""

from __future__ import annotations

import argparse
from typing import Any

from .. import extract_direction
from ..prompts import format_prompts
from .common import chat_for, load, problems
from .options import (
    add_command,
    add_data,
    add_method,
    add_model,
    add_output,
    add_runtime,
    layer_spec,
)

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "extract",
        help="extract a capability direction from one model (or a locked/unlocked pair)",
        description="Extract the capability direction per decoder layer: the mean (or PCA) "
        "difference of last-prompt-token activations between the unlocked and the locked "
        "condition. Prompt contrast (default): one model, direct vs chain-of-thought prompt. "
        "Model contrast: --unlocked-model, same prompt.",
    )
    add_model(p, "model", "-m")
    p.add_argument(
        "--unlocked-model",
        default=None,
        metavar="MODEL",
        help="model contrast: the post-trained model (same shapes as --model)",
    )
    p.add_argument(
        "--unlocked-gguf-file", default=None, metavar="FILE", help="GGUF file for --unlocked-model"
    )
    add_method(p, "aggregation")
    p.add_argument(
        "--layers",
        type=layer_spec,
        default=None,
        help="decoder layers: all, 3,5,7 or 4-9 (default: all)",
    )
    add_output(p, "folder to write the direction to")
    add_data(p, 64, "problems to extract from")
    add_runtime(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, tok = load(args, "model")
    chat = chat_for(tok, args.model_chat)
    items = problems(args, {"train": args.n})["train"]
    q = [p.question for p in items]
    locked = format_prompts(q, "direct", tokenizer=tok, chat=chat)
    kwargs: dict[str, Any] = {}
    if args.unlocked_model:
        umodel, utok = load(args, "unlocked", args.unlocked_model)
        kwargs.update(unlocked_model=umodel, unlocked_tokenizer=utok)
        unlocked = format_prompts(q, "direct", tokenizer=utok, chat=chat_for(utok, args.model_chat))
    else:
        unlocked = format_prompts(q, "cot", tokenizer=tok, chat=chat)
    direction = extract_direction(
        model,
        tok,
        locked,
        unlocked,
        method=args.method,
        layers=args.layers,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        **kwargs,
    )
    direction.save_pretrained(args.out)
    norms = direction.vectors.norm(dim=-1)
    print(
        f"direction: {len(direction.layers)} layers x {direction.vectors.shape[1]}, "
        f"{direction.num_prompts} prompts, {direction.method}; norms "
        f"{float(norms.min()):.3g}..{float(norms.max()):.3g}"
    )
    print(f"wrote {args.out}")
    return 0
