"""The ``unlock-fast`` command line.

    unlock-fast demo                      # the whole pipeline offline on two shipped models
    unlock-fast transfer -s SRC -t TGT -o keys/
    unlock-fast map --direction dirs/cot --alignment pair/ -o keys/cot   # reuse an alignment
    unlock-fast generate -m TGT --key keys/key --prompt "..."
    unlock-fast evaluate -t TGT --key keys/key --dataset builtin
    unlock-fast lm-eval --model-args pretrained=TGT,key=keys/key --tasks gsm8k
    unlock-fast corpus -o corpus.txt -n 4096   # alignment data with no topic

Models are hub ids, local folders, ``.gguf`` files, or the shipped names ``gemma-3-270m``
and ``smollm2-135m-instruct``. A user mistake prints one line and exits with status 2.
One module per command, each with ``add_parser(sub)`` and ``run(args)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from . import (
    align,
    corpus,
    demo,
    evaluate,
    export,
    extract,
    generate,
    lm_eval,
    mapping,
    serve,
    transfer,
)
from .common import OneLineParser, UsageError, run_command
from .options import EPILOG_MODELS

__all__ = ["UsageError", "build_parser", "main"]

# In the order of ``unlock-fast --help``.
_COMMANDS = (
    demo,
    extract,
    align,
    transfer,
    mapping,
    generate,
    evaluate,
    lm_eval,
    export,
    serve,
    corpus,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``unlock-fast`` parser, with every command's subparser."""
    parser = OneLineParser(
        prog="unlock-fast",
        description="Training-free capability transfer between language models (UNLOCK): "
        "extract a capability direction from a Source model, align the Source's activation "
        "space to a Target's, and steer the Target with the transferred key.",
        epilog=EPILOG_MODELS,
    )
    parser.add_argument("--version", action="version", version=f"unlock-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``unlock-fast``; returns the exit status. A mistake in the command
    line prints one line on stderr and exits with status 2 (SystemExit, as argparse does);
    ``--help`` and ``--version`` exit with status 0."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "serve":  # what serve does not know is vLLM's
        args.vllm_args, extra = extra, []
    if args.command == "lm-eval":  # and what lm-eval does not know is lm-eval's
        args.lm_eval_args, extra = extra, []
    if extra:  # name the command whose options these are not
        _command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        print("unlock-fast: error: give a COMMAND (see unlock-fast --help)", file=sys.stderr)
        return 2
    return run_command(args, args.run)


def _command_parser(
    parser: argparse.ArgumentParser, command: str | None
) -> argparse.ArgumentParser:
    """The subparser of ``command`` (the main parser when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            found = action.choices[command]
            if isinstance(found, argparse.ArgumentParser):
                return found
    return parser
