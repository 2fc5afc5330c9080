"""The demo's plots: rates against alpha, held-out R² against rank, the key's cosine with the
Target's own direction within the null bands, and the layer-pair scores."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._optional import require
from ..artifacts import AlignmentReport
from ..evaluation.correspondence import LayerCorrespondence
from ..evaluation.null_keys import RepresentationalNull
from ..evaluation.report import COLORS, figure, finish_axes, save_figure

__all__ = [
    "key_cosines", "plot_accuracy_vs_alpha", "plot_key_cosine", "plot_layer_correspondence",
    "plot_r2_vs_rank"
]  # fmt: skip


def key_cosines(rep: RepresentationalNull) -> dict[str, Any]:
    """The key's cosine per layer with the band of random directions via the alignment."""
    t = rep.tests["random"]
    names = ("layers", "cosine", "random_mean", "random_low", "random_high", "exceed")
    values = (t.layers, t.observed, t.null_mean, t.null_low, t.null_high, t.exceed)
    return {**dict(zip(names, values, strict=True)), "chance": rep.chance, "num_random": t.num_null}


Curve = Sequence[tuple[float, float, float, float]]  # (alpha, rate, ci_low, ci_high)


def _draw_rates(ax: Any, curves: Mapping[str, Curve], ylabel: str, title: str) -> None:
    alphas = sorted({a for pts in curves.values() for a, *_ in pts if a > 0})
    for name, pts in curves.items():
        pts, color = sorted(pts), COLORS.get(name)
        if len(pts) == 1 and pts[0][0] == 0 and alphas:  # unsteered: a line with its band
            _, val, lo, hi = pts[0]
            line = ax.axhline(100 * val, linestyle="--", linewidth=1.2, label=name, color=color)
            ax.axhspan(100 * lo, 100 * hi, alpha=0.08, color=line.get_color())
            continue
        dodge = {"unlock": 0.97, "random": 1.03}.get(name, 1.0)  # keep error bars apart
        err = [[max(0.0, 100 * (v - lo)) for _, v, lo, _ in pts],
               [max(0.0, 100 * (hi - v)) for _, v, _, hi in pts]]  # fmt: skip
        xs, ys = [a * dodge for a, *_ in pts], [100 * v for _, v, _, _ in pts]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name, color=color)
    if alphas:
        ax.set_xscale("log")
        ax.set(xlim=(min(alphas) / 1.6, max(alphas) * 1.6), xticks=alphas)
        ax.set_xticklabels([f"{a:g}" for a in alphas])
        ax.minorticks_off()
    finish_axes(ax, xlabel="alpha (steering strength)", ylabel=ylabel, title=title)


def plot_accuracy_vs_alpha(
    curves: Mapping[str, Curve],
    path: str | os.PathLike[str],
    *,
    step_curves: Mapping[str, Curve] | None = None,
    title: str = "Accuracy vs steering strength",
) -> Path:
    """``curves``: condition -> [(alpha, accuracy, ci_low, ci_high), ...]; a condition with one
    point at alpha 0 (unsteered) is a horizontal line with its band. ``step_curves`` (share
    of outputs showing steps, same form) adds a second panel."""
    fig, axes = figure(6.0 * (2 if step_curves else 1), 4.2, 2 if step_curves else 1)
    _draw_rates(axes[0], curves, "accuracy (%) with 95% CI", title)
    if step_curves:
        steps = "outputs showing steps (%) with 95% CI"
        _draw_rates(axes[1], step_curves, steps, "Intermediate steps vs alpha")
    return save_figure(fig, path)


