"""``unlock-fast demo``: chain-of-thought transfer between two small shipped models, offline.

Source: SmolLM2-135M-Instruct (30 layers, d=576). Target: Gemma-3-270M base (18 layers,
d=640). Different families, tokenizers, depths and widths. Steps:

1. load both models (GGUF, converted once and cached);
2. draw disjoint train / held-out / test splits of built-in arithmetic word problems;
3. Source CoT direction (direct vs CoT prompt) and Source->Target alignment on train;
4. held-out alignment diagnostics, and the Target's own CoT direction on held-out items,
   compared per layer with the transferred key against random directions sent through the
   same alignment;
5. the four conditions on the test split; optional alpha sweep on the held-out split;
6. report.md / report.json / items.jsonl / plots / artifacts in the report folder.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .evaluation.experiment import key_cosines, rank_sweep, run_transfer, target_direction
from .evaluation.metrics import accuracy
from .evaluation.problems import problem_splits
from .evaluation.report import (
    alignment_table,
    condition_table,
    plot_accuracy_vs_alpha,
    plot_key_cosine,
    plot_r2_vs_rank,
    write_json,
)
from .evaluation.runner import evaluate_conditions, random_key_like
from .loading import load_model

__all__ = ["DEFAULTS", "QUICK", "DemoConfig", "DemoResult", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (see the README for why these defaults)."""

    source: str = "smollm2-135m-instruct"
    target: str = "gemma-3-270m"
    source_chat: bool = False
    target_chat: bool = False
    n_train: int = 64
    n_heldout: int = 32
    n_test: int = 48
    rank: int = 32
    alpha: float = 0.1
    alphas: tuple[float, ...] = ()
    sweep_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    max_new_tokens: int = 48
    batch_size: int = 16
    num_random: int = 200
    seed: int = 0


DEFAULTS = DemoConfig()
# Reduced size for CI (2 cores): same pipeline, fewer items and tokens.
QUICK = replace(
    DEFAULTS, n_train=16, n_heldout=8, n_test=8, max_new_tokens=16, rank=8, sweep_ranks=(1, 2, 4, 8)
)


@dataclass
class DemoResult:
    """What the demo measured; ``files`` maps names to the paths written."""

    config: DemoConfig
    diagnostics: Any
    cosines: Any
    rank_sweep: dict[int, Any]
    evaluation: Any
    alpha_curves: dict[str, dict[str, list[tuple[float, float, float, float]]]]
    timings: dict[str, float]
    files: dict[str, Path]


