"""Run lm-evaluation-harness on the ``unlock`` model: from Python (:func:`evaluate`) and from
``unlock-fast lm-eval`` (:func:`run_cli`, lm-eval's own ``run`` options passed through).

The model loads once. ``compare`` then runs the same tasks again without the key, with the
same seeds, few-shot samples and requests, and pairs the two runs item by item
(:mod:`unlock_fast.lm_eval.compare`). Results are written by lm-eval's ``EvaluationTracker``
exactly where ``lm-eval run --output_path`` would write them; with ``compare``, the
unsteered run's go under ``OUTPUT/unsteered/`` (``OUTPUT_unsteered.json`` for a file) and
the paired differences to ``paired_differences_<date>.json`` beside them.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .._optional import require
from .compare import CI_METHOD, PairedDifference, format_differences, paired_differences
from .model import MODEL_NAME, PURPOSE, UnlockSteering, model_class

__all__ = ["LMEvalRun", "evaluate", "report", "run_cli"]

_MODEL_CONFIG = ("batch_size", "max_batch_size", "device")


@dataclass
class LMEvalRun:
    """What one call evaluated: lm-eval's results dict of the run with the key (of the plain
    model when there is no key), the unsteered run's with ``compare``, their paired
    differences, and the files written."""

    steered: dict[str, object]
    unsteered: dict[str, object] | None = None
    differences: list[PairedDifference] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    model_args: dict[str, object] = field(default_factory=dict)


def _model_args(model_args: str | Mapping[str, object]) -> dict[str, object]:
    if isinstance(model_args, str):
        parsed: dict[str, object] = require(
            "lm_eval.utils", "lm-eval", PURPOSE
        ).simple_parse_args_string(model_args)
        return parsed
    if isinstance(model_args, Mapping):
        return dict(model_args)
    raise TypeError(f"model_args must be 'k=v,...' or a dict, got {type(model_args).__name__}")


def _side(output_path: str | None, suffix: str) -> str | None:
    """Where a second run (or the comparison) goes, next to ``output_path``."""
    if not output_path:
        return None
    path = Path(output_path)
    if path.suffix == ".json":
        return str(path.with_name(f"{path.stem}_{suffix}.json"))
    return str(path / suffix)


def _logged(model_args: Mapping[str, object]) -> dict[str, object]:
    """Model arguments as lm-eval records them (and names its output folder after
    ``pretrained``): a model or tokenizer object by its name, not its repr."""
    out: dict[str, object] = {}
    for k, v in model_args.items():
        if v is None or isinstance(v, (str, int, float, bool, Path)):
            out[k] = str(v) if isinstance(v, Path) else v
        else:
            cfg = getattr(v, "config", None)
            out[k] = getattr(cfg, "_name_or_path", None) or getattr(v, "name_or_path", None)
            out[k] = out[k] or type(v).__name__
    return out


def _save(
    tracker: object, results: dict[str, object], output_path: str, log_samples: bool
) -> list[Path]:
    """Write the results (and, with ``log_samples``, the samples) as ``lm-eval run`` does."""
    samples = results.get("samples") if log_samples else None
    saved = {k: v for k, v in results.items() if k != "samples"}
    tracker.save_results_aggregated(results=saved, samples=samples)  # type: ignore[attr-defined]
    path = Path(output_path)
    date_id = tracker.date_id  # type: ignore[attr-defined]
    if path.suffix == ".json":
        folder, file = path.parent, path.with_name(f"{path.stem}_{date_id}.json")
    else:
        folder = path / str(tracker.general_config_tracker.model_name_sanitized)  # type: ignore[attr-defined]
        file = folder / f"results_{date_id}.json"
    if not file.is_file():  # lm-eval logs a failed write and goes on
        raise OSError(f"lm-eval could not write its results to {file}")
    files = [file]
    if isinstance(samples, dict):
        for task_name in samples:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])  # type: ignore[attr-defined]
            files.append(folder / f"samples_{task_name}_{date_id}.jsonl")
    return files


def _one_run(
    lm: UnlockSteering,
    model_args: dict[str, object],
    tasks: list[str],
    task_manager: object,
    output_path: str | None,
    log_samples: bool,
    keep_samples: bool,
    kwargs: dict[str, object],
) -> tuple[dict[str, object], list[Path]]:
    """One ``simple_evaluate`` of ``lm`` as it is now (steered or not), saved."""
    lm_eval = require("lm_eval", "lm-eval", PURPOSE)
    loggers = require("lm_eval.loggers", "lm-eval", PURPOSE)
    tracker = loggers.EvaluationTracker(output_path=output_path)
    results = lm_eval.simple_evaluate(
        model=lm,
        model_args=_logged(model_args),
        tasks=tasks,
        task_manager=task_manager,
        log_samples=log_samples or keep_samples,
        evaluation_tracker=tracker,
        **kwargs,
    )
    if results is None:  # a non-zero rank of a distributed run
        return {}, []
    steering = lm.steering
    results["config"]["unlock"] = {
        "steered": lm.steered,
        "key": None if steering.key is None else str(steering.key),
        "alpha": steering.alpha,
        "mode": steering.mode,
        "positions": steering.positions,
    }
    files = _save(tracker, results, output_path, log_samples) if output_path else []
    if not (log_samples or keep_samples):
        results.pop("samples", None)
    return results, files


def evaluate(
    model_args: str | Mapping[str, object],
    tasks: str | Sequence[str],
    *,
    compare: bool = False,
    include_path: str | Path | None = None,
    output_path: str | Path | None = None,
    log_samples: bool = False,
    task_manager: object | None = None,
    **kwargs: object,
) -> LMEvalRun:
    """Evaluate the ``unlock`` model on lm-eval tasks (``lm_eval.simple_evaluate``).

    model_args: ``"pretrained=NAME,key=PATH,alpha=0.1"`` or a dict (HFLM's arguments plus
    ``key``, ``alpha``, ``mode``, ``positions``, ``gguf_file``). include_path: a folder of
    local task YAML files. ``compare=True`` also runs the model without the key and pairs
    the items (it needs a key). Other keywords go to ``simple_evaluate`` (``num_fewshot``,
    ``limit``, ``batch_size``, ``device``, ``gen_kwargs``, ``apply_chat_template``, ...).
    A key made for another model raises ValueError before any task runs.
    """
    args = _model_args(model_args)
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    if not task_list:
        raise ValueError("give at least one task")
    if compare and not args.get("key"):
        raise ValueError("compare needs a key in the model arguments (key=PATH)")
    config = {k: kwargs.get(k) for k in _MODEL_CONFIG}
    lm = model_class().create_from_arg_obj(args, config)
    if task_manager is None:
        tasks_mod = require("lm_eval.tasks", "lm-eval", PURPOSE)
        task_manager = tasks_mod.TaskManager(
            include_path=None if include_path is None else str(include_path)
        )
    out = None if output_path is None else str(output_path)
    use_cache = kwargs.pop("use_cache", None)
    if use_cache:  # lm-eval's response cache is keyed by its path: one per run
        kwargs["use_cache"] = f"{use_cache}_steered" if compare else use_cache
    steered, files = _one_run(lm, args, task_list, task_manager, out, log_samples, compare, kwargs)
    run = LMEvalRun(steered, files=files, model_args=args)
    if not compare:
        return run
    if use_cache:
        kwargs["use_cache"] = f"{use_cache}_unsteered"
    with lm.unsteered():
        unsteered, files = _one_run(
            lm, args, task_list, task_manager, _side(out, "unsteered"), log_samples, True, kwargs
        )
    run.unsteered, run.files = unsteered, run.files + files
    s_samples, u_samples = steered.get("samples"), unsteered.get("samples")
    if isinstance(s_samples, dict) and isinstance(u_samples, dict):
        run.differences = paired_differences(s_samples, u_samples)
    if not log_samples:
        steered.pop("samples", None)
        unsteered.pop("samples", None)
    if out:
        stamp = datetime.now().isoformat().replace(":", "-")  # as lm-eval stamps its files
        path = Path(out)
        dest = (
            path.with_name(f"{path.stem}_paired.json")
            if path.suffix == ".json"
            else path / f"paired_differences_{stamp}.json"
        )
        dest.parent.mkdir(parents=True, exist_ok=True)
        body = {"method": CI_METHOD, "differences": [d.as_dict() for d in run.differences]}
        dest.write_text(json.dumps(body, indent=2, default=str) + "\n")
        run.files.append(dest)
    return run


def report(run: LMEvalRun) -> str:
    """The tables lm-eval prints, for each run, then the paired differences."""
    make_table = require("lm_eval.utils", "lm-eval", PURPOSE).make_table
    parts = []
    for label, res in (("steered", run.steered), ("unsteered", run.unsteered)):
        if not res:
            continue
        config = res.get("config")
        found = config.get("unlock") if isinstance(config, dict) else None
        unlock: dict[str, object] = found if isinstance(found, dict) else {}
        if run.unsteered is not None or unlock.get("steered"):
            title = f"{label}" + (
                f" (key={unlock.get('key')}, alpha={unlock.get('alpha')}, mode="
                f"{unlock.get('mode')}, positions={unlock.get('positions')})"
                if label == "steered"
                else " (the same model without the key)"
            )
            parts.append(f"== {title}")
        parts.append(make_table(res))
        if "groups" in res:
            parts.append(make_table(res, "groups"))
    if run.unsteered is not None:
        parts.append("== paired difference (steered - unsteered, item by item)")
        parts.append(format_differences(run.differences))
    return "\n".join(parts)


def _run_parser() -> argparse.ArgumentParser:
    """lm-eval's own ``run`` parser, so that every option means what it means there."""
    run_mod = require("lm_eval._cli.run", "lm-eval", PURPOSE)
    top = argparse.ArgumentParser(prog="unlock-fast lm-eval")
    sub = top.add_subparsers(dest="command")
    run_mod.Run.create(sub)
    parser: argparse.ArgumentParser = sub.choices["run"]
    parser.prog = "unlock-fast lm-eval"
    return parser


