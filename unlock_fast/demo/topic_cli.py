"""The topic part on its own: ``python -m unlock_fast.demo.topic_cli --out DIR [options]``.

Loads the Source and the Target, runs :func:`~unlock_fast.demo.topic.run_topic` and writes
report.md, report.json, items.jsonl and topic_rates.png into ``--out``, again after each
stage, so a long run leaves whole conditions behind at any time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..artifacts.data import ALIGNMENT_DATA
from ..cli.common import OneLineParser, run_command
from ..cli.options import add_runtime, float_list, int_list, nonnegative_int, positive_int
from ..evaluation.conditions import Runner
from ..evaluation.report import write_json
from ..loading import load_model
from .config import DEFAULTS
from .topic import TopicConfig, TopicResult, run_topic
from .topic_items import TOPICS
from .topic_report import plot_topic_rates, topic_markdown, write_topic_items

__all__ = ["build_parser", "main", "write_topic_report"]


def write_topic_report(result: TopicResult, out: str | Path) -> dict[str, Path]:
    """report.md, report.json, items.jsonl and topic_rates.png of a topic-only run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(
        topic_markdown(result, heading="#")
        + f"\nThreads: {torch.get_num_threads()}. Per-item outputs: items.jsonl; plot: "
        "topic_rates.png.\n",
        encoding="utf-8",
    )
    return {
        "markdown": md,
        "json": write_json(result.to_dict(), out / "report.json"),
        "items": write_topic_items(result, out / "items.jsonl"),
        "plot": plot_topic_rates(result, out / "topic_rates.png"),
    }


def _alignment_data(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in ALIGNMENT_DATA]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(ALIGNMENT_DATA)}, got {text!r}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    d = TopicConfig()
    p = OneLineParser(
        prog="python -m unlock_fast.demo.topic_cli",
        description="The demo's topic part on its own: a topic direction of the Source sent "
        "through alignment maps fitted on several choices of data, against random and "
        "null-contrast keys, with the Target's own direction as the ceiling.",
    )
    p.set_defaults(command="topic")
    p.add_argument("--out", "-o", required=True, help="report folder")
    p.add_argument("--source", default=DEFAULTS.source, help="Source model")
    p.add_argument("--target", default=DEFAULTS.target, help="Target model")
    p.add_argument("--topic", choices=sorted(TOPICS), default=d.topic)
    p.add_argument("--alignment-data", type=_alignment_data, default=d.alignment_data,
                   help=f"comma-separated, run in this order (default: "
                   f"{','.join(d.alignment_data)})")  # fmt: skip
    sizes = [
        ("--n-train", positive_int, d.n_train), ("--n-heldout", nonnegative_int, d.n_heldout),
        ("--n-test", positive_int, d.n_test), ("--corpus-size", positive_int, d.corpus_size),
        ("--select-random", positive_int, d.select_random),
        ("--random-keys", nonnegative_int, d.random_keys),
        ("--null-contrasts", nonnegative_int, d.null_contrasts),
        ("--num-random", positive_int, d.num_random),
        ("--max-new-tokens", positive_int, d.max_new_tokens),
    ]  # fmt: skip
    for flag, typ, value in sizes:
        p.add_argument(flag, type=typ, default=value, help=f"(default: {value})")
    p.add_argument("--ranks", type=int_list, default=list(d.ranks),
                   help="rank candidates (default: %(default)s)")  # fmt: skip
    p.add_argument("--alphas", type=float_list, default=list(d.alphas),
                   help="alpha candidates (default: %(default)s)")  # fmt: skip
    p.add_argument("--own-alpha", type=float, default=d.own_alpha,
                   help="alpha of the Target's own direction when --alphas holds one value "
                   "(default: %(default)s)")  # fmt: skip
    add_runtime(p, batch_size=d.batch_size)
    return p


def _run(args: argparse.Namespace) -> int:
    cfg = TopicConfig(
        topic=args.topic, n_train=args.n_train, n_heldout=args.n_heldout, n_test=args.n_test,
        alignment_data=tuple(args.alignment_data), corpus_size=args.corpus_size,
        ranks=tuple(args.ranks), alphas=tuple(args.alphas), own_alpha=args.own_alpha,
        select_random=args.select_random,
        random_keys=args.random_keys, null_contrasts=args.null_contrasts,
        num_random=args.num_random, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed,
    )  # fmt: skip
    load: dict[str, Any] = dict(
        dtype=args.dtype, device=args.device, device_map=args.device_map,
        cache_dir=args.cache_dir, progress=not args.no_progress,
    )  # fmt: skip
    source, target = (
        Runner(*load_model(name, **load), batch_size=cfg.batch_size, progress=not args.no_progress)
        for name in (args.source, args.target)
    )

    def checkpoint(r: TopicResult) -> None:
        write_topic_report(r, args.out)

    result = run_topic(
        source, target, cfg, source_name=args.source, target_name=args.target,
        checkpoint=checkpoint,
    )  # fmt: skip
    print(topic_markdown(result, heading="#"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args, _run)


if __name__ == "__main__":
    sys.exit(main())