class _Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now
        return self.laps[name]

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def run_demo(
    config: DemoConfig = DEFAULTS,
    *,
    out: str | os.PathLike[str] = "unlock-fast-report",
    device: str | None = None,
    dtype: str | None = "auto",
    device_map: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    echo: bool = True,
) -> DemoResult:
    """Run the demo and write its report into ``out``; prints the tables when ``echo``."""
    cfg = config
    if cfg.n_train < 2 or cfg.n_heldout < 2 or cfg.n_test < 1:
        raise ValueError(
            f"the demo needs n_train >= 2, n_heldout >= 2 and n_test >= 1, got "
            f"{cfg.n_train}, {cfg.n_heldout}, {cfg.n_test}"
        )
    out_dir = Path(out)
    clock = _Clock()
    _say(progress, f"[demo] loading Source {cfg.source} and Target {cfg.target}")
    load = dict(
        dtype=dtype, device=device, device_map=device_map, cache_dir=cache_dir, progress=progress
    )
    smodel, stok = load_model(cfg.source, **load)
    clock.lap("load source")
    tmodel, ttok = load_model(cfg.target, **load)
    clock.lap("load target")

    splits = problem_splits(
        {"train": cfg.n_train, "heldout": cfg.n_heldout, "test": cfg.n_test}, seed=cfg.seed
    )
    _say(progress, "[demo] Source CoT direction and Source->Target alignment")
    run = run_transfer(
        smodel,
        stok,
        tmodel,
        ttok,
        splits["train"],
        splits["heldout"],
        rank=cfg.rank,
        source_chat=cfg.source_chat,
        target_chat=cfg.target_chat,
        batch_size=cfg.batch_size,
        progress=progress,
    )
    clock.lap("direction + alignment")
    if run.key is None or run.direction is None or run.heldout_stats is None:
        raise RuntimeError("run_transfer returned no key, direction or held-out statistics")
    sweep = rank_sweep(run.stats, run.heldout_stats, cfg.sweep_ranks)
    _say(progress, "[demo] the Target's own CoT direction on held-out problems")
    own = target_direction(
        tmodel,
        ttok,
        splits["heldout"],
        chat=cfg.target_chat,
        batch_size=cfg.batch_size,
        progress=progress,
    )
    cosines = key_cosines(
        run.key, own, alignment=run.alignment, num_random=cfg.num_random, seed=cfg.seed
    )
    clock.lap("representational evidence")

    _say(progress, f"[demo] evaluating 4 conditions on {cfg.n_test} test problems")
    evaluation = evaluate_conditions(
        tmodel,
        ttok,
        splits["test"],
        key=run.key,
        alpha=cfg.alpha,
        chat=cfg.target_chat,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        progress=progress,
    )
    evaluation.settings.update(rank=cfg.rank, n_train=cfg.n_train, split="test")
    clock.lap("evaluation")

    curves = _alpha_curves(evaluation, cfg.alpha)
    if cfg.alphas:
        _say(progress, f"[demo] alpha sweep {list(cfg.alphas)} on the held-out split")
        sweep_curves = _alpha_sweep(tmodel, ttok, splits["heldout"], run.key, cfg, progress)
        curves = sweep_curves
        clock.lap("alpha sweep")

    result = DemoResult(
        config=cfg,
        diagnostics=run.diagnostics,
        cosines=cosines,
        rank_sweep=sweep,
        evaluation=evaluation,
        alpha_curves=curves,
        timings={},
        files={},
    )
    result.files = _write(result, run, out_dir)
    clock.lap("report")
    result.timings = {**clock.laps, "total": clock.total}
    _write_markdown(result, out_dir)  # again, now with the total time
    if echo:
        print((out_dir / "report.md").read_text())
    return result


Point = tuple[float, float, float, float]  # (alpha, rate, ci_low, ci_high)
Curves = dict[str, dict[str, list[Point]]]  # "accuracy" / "steps" -> condition -> points


def _points(cond: Any, alpha: float) -> tuple[Point, Point]:
    acc = cond.accuracy
    steps = accuracy([it.shows_steps for it in cond.items])
    return (alpha, acc.value, acc.low, acc.high), (alpha, steps.value, steps.low, steps.high)


def _alpha_curves(evaluation: Any, alpha: float) -> Curves:
    curves: Curves = {"accuracy": {}, "steps": {}}
    for name, cond in evaluation.conditions.items():
        acc, steps = _points(cond, alpha if name in ("unlock", "random") else 0.0)
        curves["accuracy"][name] = [acc]
        curves["steps"][name] = [steps]
    return curves


def _alpha_sweep(
    model: Any, tok: Any, items: Any, key: Any, cfg: DemoConfig, progress: bool
) -> Curves:
    """Baseline and CoT once, UNLOCK and the random control at every alpha."""
    common: dict[str, Any] = {
        "chat": cfg.target_chat,
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size,
        "progress": progress,
    }
    rkey = random_key_like(key, seed=cfg.seed)
    runs = [(0.0, evaluate_conditions(model, tok, items, conditions=("baseline", "cot"), **common))]
    for alpha in cfg.alphas:
        res = evaluate_conditions(
            model,
            tok,
            items,
            key=key,
            random_key=rkey,
            alpha=alpha,
            conditions=("unlock", "random"),
            **common,
        )
        runs.append((float(alpha), res))
    curves: Curves = {"accuracy": {}, "steps": {}}
    for alpha, res in runs:
        for name, cond in res.conditions.items():
            acc, steps = _points(cond, alpha)
            curves["accuracy"].setdefault(name, []).append(acc)
            curves["steps"].setdefault(name, []).append(steps)
    return curves


