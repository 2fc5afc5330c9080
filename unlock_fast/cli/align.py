"""``unlock-fast align``: the Source->Target alignment map and its held-out diagnostics."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import fit_transfer, write_diagnostics
from .options import add_command, add_fit

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "align",
        help="fit the Source->Target alignment map and diagnose it on held-out prompts",
        description="Fit the per-layer linear map from Source to Target activations (layers "
        "paired by proportional depth) on the direct-prompt form of N problems, in the "
        "streaming Gram form, and report held-out relative error and centred R² per layer.",
    )
    add_fit(p, "folder to write the alignment to", "problems to fit on (N)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = fit_transfer(args, with_direction=False)
    out = Path(args.out)
    result.alignment.save_pretrained(out)
    write_diagnostics(result, out)
    print(
        f"alignment rank {result.alignment.k} over {len(result.alignment.layer_map)} "
        f"layer pairs; wrote {out}"
    )
    return 0
