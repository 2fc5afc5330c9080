"""``unlock-fast generate``: greedy generation, steered by a saved key."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation.conditions import Runner
from ..prompts import format_prompts
from .common import UsageError, chat_for, load, load_key
from .options import add_command, add_max_new_tokens, add_model, add_runtime, add_steering

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "generate",
        help="generate with a model, steered by a key",
        description="Greedy generation from prompts, steered with a saved key (or direction) "
        "during prefill at the last prompt token (the paper's rule) unless told otherwise. "
        "With --compare, prints the unsteered output too.",
    )
    add_model(p, "model", "-m")
    p.add_argument("--key", default=None, help="steering key or direction folder (none: unsteered)")
    p.add_argument(
        "--prompt",
        "-p",
        action="append",
        default=[],
        help="a question or prompt; repeat for several",
    )
    p.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    p.add_argument(
        "--template",
        choices=("direct", "cot", "none"),
        default="direct",
        help="wrap each prompt as a question in the direct or CoT form, or use it as is",
    )
    add_steering(p)
    add_max_new_tokens(p)
    p.add_argument("--compare", action="store_true", help="also print the unsteered output")
    add_runtime(p)
    p.set_defaults(run=run)


def _prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, then the non-blank lines of --prompts-file."""
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"prompts file not found: {path}")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError("give at least one --prompt or a --prompts-file")
    return prompts


def run(args: argparse.Namespace) -> int:
    prompts = _prompts(args)
    model, tok = load(args, "model")
    key = load_key(args.key, model) if args.key else None
    if args.template != "none":
        prompts = format_prompts(
            prompts, args.template, tokenizer=tok, chat=chat_for(tok, args.model_chat)
        )
    runner = Runner(
        model, tok, alpha=args.alpha, mode=args.mode, positions=args.positions,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False,
        stop_strings=(),
    )  # fmt: skip
    steered = [text for text, _ in runner.generate(prompts, key)]
    plain = None
    if args.compare and key is not None:
        plain = [text for text, _ in runner.generate(prompts)]
    label = f"steered (alpha={args.alpha})" if key is not None else "output"
    for i, prompt in enumerate(prompts):
        print(f"=== prompt {i + 1}\n{prompt}")
        print(f"--- {label}\n{steered[i]}")
        if plain is not None:
            print(f"--- unsteered\n{plain[i]}")
    return 0