def _write(result: DemoResult, run: Any, out: Path) -> dict[str, Path]:
    """Tables, per-item outputs and artifacts first, plots last."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "items": result.evaluation.write_items(out / "items.jsonl"),
        "json": write_json(_payload(result), out / "report.json"),
        "markdown": _write_markdown(result, out),
    }
    art = out / "artifacts"
    run.direction.save_pretrained(art / "direction")
    run.alignment.save_pretrained(art / "alignment")
    run.key.save_pretrained(art / "key")
    files["artifacts"] = art
    title = "Accuracy vs alpha" + (" (held-out)" if result.config.alphas else " (test)")
    files["plot_alpha"] = plot_accuracy_vs_alpha(
        result.alpha_curves["accuracy"],
        out / "accuracy_vs_alpha.png",
        step_curves=result.alpha_curves["steps"],
        title=title,
    )
    files["plot_rank"] = plot_r2_vs_rank(result.rank_sweep, out / "alignment_r2_vs_rank.png")
    files["plot_cosine"] = plot_key_cosine(result.cosines, out / "key_cosine.png")
    return files


def _payload(result: DemoResult) -> dict[str, Any]:
    return {
        "config": asdict(result.config),
        "alignment_diagnostics": result.diagnostics.to_dict(),
        "key_cosines": result.cosines.to_dict(),
        "rank_sweep": {str(r): rep.to_dict() for r, rep in result.rank_sweep.items()},
        "evaluation": result.evaluation.to_dict(),
        "alpha_curves": result.alpha_curves,
        "timings_s": result.timings,
    }


def _write_markdown(result: DemoResult, out: Path) -> Path:
    cfg = result.config
    cos = result.cosines
    above = cos.layers_above_band
    r2 = result.diagnostics.r2
    lines = [
        "# unlock-fast demo report",
        "",
        f"Source **{cfg.source}** (CoT direction: direct vs CoT prompt, N={cfg.n_train}) → "
        f"Target **{cfg.target}**; alignment rank {cfg.rank}, layers paired by proportional "
        f"depth; steering: rotate, alpha={cfg.alpha}, last prompt token, every Target layer.",
        "",
        "## Alignment and the transferred key, per Target layer",
        "",
        f"Held-out: {cfg.n_heldout} problems. Relative error ‖H_t − H_s T‖/‖H_t‖ and centred "
        "R² of the map; cosine between the transferred key and the Target's own CoT direction "
        f"(extracted on the held-out problems) against {cos.num_random} random Source "
        "directions sent through the same map (↑: above their 97.5% quantile).",
        "",
        alignment_table(result.diagnostics, cos),
        "",
        f"Mean centred R² {sum(r2) / len(r2):.3f}; the key beats the random band at "
        f"{len(above)}/{len(cos.layers)} layers"
        + (f" ({', '.join(map(str, above))})." if above else "."),
        "",
        f"## Evaluation on {cfg.n_test} test problems (greedy, {cfg.max_new_tokens} new tokens)",
        "",
        condition_table(result.evaluation),
        "",
        "Plots: accuracy_vs_alpha.png, alignment_r2_vs_rank.png, key_cosine.png. Per-item "
        "outputs: items.jsonl. Artifacts: artifacts/{direction,alignment,key}.",
    ]
    if result.timings:
        t = result.timings
        threads = torch.get_num_threads()
        lines += [
            "",
            "## Time",
            "",
            ", ".join(f"{k} {v:.0f} s" for k, v in t.items())
            + f" ({threads} CPU thread{'s' if threads > 1 else ''})",
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if result.timings and (out / "report.json").exists():
        write_json(_payload(result), out / "report.json")
    return path
