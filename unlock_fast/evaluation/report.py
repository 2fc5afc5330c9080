"""Reports: JSON, Markdown tables and PNG plots (matplotlib's Agg canvas, no display).

Plots:
- ``accuracy_vs_alpha.png``: accuracy per condition against the steering strength alpha;
- ``alignment_r2_vs_rank.png``: held-out centred R² per Target layer against the rank;
- ``key_cosine.png``: cosine of the transferred key with the Target's own CoT direction
  per layer, with the band of random controls (and of null-contrast keys).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._optional import require
from .null import LayerTest
from .runner import EvaluationResult

__all__ = [
    "alignment_table",
    "condition_table",
    "new_figure",
    "plot_accuracy_vs_alpha",
    "plot_key_cosine",
    "plot_r2_vs_rank",
    "save_figure",
    "write_json",
]


def _fmt_pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def condition_table(result: EvaluationResult) -> str:
    """Markdown table of the conditions, then one line per paired comparison."""
    lines = [
        "| condition | accuracy [95% CI] | n | mean tokens | shows steps | answered |",
        "|---|---|---|---|---|---|",
    ]
    for c in result.conditions.values():
        acc = c.accuracy
        lines.append(
            f"| {c.description} | {100 * acc.value:.1f}% [{100 * acc.low:.1f}, "
            f"{100 * acc.high:.1f}] | {acc.n} | {c.mean_tokens:.1f} | {_fmt_pct(c.step_rate)} "
            f"| {_fmt_pct(c.answered_rate)} |"
        )
    lines += ["", "Accuracy, paired on the same items:", ""]
    lines += [f"- {comp.verdict}" for comp in result.comparisons()]
    lines += ["", "Outputs that show intermediate steps, paired on the same items:", ""]
    lines += [f"- {comp.verdict}" for comp in result.comparisons("shows_steps")]
    return "\n".join(lines)


def alignment_table(
    diagnostics: Any, cosines: Any = None, *, contrast: LayerTest | None = None
) -> str:
    """Markdown table per Target layer: held-out relative error, centred R², and (when
    given) the cosine of the key with the Target's own direction against the random band
    (and against the band of null-contrast keys, ``contrast``)."""
    head = "| target layer | source layer | rel. error | centred R² |"
    rule = "|---|---|---|---|"
    if cosines is not None:
        head += " cos(key, own CoT) | random 95% band | p (random ≥ key) |"
        rule += "---|---|---|"
    nulls = {}
    if contrast is not None:
        head += " null-contrast 95% band | p (null contrast ≥ key) |"
        rule += "---|---|"
        nulls = dict(
            zip(
                contrast.layers,
                zip(contrast.null_low, contrast.null_high, contrast.p_values, strict=True),
                strict=True,
            )
        )
    lines = [head, rule]
    cos_at = {}
    if cosines is not None:
        cos_at = {
            layer: (c, lo, hi, ex)
            for layer, c, lo, hi, ex in zip(
                cosines.layers,
                cosines.cosine,
                cosines.random_low,
                cosines.random_high,
                cosines.exceed,
                strict=True,
            )
        }
    for (s, t), err, r2 in zip(
        diagnostics.layer_map, diagnostics.rel_error, diagnostics.r2, strict=True
    ):
        row = f"| {t} | {s} | {err:.3f} | {r2:.3f} |"
        if cosines is not None:
            if t in cos_at:
                c, lo, hi, ex = cos_at[t]
                mark = " ↑" if c > hi else ""
                p = f"{ex:.3f}" if ex > 0 else f"< {1 / cosines.num_random:.3f}"
                row += f" {c:+.3f}{mark} | [{lo:+.3f}, {hi:+.3f}] | {p} |"
            else:
                row += " – | – | – |"
        if contrast is not None:
            lo, hi, pv = nulls.get(t, (math.nan, math.nan, math.nan))
            row += f" [{lo:+.3f}, {hi:+.3f}] | {pv:.3f} |"
        lines.append(row)
    return "\n".join(lines)


def write_json(data: Any, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return p


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas (no display needed)."""
    require("matplotlib", "plots", "Drawing plots")
    agg = require("matplotlib.backends.backend_agg", "plots", "Drawing plots")
    figure = require("matplotlib.figure", "plots", "Drawing plots")
    fig = figure.Figure(figsize=(width, height), dpi=110)
    agg.FigureCanvasAgg(fig)
    return fig


def _figure(width: float = 7.0, height: float = 4.2) -> tuple[Any, Any]:
    fig = new_figure(width, height)
    return fig, fig.add_subplot(1, 1, 1)


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Lay out ``fig`` and write it to ``path`` (folders made as needed)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(str(p))
    return p


_COLORS = {"baseline": "tab:gray", "cot": "tab:green", "unlock": "tab:blue", "random": "tab:orange"}

Curve = Sequence[tuple[float, float, float, float]]  # (alpha, rate, ci_low, ci_high)


