"""The topic part's report: its Markdown section, JSON, per-item outputs and bar chart."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..evaluation.null import spread
from ..evaluation.report import COLORS, figure, save_figure
from .topic import TopicCondition, TopicResult

__all__ = ["plot_topic_rates", "topic_markdown", "write_topic_items"]


def _pct(c: TopicCondition | None) -> str:
    if c is None:
        return "–"
    s = c.summary()
    lo, hi = s["ci95"]
    return f"{100 * c.rate:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def _spread(conds: list[TopicCondition]) -> str:
    if not conds:
        return "–"
    s = spread([c.rate for c in conds])
    return f"{100 * s.min:.1f}% / {100 * s.median:.1f}% / {100 * s.max:.1f}% (n={s.n})"


def _table(result: TopicResult) -> list[str]:
    lines = [
        "| condition | alignment data (rows) | rank (k) | alpha | on topic [95% CI] | random keys "
        "min / median / max | p (random ≥ key) | null-contrast keys | p (null contrast ≥ key) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if result.unsteered is not None:
        lines.append(f"| unsteered | – | – | – | {_pct(result.unsteered)} | | | | |")
    if result.own is not None:
        lines.append(
            f"| Target's own direction (ceiling) | – | – | {result.own.alpha:g} | "
            f"{_pct(result.own)} | | | | |"
        )
    for data, ch in result.choices.items():
        label = "transferred key" + (" (ceiling)" if data == "locked+unlocked" else "")
        nc = ", ".join(f"{100 * c.rate:.1f}%" for c in ch.null_contrast) or "–"
        done = ch.key is not None
        lines.append(
            f"| {label} | {data} ({ch.num_rows}) | {ch.rank} ({ch.k}) | {ch.alpha:g} | "
            f"{_pct(ch.key) if done else 'not run'} | {_spread(ch.random)} | "
            f"{ch.p_random:.3g} | {nc} | {ch.p_null_contrast:.3g} |"
        )
    return lines


def _cosine_table(result: TopicResult) -> list[str]:
    done = {d: ch.cosine for d, ch in result.choices.items() if ch.cosine is not None}
    if not done:
        return []
    names = list(done)
    lines = [
        "| target layer | " + " | ".join(f"{d}: cos (random 95% band)" for d in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    layers = next(iter(done.values())).layers
    for i, layer in enumerate(layers):
        cells = []
        for d in names:
            t = done[d].tests["random"]
            c, lo, hi = t.observed[i], t.null_low[i], t.null_high[i]
            cells.append(f"{c:+.3f}{' ↑' if c > hi else ''} [{lo:+.2f}, {hi:+.2f}]")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    summary = [f"- {d}: {done[d].tests['random'].summary()}" for d in names]
    return [*lines, "", *summary]


def _selection_lines(result: TopicResult) -> list[str]:
    out = []
    if result.own_selection:
        best = max(result.own_selection, key=lambda r: (r["score"], -r["alpha"]))
        out.append(
            f"- own direction: alpha {best['alpha']:g} of "
            + ", ".join(f"{r['alpha']:g}: {100 * r['rate']:.0f}%" for r in result.own_selection)
        )
    for data, ch in result.choices.items():
        if not ch.selection:
            out.append(f"- {data}: rank {ch.rank}, alpha {ch.alpha:g} (fixed)")
            continue
        cells = ", ".join(
            f"{r['rank']}/{r['alpha']:g}: {100 * r['rate']:.0f}−{100 * _median(r['random']):.0f}"
            for r in ch.selection
        )
        out.append(f"- {data}: chose rank {ch.rank}, alpha {ch.alpha:g} (rank/alpha: key − "
                   f"median random, %: {cells})")  # fmt: skip
    return out


def _median(values: list[float]) -> float:
    return spread(values).median if values else math.nan


def topic_markdown(result: TopicResult, heading: str = "##") -> str:
    """The topic part as a Markdown section (``heading``: the level of its title)."""
    cfg = result.config
    spec = cfg.spec
    sub = heading + "#"
    holm = result.holm_h1
    lines = [
        f"{heading} Topic transfer: {spec.name}",
        "",
        f"Source **{result.source}** → Target **{result.target}**. Direction: "
        f'"Write a sentence." against "Write a sentence about {spec.phrase}." (16 instruction '
        f"frames, a neutral sentence start after each; {cfg.n_train} train items, last prompt "
        f"token). The Target continues the start under the locked instruction (greedy, at most "
        f"{cfg.max_new_tokens} new tokens, first line); a continuation is on topic when it holds "
        f"one of {len(spec.words)} words ({', '.join(spec.words[:8])}, ...; whole words, any "
        f"case). {cfg.n_test} test items; rank and alpha "
        + ("chosen on " + f"{cfg.n_heldout} held-out items." if cfg.selects else "fixed.")
        + " Random keys: Gaussian Source directions sent through the same map, with the key's "
        "per-layer norms; null-contrast keys: the Source contrast with each train item's forms "
        "swapped at random, through the same map. p = (1 + #{null ≥ key}) / (1 + n)."
        + (
            f" Corpus: {result.corpus_rows} generic sentences (hash {result.corpus_hash})"
            + (
                f" ({result.corpus_dropped} dropped for holding a topic word)."
                if result.corpus_dropped
                else "."
            )  # fmt: skip
            if result.corpus_rows
            else ""
        ),
        "",
        *_table(result),
    ]
    if holm:
        lines += ["", "Holm over the corpus-based choices: "
                  + ", ".join(f"{d} {p:.3g}" for d, p in holm.items()) + "."]  # fmt: skip
    sel = _selection_lines(result)
    if sel:
        lines += ["", f"{sub} Held-out selection", "", *sel]
    cos = _cosine_table(result)
    if cos:
        lines += ["", f"{sub} Cosine of each key with the Target's own topic direction", "",
                  f"Per Target layer; band: {cfg.num_random} random Source directions through "
                  "the same map "
                  "(↑: above its 97.5% quantile).", "", *cos]  # fmt: skip
    if result.timings:
        lines += ["", "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items())]
    return "\n".join(lines) + "\n"


def write_topic_items(result: TopicResult, path: str | os.PathLike[str]) -> Path:
    """One JSON line per item of each test condition."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for cond in result.conditions:
            for it in cond.items:
                row = {**it.to_dict(), "family": cond.family, "data": cond.data,
                       "alpha": cond.alpha}  # fmt: skip
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p