def _lm_eval_argv(argv: Sequence[str]) -> list[str]:
    """``--model-args`` as lm-eval spells it; ``--model`` is always ``unlock`` here."""
    out = []
    for a in argv:
        if a == "--model-args" or a.startswith("--model-args="):
            a = a.replace("--model-args", "--model_args", 1)
        if a in ("--model", "-M") or a.startswith("--model="):
            raise ValueError("the model is always lm-eval's 'unlock' here; drop --model")
        out.append(a)
    return ["--model", MODEL_NAME, *out]


def run_cli(argv: Sequence[str], *, compare: bool = False) -> LMEvalRun:
    """``lm-eval run --model unlock ARGV`` (lm-eval's options), with ``compare``; prints
    lm-eval's tables (and the paired differences) and returns the run."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_class()  # registered before lm-eval checks the model name
    ns = _run_parser().parse_args(_lm_eval_argv(argv))
    cfg_mod = require("lm_eval.config.evaluate_config", "lm-eval", PURPOSE)
    cfg = cfg_mod.EvaluatorConfig.from_cli(ns)
    if cfg.wandb_args or cfg.trackio_args or cfg.hf_hub_log_args:
        raise ValueError("W&B, Trackio and Hub logging are not supported here; use lm-eval's API")
    task_manager = cfg.process_tasks(cfg.metadata)
    seeds = cfg.seed or [None] * 4
    run = evaluate(
        dict(cfg.model_args),
        cfg.tasks,
        compare=compare,
        output_path=cfg.output_path,
        log_samples=bool(cfg.log_samples),
        task_manager=task_manager,
        num_fewshot=cfg.num_fewshot,
        batch_size=cfg.batch_size,
        max_batch_size=cfg.max_batch_size,
        device=cfg.device,
        use_cache=cfg.use_cache,
        cache_requests=cfg.cache_requests.get("cache_requests", False),
        rewrite_requests_cache=cfg.cache_requests.get("rewrite_requests_cache", False),
        delete_requests_cache=cfg.cache_requests.get("delete_requests_cache", False),
        limit=cfg.limit,
        samples=cfg.samples,
        check_integrity=cfg.check_integrity,
        write_out=cfg.write_out,
        system_instruction=cfg.system_instruction,
        apply_chat_template=cfg.apply_chat_template,
        fewshot_as_multiturn=cfg.fewshot_as_multiturn,
        gen_kwargs=cfg.gen_kwargs,
        verbosity=cfg.verbosity,
        predict_only=cfg.predict_only,
        random_seed=seeds[0],
        numpy_random_seed=seeds[1],
        torch_random_seed=seeds[2],
        fewshot_random_seed=seeds[3],
        confirm_run_unsafe_code=cfg.confirm_run_unsafe_code,
        metadata=cfg.metadata,
    )
    args = {k: v for k, v in run.model_args.items() if k != "trust_remote_code"}
    print(
        f"{MODEL_NAME} ({args}), gen_kwargs: ({cfg.gen_kwargs}), limit: {cfg.limit}, "
        f"num_fewshot: {cfg.num_fewshot}, batch_size: {cfg.batch_size}"
    )
    print(report(run))
    for f in run.files:
        print(f"wrote {f}")
    return run
