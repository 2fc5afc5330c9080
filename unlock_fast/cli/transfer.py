"""``unlock-fast transfer``: direction, alignment and transferred key, end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import fit_transfer, write_diagnostics
from .options import add_alignment, add_command, add_data, add_model, add_output, add_runtime

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "transfer",
        help="end to end: direction, alignment, transferred key (writes artifacts)",
        description="Extract the Source's CoT direction, fit the alignment, transfer the "
        "direction into a Target key, and write direction/, alignment/, key/ and "
        "diagnostics.{json,md} to --out.",
    )
    add_model(p, "source", "-s")
    add_model(p, "target", "-t")
    p.add_argument(
        "--method", choices=("mean", "pca"), default="mean", help="direction aggregation"
    )
    add_alignment(p)
    add_output(p, "folder for the artifacts")
    add_data(p, 64, "problems for the direction and the alignment (N)")
    add_runtime(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = fit_transfer(args, with_direction=True)
    if result.direction is None or result.key is None:
        raise RuntimeError("the transfer run made no direction or key")
    out = Path(args.out)
    result.direction.save_pretrained(out / "direction")
    result.alignment.save_pretrained(out / "alignment")
    result.key.save_pretrained(out / "key")
    write_diagnostics(result, out)
    print(f"wrote {out}/direction, {out}/alignment, {out}/key")
    print(f"next: unlock-fast generate -m {args.target} --key {out / 'key'} --prompt '...'")
    return 0
