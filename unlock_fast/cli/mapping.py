"""``unlock-fast map``: a saved direction through a saved alignment into a Target key."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import load_artifact
from ..artifacts import Alignment, Direction
from .common import UsageError
from .options import add_command

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "map",
        help="send a saved direction through a saved alignment: a Target key, no model run",
        description="Transfer a direction (from extract or transfer) with an alignment (from "
        "align or transfer) into a key for the alignment's Target: r_t = v_s T per Target "
        "layer. No model is loaded, so one alignment, fitted once per model pair (e.g. on a "
        "generic corpus: align --alignment-data corpus --corpus generic), serves any number "
        "of directions of its Source. A direction of another model is refused.",
    )
    p.add_argument("--direction", "-d", required=True, help="direction folder (the Source's)")
    p.add_argument("--alignment", "-a", required=True, help="alignment folder")
    p.add_argument("-o", "--out", required=True, help="folder to write the key to")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    direction = load_artifact(args.direction)
    if not isinstance(direction, Direction):
        raise UsageError(
            f"{args.direction} holds a saved {type(direction).__name__}, not a direction"
        )
    alignment = load_artifact(args.alignment)
    if not isinstance(alignment, Alignment):
        raise UsageError(
            f"{args.alignment} holds a saved {type(alignment).__name__}, not an alignment"
        )
    key = alignment.transfer(direction)
    out = Path(args.out)
    key.save_pretrained(out)
    print(
        f"key for {key.model.name}: {len(key.layers)} layers x {key.model.hidden_size}, "
        f"alignment rank {alignment.k}; wrote {out}"
    )
    print(f"next: unlock-fast generate -m {key.model.name} --key {out} --prompt '...'")
    return 0