def plot_topic_rates(result: TopicResult, path: str | os.PathLike[str]) -> Path:
    """Bars: on-topic rate of unsteered, own direction and each transferred key (with 95%
    intervals); dots beside each key: its random keys (orange) and null-contrast keys (purple)."""
    fig, (ax,) = figure(max(6.0, 1.6 * (2 + len(result.choices))), 4.4)
    bars: list[tuple[str, TopicCondition | None, str]] = [
        ("unsteered", result.unsteered, COLORS["baseline"]),
        ("own direction", result.own, COLORS["cot"]),
    ]
    bars += [(f"key\n{d}", ch.key, COLORS["unlock"]) for d, ch in result.choices.items()]
    for i, (name, cond, color) in enumerate(bars):
        if cond is None:
            continue
        lo, hi = cond.summary()["ci95"]
        label = name if i < 2 else ("transferred key" if i == 2 else None)
        ax.bar(i, 100 * cond.rate, color=color, alpha=0.8, width=0.6, label=label)
        ax.errorbar(i, 100 * cond.rate, yerr=[[100 * (cond.rate - lo)], [100 * (hi - cond.rate)]],
                    color="black", capsize=3)  # fmt: skip
    for i, ch in enumerate(result.choices.values(), start=2):
        for family, conds, dx in (
            ("random", ch.random, 0.18),
            ("null_contrast", ch.null_contrast, 0.3),
        ):
            ys = [100 * c.rate for c in conds]
            xs = [i + dx + 0.06 * ((k * 0.618) % 1 - 0.5) for k in range(len(ys))]
            names = {"random": "random keys via the map", "null_contrast": "null-contrast keys"}
            ax.scatter(xs, ys, s=12, zorder=3, color=COLORS.get(family, "gray"),
                       label=names[family] if i == 2 and ys else None)  # fmt: skip
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([b[0] for b in bars], fontsize=8)
    ax.set_ylim(0, 100)
    title = f"{result.source} → {result.target}: on-topic rate ({result.config.spec.name})"
    ax.set(ylabel="continuations on topic (%), 95% CI", title=title)
    ax.title.set_fontsize(9)
    if ax.get_legend_handles_labels()[0]:  # outside the axes: it would hide dots
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)
