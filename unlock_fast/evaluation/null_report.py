"""Tables and plots of the null tests, the layer correspondence and the layer subset.

Plots (matplotlib's Agg canvas, through :mod:`.report`):

- ``null_spread.png``: per measure, the values of the null keys (dots and a box per family)
  with the transferred key's value (star) and the baseline and CoT lines;
- ``layer_correspondence.png``: the held-out score of every (Source, Target) layer pair,
  with the chosen and the proportional pairing marked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from .behaviour import METRICS, BehaviouralNull, metric_values
from .correspondence import LayerCorrespondence
from .evidence import CorrespondenceEvidence, Evidence, SubsetEvidence
from .null_keys import RepresentationalNull
from .report import new_figure, save_figure
from .runner import ConditionResult

__all__ = [
    "behavioural_null_table",
    "correspondence_table",
    "evidence_markdown",
    "plot_layer_correspondence",
    "plot_null_spread",
    "representational_null_lines",
    "subset_lines",
]

_FAMILY = {"random": "random keys", "null_contrast": "null-contrast keys"}
_PCT = {"accuracy", "step_rate", "final_rate"}


def _value(metric: str, v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return f"{100 * v:.1f}%" if metric in _PCT else f"{v:.1f}"


def behavioural_null_table(result: BehaviouralNull) -> str:
    """Markdown: per family and measure, the key, the null's spread and the p-values."""
    lines = [
        "| null family | measure | key | null min / median / max | n | p (one-sided) | Holm p "
        "| p (normal null) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family, tests in result.families.items():
        for t in tests:
            s = t.spread
            lines.append(
                f"| {_FAMILY.get(family, family)} | {METRICS[t.metric]} | "
                f"{_value(t.metric, t.key)} | {_value(t.metric, s.min)} / "
                f"{_value(t.metric, s.median)} / {_value(t.metric, s.max)} | {s.n} | "
                f"{t.p_value:.3g} | {t.holm_p:.3g} | {t.normal_p:.3g} |"
            )
    floor = ", ".join(
        f"{_FAMILY.get(f, f)} {1 / (1 + len(ts[0].null)):.3g}"
        for f, ts in result.families.items()
        if ts
    )
    lines += [
        "",
        f"p = (1 + #{{null ≥ key}}) / (1 + n) on {result.num_items} items; the smallest "
        f"possible p: {floor}. Holm adjusts over the {len(METRICS)} measures. The normal-null "
        "p treats the null keys' values as normal draws (Student-t prediction interval), so "
        "it can go below that floor; it is an approximation, the permutation p is exact.",
    ]
    return "\n".join(lines)


def representational_null_lines(result: RepresentationalNull) -> str:
    """Markdown bullets: per null family, layers above the band against chance."""
    return "\n".join(f"- {t.summary()}" for t in result.tests.values())


def correspondence_table(ev: CorrespondenceEvidence) -> str:
    """Markdown per Target layer: proportional and chosen Source layer, their test R² and
    the key's cosine with the Target's own direction through each."""
    c = ev.correspondence
    cos_p, cos_s = (
        dict(zip(ev.cosine[k].layers, ev.cosine[k].cosine, strict=True))
        for k in ("proportional", "selected")
    )
    lines = [
        "| target layer | proportional source | R² (test) | cos | chosen source | R² (test) | "
        "cos |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = zip(c.proportional, c.layer_map, ev.r2["proportional"], ev.r2["selected"], strict=True)
    for (sp, t), (ss, _), rp, rs in rows:
        lines.append(
            f"| {t} | {sp} | {rp:.3f} | {cos_p.get(t, math.nan):+.3f} | {ss} | {rs:.3f} | "
            f"{cos_s.get(t, math.nan):+.3f} |"
        )
    mp = sum(ev.r2["proportional"]) / len(ev.r2["proportional"])
    ms = sum(ev.r2["selected"]) / len(ev.r2["selected"])
    lines += [
        "",
        f"Mean test R²: proportional {mp:.3f}, chosen {ms:.3f}. Layers above the random band "
        f"(cosine): proportional {len(ev.cosine['proportional'].tests['random'].above)}, "
        f"chosen {len(ev.cosine['selected'].tests['random'].above)} of {len(c.layer_map)}.",
    ]
    return "\n".join(lines)


def subset_lines(ev: SubsetEvidence) -> str:
    """Markdown: the chosen layers and the paired comparisons."""
    s = ev.subset
    head = (
        f"Steered layers {s.layers} ({len(s.layers)}/{len(s.all_layers)}; held-out R² > "
        f"{s.threshold:.3f}, {s.rule}); accuracy {ev.condition.accuracy}, shows steps "
        f"{100 * ev.condition.step_rate:.0f}%."
    )
    rows = [f"- {label}: {c.verdict}" for label, cs in ev.comparisons.items() for c in cs]
    return "\n".join([head, "", *rows])


_COLORS = {"random": "tab:orange", "null_contrast": "tab:purple"}


def plot_null_spread(
    result: BehaviouralNull,
    references: Mapping[str, ConditionResult],
    path: str | os.PathLike[str],
) -> Path:
    """One panel per measure: each null family's values (dots over a box), the key's value
    (blue star) and the unsteered references (``baseline``, ``cot``) as dashed lines."""
    metrics = list(METRICS)
    fig = new_figure(3.2 * len(metrics), 4.0)
    families = list(result.families)
    for j, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), j + 1)
        scale = 100.0 if metric in _PCT else 1.0
        key_value = None
        for i, family in enumerate(families):
            t = result.test(family, metric)
            key_value = t.key
            vals = [scale * v for v in t.null if not math.isnan(v)]
            if vals:
                ax.boxplot([vals], positions=[i], widths=0.5, showfliers=False)
                jitter = [i + 0.12 * ((k * 0.618) % 1 - 0.5) for k in range(len(vals))]
                ax.scatter(jitter, vals, s=12, color=_COLORS.get(family, "gray"), zorder=3)
        if key_value is not None and not math.isnan(key_value):
            ax.scatter(
                [len(families)], [scale * key_value], marker="*", s=160,
                color="tab:blue", zorder=4, label="transferred key",
            )  # fmt: skip
        for name, style in (("baseline", "tab:gray"), ("cot", "tab:green")):
            cond = references.get(name)
            if cond is not None:
                v = metric_values(cond)[metric]
                if not math.isnan(v):
                    ax.axhline(scale * v, linestyle="--", color=style, linewidth=1, label=name)
        ax.set_xticks(list(range(len(families) + 1)))
        ax.set_xticklabels([_FAMILY.get(f, f).replace(" ", "\n") for f in families] + ["key"])
        ax.set_xlim(-0.6, len(families) + 0.6)
        ax.set_title(METRICS[metric] + (" (%)" if metric in _PCT else ""), fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        if j == 0:
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_layer_correspondence(corr: LayerCorrespondence, path: str | os.PathLike[str]) -> Path:
    """Heat map of the held-out score per (Source, Target) pair; x marks the chosen Source
    layer of each Target layer, o the proportional one."""
    pairs = [tuple(int(x) for x in k.split(",")) for k in corr.scores]
    ss = sorted({s for s, _ in pairs})
    ts = sorted({t for _, t in pairs})
    grid = [[math.nan] * len(ss) for _ in ts]
    for (s, t), v in zip(pairs, corr.scores.values(), strict=True):
        grid[ts.index(t)][ss.index(s)] = v
    fig = new_figure(7.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    finite = [v for row in grid for v in row if math.isfinite(v)]
    low = max(min(finite), -1.0) if finite else 0.0
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=low)
    fig.colorbar(im, ax=ax, label=f"held-out {'centred R²' if corr.criterion == 'r2' else 'CKA'}")
    for pairs_, style in (
        (corr.proportional, dict(marker="o", facecolors="none", edgecolors="white")),
        (corr.layer_map, dict(marker="x", color="red")),
    ):
        label = "proportional" if pairs_ is corr.proportional else "chosen"
        xs, ys = [ss.index(s) for s, _ in pairs_], [ts.index(t) for _, t in pairs_]
        ax.scatter(xs, ys, label=label, **style)
    ax.set_xticks(range(len(ss)))
    ax.set_xticklabels([str(s) for s in ss], fontsize=6)
    ax.set_yticks(range(len(ts)))
    ax.set_yticklabels([str(t) for t in ts], fontsize=6)
    ax.set_xlabel("Source layer")
    ax.set_ylabel("Target layer")
    ax.set_title(f"Layer correspondence (rank {corr.rank}, held-out)")
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def evidence_markdown(evidence: Evidence) -> list[str]:
    """The report sections of :class:`Evidence`: chance (representational and behavioural
    null) and where to steer (layer correspondence, layer subset)."""
    lines = [
        "## Is the key distinguishable from chance?",
        "",
        "Cosine with the Target's own CoT direction, per layer, against null draws (a layer "
        "counts when the key's one-sided permutation p is at most 1 − band):",
        "",
        representational_null_lines(evidence.representation),
    ]
    if evidence.behaviour is not None:
        lines += [
            "",
            "Test-split measures of UNLOCK against null keys of the key's per-layer norms "
            "(random directions; directions from the Source's contrast with the direct and "
            "CoT forms swapped at random per item, sent through the same alignment):",
            "",
            behavioural_null_table(evidence.behaviour),
        ]
    if evidence.correspondence is not None or evidence.subset is not None:
        lines += ["", "## Where to steer"]
    if evidence.correspondence is not None:
        c = evidence.correspondence.correspondence
        lines += [
            "",
            f"Source layer per Target layer chosen by held-out "
            f"{'R² of the rank-' + str(c.rank) + ' map' if c.criterion == 'r2' else 'linear CKA'}"
            ", against proportional depth; R² on the test items, cosine with the Target's own "
            "direction of the key transferred through each pairing:",
            "",
            correspondence_table(evidence.correspondence),
        ]
    if evidence.subset is not None:
        lines += ["", "Steering only the well-aligned layers (test items):", ""]
        lines.append(subset_lines(evidence.subset))
    return lines
