"""``unlock-fast evaluate``: the four conditions with a key, or a held-out grid search
over rank x alpha x N."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .._optional import MissingDependency
from ..evaluation.conditions import CONDITIONS, EvaluationResult, Runner, write_items
from ..evaluation.evidence import behavioural_evidence
from ..evaluation.report import (
    behavioural_null_table,
    condition_table,
    plot_null_spread,
    write_json,
    write_null_items,
)
from ..evaluation.selection import grid_search
from .common import UsageError, alignment_data, chat_for, load, load_key, problems
from .options import (
    add_alignment_data,
    add_command,
    add_data,
    add_max_new_tokens,
    add_model,
    add_output,
    add_runtime,
    add_steering,
    chat_mode,
    float_list,
    int_list,
    nonnegative_int,
    positive_int,
)

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "evaluate",
        help="evaluate the four conditions, or grid-search rank/alpha/N",
        description="With --key: run the Target under four conditions (direct prompt, CoT "
        "prompt, UNLOCK with the key, random key of equal norm) on the test items and write "
        "a report. With --source instead: grid-search rank x alpha x N on a held-out split "
        "disjoint from the test split, then score only the selected setting on the test "
        "split.",
    )
    add_model(p, "target", "-t")
    p.add_argument("--key", default=None, help="a transferred key folder (from transfer)")
    p.add_argument(
        "--source", "-s", default=None, metavar="MODEL", help="grid search: the Source model"
    )
    p.add_argument(
        "--source-gguf-file", default=None, metavar="FILE", help="GGUF file for --source"
    )
    p.add_argument(
        "--source-chat", type=chat_mode, default="auto", help="chat template for the Source"
    )
    p.add_argument("--ranks", type=int_list, default=[16, 64], help="grid: ranks")
    p.add_argument("--alphas", type=float_list, default=[0.05, 0.1, 0.2, 0.5], help="grid: alphas")
    p.add_argument(
        "--ns",
        type=int_list,
        default=None,
        help="grid: numbers of training problems N (default: --n-train)",
    )
    p.add_argument("--n-train", type=positive_int, default=64, help="grid: train problems")
    p.add_argument("--n-heldout", type=positive_int, default=32, help="grid: held-out problems")
    p.add_argument(
        "--conditions",
        default="baseline,cot,unlock,random",
        help="conditions to run, comma-separated",
    )
    p.add_argument(
        "--random-keys",
        type=nonnegative_int,
        default=1,
        metavar="N",
        help="with --key: compare UNLOCK with N random keys of the key's per-layer norms "
        "(seeds --seed, --seed+1, ...; the random condition's key is the first) and report a "
        "permutation p-value per measure (default: 1, the random condition alone, no test)",
    )
    p.add_argument(
        "--null-keys",
        default=None,
        metavar="FOLDERS",
        help="with --key: comma-separated key folders of null-contrast keys (directions from "
        "a shuffled contrast sent through the same alignment) to add to the null",
    )
    add_alignment_data(p)  # for the grid search's alignments
    add_steering(p)
    add_max_new_tokens(p)
    add_output(p, "report folder", default="unlock-fast-eval")
    add_data(p, 100, "test problems")
    add_runtime(p)
    p.set_defaults(run=run)


def _conditions(text: str) -> list[str]:
    conditions = [c for c in text.replace(" ", "").split(",") if c]
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not conditions:
        raise UsageError(f"--conditions must be a subset of {','.join(CONDITIONS)}, got {text}")
    return conditions


def run(args: argparse.Namespace) -> int:
    conditions = _conditions(args.conditions)
    if (args.key is None) == (args.source is None):
        raise UsageError(
            "give --key (evaluate a key) or --source (grid search), not both or neither"
        )
    data = alignment_data(args)
    if args.key is not None and (data["alignment_data"] != "locked" or args.corpus):
        raise UsageError("--alignment-data and --corpus choose the grid search's alignment "
                         "data (--source); a --key was fitted already")  # fmt: skip
    ns = args.ns or [args.n_train]
    if "corpus" in data["alignment_data"] and len(ns) > 1:
        raise UsageError("a corpus enters the alignment once: give one N (--ns) with --corpus")
    out = Path(args.out)
    tmodel, ttok = load(args, "target")
    target = Runner(
        tmodel, ttok, chat_for(ttok, args.target_chat), args.alpha, args.mode, args.positions,
        args.max_new_tokens, args.batch_size, not args.no_progress,
    )  # fmt: skip
    result: EvaluationResult
    payload: dict[str, Any]
    extra = ""
    if args.key is not None:
        key = load_key(args.key, tmodel)
        test = problems(args, {"test": args.n})["test"]
        result = target.evaluate(test, key, conditions=conditions, seed=args.seed)
        payload = result.to_dict()
        null_keys = [load_key(k, tmodel) for k in (args.null_keys or "").split(",") if k]
        if args.random_keys > 1 or null_keys:
            null, families = behavioural_evidence(
                target, test, result, key, num_random=args.random_keys,
                contrast_keys=null_keys, seed=args.seed,
            )  # fmt: skip
            if null is not None:
                payload["behavioural_null"] = null.to_dict()
                payload["null_conditions"] = {
                    k: [c.summary() for c in v] for k, v in families.items()
                }
                extra = _write_null(out, result, null, families)
    else:
        smodel, stok = load(args, "source")
        splits = problems(args, {"train": max(ns), "heldout": args.n_heldout, "test": args.n})
        grid = grid_search(
            (smodel, stok), target, splits, ranks=args.ranks, alphas=args.alphas, ns=ns,
            source_chat=chat_for(stok, args.source_chat), seed=args.seed, conditions=conditions,
            data=data,
        )  # fmt: skip
        result = grid.test
        payload = grid.to_dict()
        s = grid.selected
        print(
            f"selected on held-out: rank {s.rank}, alpha {s.alpha:g}, N {s.n} "
            f"(held-out UNLOCK accuracy {s.heldout})"
        )
    write_items(result.conditions.values(), out / "items.jsonl")
    write_json(payload, out / "report.json")
    table = condition_table(result) + extra
    (out / "report.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}/report.json, report.md, items.jsonl")
    return 0


def _write_null(out: Path, result: EvaluationResult, null: Any, families: dict[str, Any]) -> str:
    """null_items.jsonl and null_spread.png (when matplotlib is there); the report's text."""
    write_null_items(families, result, out / "null_items.jsonl")
    text = "\n\nUNLOCK against null keys (one-sided permutation p per measure):\n\n"
    text += behavioural_null_table(null)
    try:
        plot_null_spread(null, result.conditions, out / "null_spread.png")
    except MissingDependency as e:
        text += f"\n\n(no null_spread.png: {e})"
    return text
