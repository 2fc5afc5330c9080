"""Run the demo: load the pair, transfer, measure against chance, evaluate, report."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from ..evaluation.conditions import Runner
from ..evaluation.evidence import (
    Evidence,
    behavioural_evidence,
    correspondence_evidence,
    null_contrast_keys_for,
    run_transfer,
    subset_evidence,
    target_direction,
)
from ..evaluation.null_keys import representational_null
from ..evaluation.problems import problem_splits
from ..evaluation.selection import (
    ALPHA_RULE,
    Curves,
    alpha_curves,
    alpha_sweep,
    choose_alpha,
    choose_rank,
    rank_sweep,
)
from ..loading import load_model
from .config import DEFAULTS, DemoConfig, DemoResult
from .report import write_markdown, write_report
from .topic import run_topic

__all__ = ["run_demo"]


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
    source = Runner(smodel, stok, cfg.source_chat, batch_size=cfg.batch_size, progress=progress)
    target = Runner(
        tmodel, ttok, cfg.target_chat, max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size, progress=progress,
    )  # fmt: skip
    data = dict(alignment_data=cfg.alignment_data, corpus=cfg.corpus, corpus_limit=cfg.corpus_limit)
    run = run_transfer(source, target, splits["train"], splits["heldout"], rank=cfg.rank, data=data)
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
    own = target_direction(target, splits["heldout"])
    contrast = null_contrast_keys_for(
        source, splits["train"], run.alignment, run.key,
        num=max(cfg.null_contrasts, cfg.null_directions), seed=cfg.seed,
    )  # fmt: skip
    representation = representational_null(
        run.key, own, alignment=run.alignment, num_random=cfg.num_random,
        contrast_keys=contrast, seed=cfg.seed,
    )  # fmt: skip
    evidence = Evidence(representation, selection=selection)
    clock.lap("representational evidence")
    if cfg.correspondence:
        _say(progress, f"[demo] layer correspondence by held-out {cfg.correspondence}")
        evidence.correspondence = correspondence_evidence(
            source, target, splits, run.direction, own, criterion=cfg.correspondence,
            rank=selection["rank"], num_random=cfg.num_random, seed=cfg.seed,
        )  # fmt: skip
        clock.lap("layer correspondence")
    curves: Curves | None = None
    if cfg.alphas:
        _say(progress, f"[demo] alpha sweep {list(cfg.alphas)} on the held-out split")
        curves = alpha_sweep(target, splits["heldout"], run.key, cfg.alphas, seed=cfg.seed)
        if cfg.select_alpha:
            selection.update(alpha=choose_alpha(curves["steps"]), alpha_rule=ALPHA_RULE)
        clock.lap("alpha sweep")
    alpha = selection["alpha"]
    target = target.with_alpha(alpha)

    _say(progress, f"[demo] evaluating 4 conditions on {cfg.n_test} test problems")
    evaluation = target.evaluate(splits["test"], run.key, seed=cfg.seed)
    evaluation.settings.update(rank=selection["rank"], n_train=cfg.n_train, split="test")
    clock.lap("evaluation")
    evidence.behaviour, evidence.null_conditions = behavioural_evidence(
        target, splits["test"], evaluation, run.key, num_random=cfg.random_keys,
        contrast_keys=contrast[: cfg.null_contrasts], seed=cfg.seed,
    )  # fmt: skip
    clock.lap("behavioural null")
    if cfg.layer_subset and run.diagnostics is not None:
        evidence.subset = subset_evidence(
            target, splits["test"], evaluation, run.key, run.diagnostics
        )
        clock.lap("layer subset")
    if curves is None:
        curves = alpha_curves([(alpha, evaluation)])
    topic = None
    if cfg.topic:
        _say(progress, "[demo] topic transfer (demo/topic.py)")
        topic = run_topic(
            source, target, cfg.topic_config, source_name=cfg.source, target_name=cfg.target
        )
        clock.lap("topic")

    result = DemoResult(
        config=cfg,
        diagnostics=run.diagnostics,
        rank_sweep=sweep,
        evaluation=evaluation,
        alpha_curves=curves,
        timings={},
        files={},
        evidence=evidence,
        topic=topic,
    )
    result.files = write_report(result, run, out_dir)
    clock.lap("report")
    result.timings = {**clock.laps, "total": clock.total}
    write_markdown(result, out_dir)  # again, now with the total time
    if echo:
        print((out_dir / "report.md").read_text())
    return result
