"""``unlock-fast corpus``: write the generic corpus (plain prose, no topic) to a file."""

from __future__ import annotations

import argparse

from ..corpus import GENERIC_SIZE, generic_corpus, write_corpus
from .common import info
from .options import add_command, positive_int

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "corpus",
        help="write a generic corpus of plain English sentences (alignment data)",
        description="Write N distinct sentences of ordinary prose (10 to 40 words each), made "
        "offline from the prose that ships with Python's standard library (and, past it, "
        "with the packages the core depends on), with no topic vocabulary: alignment data "
        "that never shows the capability (--alignment-data corpus). One sentence a line, "
        "or JSON objects with a 'text' field when FILE ends in .jsonl. The same N and seed "
        "give the same file on the same installation.",
    )
    p.add_argument("-o", "--out", required=True, metavar="FILE", help="the file to write")
    p.add_argument(
        "-n", type=positive_int, default=GENERIC_SIZE, metavar="N", help="number of sentences"
    )
    p.add_argument("--seed", type=int, default=0, help="which sentences, in which order")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    info(args, f"collecting {args.n} sentences (seed {args.seed})")
    path = write_corpus(args.out, generic_corpus(args.n, seed=args.seed))
    print(f"wrote {args.n} sentences to {path}")
    return 0
