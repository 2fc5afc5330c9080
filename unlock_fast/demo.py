"""``unlock-fast demo``: chain-of-thought transfer between two small shipped models, offline.

Source: SmolLM2-135M-Instruct (30 layers, d=576). Target: Gemma-3-270M base (18 layers,
d=640). Different families, tokenizers, depths and widths. Steps:

1. load both models (GGUF, converted once and cached);
2. draw disjoint train / held-out / test splits of built-in arithmetic word problems;
3. Source CoT direction (direct vs CoT prompt) and Source->Target alignment on train;
4. held-out alignment diagnostics, and the Target's own CoT direction on held-out items,
   compared per layer with the transferred key against random directions sent through the
   same alignment;
5. null tests: the key's cosine against random and null-contrast bands (every run), and
   its test-split measures against many random and null-contrast keys (``random_keys``,
   ``null_contrasts``); optional layer correspondence and layer subset;
6. optional alpha sweep on the held-out split (``select_alpha`` takes the best alpha from
   it, ``select_rank`` the rank with the best held-out R²), then the four conditions on
   the test split;
7. report.md / report.json / items.jsonl / plots / artifacts in the report folder.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .evaluation.alphas import ALPHA_RULE, Curves, alpha_curves, alpha_sweep, choose_alpha
from .evaluation.evidence import (
    Evidence,
    behavioural_evidence,
    choose_rank,
    correspondence_evidence,
    null_contrast_keys_for,
    subset_evidence,
)
from .evaluation.experiment import key_cosines, rank_sweep, run_transfer, target_direction
from .evaluation.null_keys import representational_null
from .evaluation.null_report import evidence_markdown, plot_layer_correspondence, plot_null_spread
from .evaluation.problems import problem_splits
from .evaluation.report import (
    alignment_table,
    condition_table,
    plot_accuracy_vs_alpha,
    plot_key_cosine,
    plot_r2_vs_rank,
    write_json,
)
from .evaluation.runner import evaluate_conditions
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
    random_keys: int = 1  # behavioural null: random keys (the random condition is the first)
    null_contrasts: int = 0  # behavioural null: null-contrast keys
    null_directions: int = 200  # representational null: null-contrast directions
    correspondence: str | None = None  # "r2" or "cka": choose Source layers on held-out
    layer_subset: bool = False  # also steer only the layers with good held-out R²
    select_rank: bool = False  # rank with the best mean held-out R² of sweep_ranks
    select_alpha: bool = False  # alpha of alphas with the best held-out unlock - random steps


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
    evidence: Any = None


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
    if cfg.select_alpha and not cfg.alphas:
        raise ValueError("select_alpha needs alphas to choose from")
    if cfg.correspondence not in (None, "r2", "cka"):
        raise ValueError(f"correspondence must be None, 'r2' or 'cka', got {cfg.correspondence!r}")
    if min(cfg.random_keys, cfg.null_contrasts, cfg.null_directions) < 0:
        raise ValueError("random_keys, null_contrasts and null_directions must be >= 0")
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
    selection: dict[str, Any] = {"rank": cfg.rank, "alpha": cfg.alpha}
    if cfg.select_rank:
        selection.update(rank=choose_rank(sweep), rank_rule="best mean held-out R²")
        run.alignment = run.stats.fit(rank=selection["rank"])
        run.key = run.alignment.transfer(run.direction)
        run.diagnostics = run.alignment.diagnose(run.heldout_stats)
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
    contrast = null_contrast_keys_for(
        smodel, stok, splits["train"], run.alignment, run.key,
        num=max(cfg.null_contrasts, cfg.null_directions), seed=cfg.seed,
        chat=cfg.source_chat, batch_size=cfg.batch_size, progress=progress,
    )  # fmt: skip
    evidence = Evidence(
        representational_null(
            run.key,
            own,
            alignment=run.alignment,
            num_random=cfg.num_random,
            contrast_keys=contrast,
            seed=cfg.seed,
        ),  # fmt: skip
        selection=selection,
    )
    clock.lap("representational evidence")
    if cfg.correspondence:
        _say(progress, f"[demo] layer correspondence by held-out {cfg.correspondence}")
        evidence.correspondence = correspondence_evidence(
            (smodel, stok), (tmodel, ttok), splits, run.direction, own,
            criterion=cfg.correspondence, rank=selection["rank"],
            chats=(cfg.source_chat, cfg.target_chat), num_random=cfg.num_random,
            seed=cfg.seed, batch_size=cfg.batch_size, progress=progress,
        )  # fmt: skip
        clock.lap("layer correspondence")
    curves: Curves | None = None
    if cfg.alphas:
        _say(progress, f"[demo] alpha sweep {list(cfg.alphas)} on the held-out split")
        curves = alpha_sweep(
            tmodel, ttok, splits["heldout"], run.key, cfg.alphas, seed=cfg.seed,
            chat=cfg.target_chat, max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size, progress=progress,
        )  # fmt: skip
        if cfg.select_alpha:
            selection.update(alpha=choose_alpha(curves["steps"]), alpha_rule=ALPHA_RULE)
        clock.lap("alpha sweep")
    alpha = selection["alpha"]

    _say(progress, f"[demo] evaluating 4 conditions on {cfg.n_test} test problems")
    evaluation = evaluate_conditions(
        tmodel,
        ttok,
        splits["test"],
        key=run.key,
        alpha=alpha,
        chat=cfg.target_chat,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        progress=progress,
    )
    evaluation.settings.update(rank=selection["rank"], n_train=cfg.n_train, split="test")
    clock.lap("evaluation")
    gen: dict[str, Any] = dict(
        alpha=alpha, chat=cfg.target_chat, max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size, progress=progress,
    )  # fmt: skip
    evidence.behaviour, evidence.null_conditions = behavioural_evidence(
        tmodel, ttok, splits["test"], evaluation, run.key, num_random=cfg.random_keys,
        contrast_keys=contrast[: cfg.null_contrasts], seed=cfg.seed, **gen,
    )  # fmt: skip
    clock.lap("behavioural null")
    if cfg.layer_subset and run.diagnostics is not None:
        evidence.subset = subset_evidence(
            tmodel, ttok, splits["test"], evaluation, run.key, run.diagnostics, **gen
        )
        clock.lap("layer subset")
    if curves is None:
        curves = alpha_curves(evaluation, alpha)

    result = DemoResult(
        config=cfg,
        diagnostics=run.diagnostics,
        cosines=cosines,
        rank_sweep=sweep,
        evaluation=evaluation,
        alpha_curves=curves,
        timings={},
        files={},
        evidence=evidence,
    )
    result.files = _write(result, run, out_dir)
    clock.lap("report")
    result.timings = {**clock.laps, "total": clock.total}
    _write_markdown(result, out_dir)  # again, now with the total time
    if echo:
        print((out_dir / "report.md").read_text())
    return result


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
    ev = result.evidence
    files["plot_cosine"] = plot_key_cosine(
        result.cosines,
        out / "key_cosine.png",
        contrast=ev.representation.tests.get("null_contrast"),
    )
    if ev.null_conditions:
        with (out / "null_items.jsonl").open("w", encoding="utf-8") as f:
            for conds in ev.null_conditions.values():
                for c in conds:  # the random condition itself is in items.jsonl
                    if c is not result.evaluation.conditions.get(c.name):
                        f.writelines(json.dumps(it.to_dict()) + "\n" for it in c.items)
        files["null_items"] = out / "null_items.jsonl"
    if ev.behaviour is not None:
        refs = result.evaluation.conditions
        files["plot_null"] = plot_null_spread(ev.behaviour, refs, out / "null_spread.png")
    if ev.correspondence is not None:
        files["plot_layers"] = plot_layer_correspondence(
            ev.correspondence.correspondence, out / "layer_correspondence.png"
        )
    return files


def _payload(result: DemoResult) -> dict[str, Any]:
    return {
        "config": asdict(result.config),
        "alignment_diagnostics": result.diagnostics.to_dict(),
        "key_cosines": result.cosines.to_dict(),
        "rank_sweep": {str(r): rep.to_dict() for r, rep in result.rank_sweep.items()},
        "evaluation": result.evaluation.to_dict(),
        "alpha_curves": result.alpha_curves,
        "evidence": result.evidence.to_dict(),
        "timings_s": result.timings,
    }


def _write_markdown(result: DemoResult, out: Path) -> Path:
    cfg = result.config
    sel = result.evidence.selection
    cos = result.cosines
    above = cos.layers_above_band
    r2 = result.diagnostics.r2
    lines = [
        "# unlock-fast demo report",
        "",
        f"Source **{cfg.source}** (CoT direction: direct vs CoT prompt, N={cfg.n_train}) → "
        f"Target **{cfg.target}**; alignment rank {sel['rank']}, layers paired by proportional "
        f"depth; steering: rotate, alpha={sel['alpha']}, last prompt token, every Target layer."
        + "".join(f" {k[:-5].capitalize()} chosen by {v}." for k, v in sel.items() if "_rule" in k),
        "",
        "## Alignment and the transferred key, per Target layer",
        "",
        f"Held-out: {cfg.n_heldout} problems. Relative error ‖H_t − H_s T‖/‖H_t‖ and centred "
        "R² of the map; cosine between the transferred key and the Target's own CoT direction "
        f"(extracted on the held-out problems) against {cos.num_random} random Source "
        "directions sent through the same map (↑: above their 97.5% quantile)"
        + (
            f" and against {result.evidence.representation.tests['null_contrast'].num_null} "
            "null-contrast keys (Source contrast swapped at random per item, same map)."
            if "null_contrast" in result.evidence.representation.tests
            else "."
        ),
        "",
        alignment_table(
            result.diagnostics,
            cos,
            contrast=result.evidence.representation.tests.get("null_contrast"),
        ),
        "",
        f"Mean centred R² {sum(r2) / len(r2):.3f}; the key beats the random band at "
        f"{len(above)}/{len(cos.layers)} layers"
        + (f" ({', '.join(map(str, above))})." if above else "."),
        "",
        f"## Evaluation on {cfg.n_test} test problems (greedy, {cfg.max_new_tokens} new tokens)",
        "",
        condition_table(result.evaluation),
        "",
        *evidence_markdown(result.evidence),
        "",
        "Plots: accuracy_vs_alpha.png, alignment_r2_vs_rank.png, key_cosine.png"
        + (", null_spread.png" if result.evidence.behaviour is not None else "")
        + (", layer_correspondence.png" if result.evidence.correspondence is not None else "")
        + ". Per-item outputs: items.jsonl"
        + (", null_items.jsonl" if result.evidence.null_conditions else "")
        + ". Artifacts: artifacts/{direction,alignment,key}.",
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
