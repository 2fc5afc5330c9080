"""What the commands share at run time: loading, problem splits, the transfer run, keys,
threads, and turning user mistakes into one line and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from .. import Direction, SteeringKey, load_artifact
from .._optional import MissingDependency
from ..evaluation.conditions import Runner
from ..evaluation.evidence import TransferRun, run_transfer
from ..evaluation.problems import DatasetError, Problem, load_dataset_spec, problem_splits
from ..evaluation.report import alignment_table, write_json
from ..loading import ModelNotFoundError, load_model
from ..prompts import use_chat

__all__ = [
    "Command",
    "alignment_data",
    "OneLineParser",
    "USER_ERRORS",
    "UsageError",
    "chat_for",
    "fit_transfer",
    "info",
    "load",
    "load_key",
    "problems",
    "run_command",
    "set_threads",
    "write_diagnostics",
]

# What a subcommand's ``run`` looks like: parsed arguments in, exit status out.
Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2, like every
    other user mistake (argparse prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


# Errors that come from the user's input: one line and exit status 2 (unless --debug).
USER_ERRORS: tuple[type[Exception], ...] = (
    UsageError,
    MissingDependency,
    DatasetError,
    ModelNotFoundError,
    ValueError,
    TypeError,
    FileNotFoundError,
    OSError,
    KeyError,
)


def info(args: argparse.Namespace, msg: str) -> None:
    """A progress line on stderr, unless --no-progress."""
    if not getattr(args, "no_progress", False):
        print(msg, file=sys.stderr, flush=True)


def set_threads(threads: int | str) -> int:
    """Apply --threads; returns the number of torch CPU threads in use."""
    if threads == "auto":
        cores = os.cpu_count() or 1
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # not on every platform
            busy = 0.0
        threads = max(1, min(torch.get_num_threads(), int(cores - busy + 0.5)))
    torch.set_num_threads(int(threads))
    return int(threads)


def load(args: argparse.Namespace, role: str, name: str | None = None) -> tuple[Any, Any]:
    """Load the model of ``role`` (``args.<role>`` unless ``name``) and its tokenizer,
    with the GGUF file ``args.<role>_gguf_file`` and the runtime options."""
    name = getattr(args, role) if name is None else name
    gguf = getattr(args, f"{role}_gguf_file", None)
    t0 = time.perf_counter()
    model, tok = load_model(
        name,
        gguf_file=gguf,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    info(args, f"loaded {role} {name} ({time.perf_counter() - t0:.1f} s)")
    return model, tok


def chat_for(tokenizer: Any, chat: bool | str) -> bool:
    """Resolve a --chat value (auto, on, off) for this tokenizer."""
    return use_chat(tokenizer, chat)


def problems(args: argparse.Namespace, sizes: dict[str, int]) -> dict[str, list[Problem]]:
    """Disjoint splits: from the generator, or consecutive slices of a dataset file."""
    if args.dataset in ("builtin", "arith", "arithmetic"):
        return problem_splits(sizes, seed=args.seed)
    items = load_dataset_spec(args.dataset)
    need = sum(sizes.values())
    if len(items) < need:
        raise UsageError(
            f"{args.dataset} holds {len(items)} items but {need} are needed "
            f"({', '.join(f'{k} {v}' for k, v in sizes.items())}); lower the counts"
        )
    out: dict[str, list[Problem]] = {}
    start = 0
    for name, n in sizes.items():
        out[name] = items[start : start + n]
        start += n
    return out


def alignment_data(args: argparse.Namespace) -> dict[str, Any]:
    """--alignment-data, --corpus and --corpus-limit as keywords of collect_transfer,
    checked: a corpus choice needs --corpus and the other choices refuse one."""
    choice, corpus, limit = args.alignment_data, args.corpus, args.corpus_limit
    if "corpus" in choice and corpus is None:
        raise UsageError(f"--alignment-data {choice} needs --corpus FILE or --corpus generic")
    if "corpus" not in choice and corpus is not None:
        raise UsageError(
            f"--corpus is used by --alignment-data corpus or locked+corpus, not {choice}"
        )
    if limit is not None and corpus is None:
        raise UsageError("--corpus-limit needs --corpus")
    return {"alignment_data": choice, "corpus": corpus, "corpus_limit": limit}


def fit_transfer(args: argparse.Namespace, *, with_direction: bool) -> TransferRun:
    """Load Source and Target and run the transfer experiment on the problems; without
    ``with_direction`` only the alignment (and its held-out diagnostics) is made."""
    if args.n_heldout < 0:
        raise UsageError(f"--n-heldout must be >= 0, got {args.n_heldout}")
    data = alignment_data(args)
    smodel, stok = load(args, "source")
    tmodel, ttok = load(args, "target")
    sizes = {"train": args.n}
    if args.n_heldout:
        sizes["heldout"] = args.n_heldout
    splits = problems(args, sizes)
    kw = dict(batch_size=args.batch_size, progress=not args.no_progress)
    source = Runner(smodel, stok, chat_for(stok, args.source_chat), **kw)
    target = Runner(tmodel, ttok, chat_for(ttok, args.target_chat), **kw)
    return run_transfer(
        source, target, splits["train"], splits.get("heldout"), rank=args.rank,
        method=getattr(args, "method", "mean"), centered=args.centered, ridge=args.ridge,
        with_direction=with_direction, accumulate=args.accumulate,
        solver=args.solver or "auto", oversample=args.oversample, n_iter=args.power_iters,
        data=data,
    )  # fmt: skip


def write_diagnostics(run: TransferRun, out: Path) -> None:
    """diagnostics.json and diagnostics.md in ``out``, and the table on stdout."""
    if run.diagnostics is None:
        return
    write_json(run.diagnostics.to_dict(), out / "diagnostics.json")
    (out / "diagnostics.md").write_text(alignment_table(run.diagnostics) + "\n")
    print(alignment_table(run.diagnostics))


def load_key(path: str, model: Any) -> SteeringKey:
    """A saved steering key (or a direction, as its key), checked against ``model``."""
    obj = load_artifact(path)
    if isinstance(obj, Direction):
        obj = obj.as_key()
    if not isinstance(obj, SteeringKey):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a steering key or direction")
    obj.model.check(model, what=f"the key in {path}")
    return obj


def _one_line(command: str, error: Exception) -> str:
    text = str(error).strip()
    msg = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, KeyError):
        msg = f"missing entry {error}"
    return f"unlock-fast {command}: error: {msg}"


def run_command(args: argparse.Namespace, run: Command) -> int:
    """Apply --threads and run the command; a user mistake prints one line on stderr and
    returns 2 (with --debug or $UNLOCK_FAST_DEBUG it raises), Ctrl-C returns 130."""
    debug = args.debug or bool(os.environ.get("UNLOCK_FAST_DEBUG"))
    try:
        if getattr(args, "threads", None) is not None:
            set_threads(args.threads)
        return run(args)
    except KeyboardInterrupt:
        print("unlock-fast: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        print(_one_line(args.command, e), file=sys.stderr)
        return 2