def _draw_rates(ax: Any, curves: Mapping[str, Curve], ylabel: str) -> None:
    alphas = sorted({a for pts in curves.values() for a, *_ in pts if a > 0})
    for name, pts in curves.items():
        pts = sorted(pts)
        color = _COLORS.get(name)
        if len(pts) == 1 and pts[0][0] == 0 and alphas:  # unsteered: a line with its band
            _, val, lo, hi = pts[0]
            line = ax.axhline(100 * val, linestyle="--", linewidth=1.2, label=name, color=color)
            ax.axhspan(100 * lo, 100 * hi, alpha=0.08, color=line.get_color())
            continue
        dodge = {"unlock": 0.97, "random": 1.03}.get(name, 1.0)  # keep error bars apart
        xs = [a * dodge for a, *_ in pts]
        ys = [100 * v for _, v, _, _ in pts]
        err = [
            [max(0.0, 100 * (v - lo)) for _, v, lo, _ in pts],
            [max(0.0, 100 * (hi - v)) for _, v, _, hi in pts],
        ]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name, color=color)
    if alphas:
        ax.set_xscale("log")
        ax.set_xlim(min(alphas) / 1.6, max(alphas) * 1.6)
        ax.set_xticks(alphas)
        ax.set_xticklabels([f"{a:g}" for a in alphas])
        ax.minorticks_off()
    ax.set_xlabel("alpha (steering strength)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_accuracy_vs_alpha(
    curves: Mapping[str, Curve],
    path: str | os.PathLike[str],
    *,
    step_curves: Mapping[str, Curve] | None = None,
    title: str = "Accuracy vs steering strength",
) -> Path:
    """``curves``: condition -> [(alpha, accuracy, ci_low, ci_high), ...]. A condition with one
    point at alpha 0 (unsteered) is drawn as a horizontal line with its band. With
    ``step_curves`` (same form, share of outputs showing steps) a second panel is added."""
    panels = 2 if step_curves else 1
    fig = new_figure(6.0 * panels, 4.2)
    ax = fig.add_subplot(1, panels, 1)
    _draw_rates(ax, curves, "accuracy (%) with 95% CI")
    ax.set_title(title)
    ax.legend(fontsize=8)
    if step_curves:
        ax2 = fig.add_subplot(1, panels, 2)
        _draw_rates(ax2, step_curves, "outputs showing steps (%) with 95% CI")
        ax2.set_title("Intermediate steps vs alpha")
    return save_figure(fig, path)


def plot_r2_vs_rank(
    sweep: Mapping[int, Any], path: str | os.PathLike[str], *, max_lines: int = 8
) -> Path:
    """``sweep``: rank -> AlignmentReport. One line per Target layer (at most ``max_lines``,
    evenly spaced through the depth)."""
    fig, ax = _figure()
    ranks = sorted(sweep)
    first = sweep[ranks[0]]
    pairs = list(first.layer_map)
    step = max(1, math.ceil(len(pairs) / max_lines))
    chosen = list(range(0, len(pairs), step))
    if chosen[-1] != len(pairs) - 1:
        chosen.append(len(pairs) - 1)
    cmap = _colormap(len(chosen))
    for j, i in enumerate(chosen):
        s, t = pairs[i]
        ys = [sweep[r].r2[i] for r in ranks]
        ax.plot(
            ranks, ys, marker="o", markersize=3, color=cmap[j], label=f"target {t} ← source {s}"
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("alignment rank k")
    ax.set_ylabel("held-out centred R²")
    ax.set_title("Alignment quality vs rank, per layer (held-out)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_key_cosine(
    cosines: Any, path: str | os.PathLike[str], *, contrast: LayerTest | None = None
) -> Path:
    """Cosine of the transferred key with the Target's own CoT direction, per layer, with
    the 95% band of random directions sent through the same alignment (and, with
    ``contrast``, the band of the null-contrast keys)."""
    fig, ax = _figure()
    xs = cosines.layers
    if contrast is not None:
        ax.fill_between(
            contrast.layers,
            contrast.null_low,
            contrast.null_high,
            alpha=0.2,
            color="tab:purple",
            label=f"null-contrast keys ({100 * (2 * contrast.level - 1):g}% of "
            f"{contrast.num_null})",
        )
    ax.fill_between(
        xs,
        cosines.random_low,
        cosines.random_high,
        alpha=0.25,
        color="gray",
        label=f"random directions via T (95% of {cosines.num_random})",
    )
    ax.plot(xs, cosines.random_mean, color="gray", linewidth=1)
    ax.axhspan(
        -cosines.chance,
        cosines.chance,
        alpha=0.12,
        color="tab:orange",
        label="random in Target space (95%)",
    )
    ax.plot(xs, cosines.cosine, marker="o", color="tab:blue", label="transferred key")
    ax.set_xticks(xs if len(xs) <= 24 else xs[:: max(1, len(xs) // 12)])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("Target layer")
    ax.set_ylabel("cosine with Target's own CoT direction")
    ax.set_title("Transferred key vs the Target's own CoT direction (held-out)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _colormap(n: int) -> list[Any]:
    cmap = require("matplotlib", "plots", "Drawing plots").colormaps["viridis"]
    return [cmap(i / max(1, n - 1) * 0.9) for i in range(n)]