def plot_r2_vs_rank(
    sweep: Mapping[int, AlignmentReport], path: str | os.PathLike[str], *, max_lines: int = 8
) -> Path:
    """Held-out R² against the rank, one line per Target layer (at most ``max_lines``,
    evenly spaced through the depth)."""
    fig, (ax,) = figure()
    ranks = sorted(sweep)
    pairs = list(sweep[ranks[0]].layer_map)
    chosen = list(range(0, len(pairs), max(1, math.ceil(len(pairs) / max_lines))))
    chosen += [len(pairs) - 1] if chosen[-1] != len(pairs) - 1 else []
    cmap = require("matplotlib", "plots", "Drawing plots").colormaps["viridis"]
    for j, i in enumerate(chosen):
        color = cmap(j / max(1, len(chosen) - 1) * 0.9)
        label = f"target {pairs[i][1]} ← source {pairs[i][0]}"
        ax.plot(
            ranks,
            [sweep[r].r2[i] for r in ranks],
            marker="o",
            markersize=3,
            color=color,
            label=label,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.axhline(0, color="black", linewidth=0.8)
    title = "Alignment quality vs rank, per layer (held-out)"
    finish_axes(
        ax,
        {"fontsize": 7, "ncol": 2},
        xlabel="alignment rank k",
        ylabel="held-out centred R²",
        title=title,
    )
    return save_figure(fig, path)


def plot_key_cosine(rep: RepresentationalNull, path: str | os.PathLike[str]) -> Path:
    """The key's cosine with the Target's own direction per layer, with the bands of random
    directions via the alignment, of null-contrast keys, and of a random Target direction."""
    fig, (ax,) = figure()
    rnd, contrast = rep.tests["random"], rep.tests.get("null_contrast")
    bands = [(contrast, "tab:purple", 0.2, "null-contrast keys")] if contrast else []
    for t, color, alpha, label in [*bands, (rnd, "gray", 0.25, "random directions via T")]:
        label += f" ({100 * (2 * t.level - 1):g}% of {t.num_null})"
        ax.fill_between(t.layers, t.null_low, t.null_high, alpha=alpha, color=color, label=label)
    ax.plot(rnd.layers, rnd.null_mean, color="gray", linewidth=1)
    band = dict(alpha=0.12, color="tab:orange", label="random in Target space (95%)")
    ax.axhspan(-rep.chance, rep.chance, **band)
    ax.plot(rnd.layers, rnd.observed, marker="o", color="tab:blue", label="transferred key")
    xs = rnd.layers
    ax.set_xticks(xs if len(xs) <= 24 else xs[:: max(1, len(xs) // 12)])
    ax.axhline(0, color="black", linewidth=0.8)
    title = "Transferred key vs the Target's own CoT direction (held-out)"
    finish_axes(
        ax, xlabel="Target layer", ylabel="cosine with Target's own CoT direction", title=title
    )
    return save_figure(fig, path)


def plot_layer_correspondence(corr: LayerCorrespondence, path: str | os.PathLike[str]) -> Path:
    """Heat map of the held-out score per (Source, Target) pair; x marks the chosen Source
    layer of each Target layer, o the proportional one."""
    pairs = [tuple(int(x) for x in k.split(",")) for k in corr.scores]
    ss, ts = sorted({s for s, _ in pairs}), sorted({t for _, t in pairs})
    grid = [[math.nan] * len(ss) for _ in ts]
    for (s, t), v in zip(pairs, corr.scores.values(), strict=True):
        grid[ts.index(t)][ss.index(s)] = v
    fig, (ax,) = figure(7.0, 4.6)
    finite = [v for row in grid for v in row if math.isfinite(v)]
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                   vmin=max(min(finite), -1.0) if finite else 0.0)  # fmt: skip
    fig.colorbar(im, ax=ax, label=f"held-out {'centred R²' if corr.criterion == 'r2' else 'CKA'}")
    ring = dict(marker="o", facecolors="none", edgecolors="white")
    marks = {
        "proportional": (corr.proportional, ring),
        "chosen": (corr.layer_map, dict(marker="x", color="red")),
    }
    for label, (chosen, style) in marks.items():
        ax.scatter(
            [ss.index(s) for s, _ in chosen], [ts.index(t) for _, t in chosen], label=label, **style
        )
    ax.set_xticks(range(len(ss)))
    ax.set_xticklabels([str(s) for s in ss], fontsize=6)
    ax.set_yticks(range(len(ts)))
    ax.set_yticklabels([str(t) for t in ts], fontsize=6)
    ax.set(xlabel="Source layer", ylabel="Target layer")
    ax.set_title(f"Layer correspondence (rank {corr.rank}, held-out)")
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)
