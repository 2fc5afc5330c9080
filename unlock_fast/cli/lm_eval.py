"""``unlock-fast lm-eval``: lm-evaluation-harness on a model steered by a key.

Everything but ``--compare`` is lm-eval's ``run`` command, with the model fixed to
``unlock`` (lm-eval's command line does not find models from other packages)::

    unlock-fast lm-eval --model-args pretrained=smollm2-135m-instruct,key=keys/key,alpha=0.1 \\
        --tasks gsm8k --num_fewshot 0 --batch_size 8 --output_path results/ --compare
"""

from __future__ import annotations

import argparse

from ..lm_eval import run_cli
from .options import add_command

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "lm-eval",
        help="evaluate a key with lm-evaluation-harness (its tasks and options)",
        description="Run lm-evaluation-harness (the optional extra lm-eval) on a model steered "
        "by a key through steer(): the paper's rule (rotation at the last prompt token, in "
        "prefill) unless told otherwise. Every other option is lm-eval's `run` option, passed "
        "through: --model-args (or --model_args) pretrained=MODEL,key=PATH,alpha=A,mode=M,"
        "positions=P plus HFLM's arguments; --tasks, --num_fewshot, --batch_size, --limit, "
        "--output_path, --log_samples, --include_path, --gen_kwargs, --apply_chat_template, "
        "... (see lm-eval run --help). A key made for another model is refused before any task "
        "runs.",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="also run the model without the key on the same tasks and print both scores "
        "with the paired difference and its 95%% CI (normal approximation over items)",
    )
    p.add_argument("--threads", default=None, help="CPU threads for torch: a number or auto")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    run_cli(list(args.lm_eval_args), compare=args.compare)
    return 0
