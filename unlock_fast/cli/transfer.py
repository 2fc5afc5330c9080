"""``unlock-fast transfer``: direction, alignment and transferred key, end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import fit_transfer, write_diagnostics
from .options import add_command, add_fit

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
    add_fit(
        p,
        "folder for the artifacts",
        "problems for the direction and the alignment (N)",
        method=True,
    )
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
