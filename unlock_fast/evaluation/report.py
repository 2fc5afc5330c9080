"""Reports: JSON, Markdown tables and PNG plots (matplotlib's Agg canvas, no display).

Plots: rates against alpha, held-out R² against rank, the key's cosine with the Target's own
direction within the null bands, the null keys' measures, and the layer-pair scores.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .._optional import require
from ..artifacts import AlignmentReport
from .conditions import ConditionResult, EvaluationResult, write_items
from .null import METRICS, BehaviouralNull, metric_values
from .null_keys import RepresentationalNull

__all__ = [
    "COLORS", "alignment_table", "behavioural_null_table", "condition_table", "figure",
    "finish_axes", "plot_null_spread", "save_figure", "write_json", "write_null_items"
]  # fmt: skip

_FAMILY = {"random": "random keys", "null_contrast": "null-contrast keys"}
_PCT = {"accuracy", "step_rate", "final_rate"}
COLORS = {"baseline": "tab:gray", "cot": "tab:green", "unlock": "tab:blue", "random": "tab:orange"}
COLORS["null_contrast"] = "tab:purple"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


def _value(metric: str, v: float) -> str:
    if math.isnan(v):
        return "n/a"
    return f"{100 * v:.1f}%" if metric in _PCT else f"{v:.1f}"


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
            f"{100 * acc.high:.1f}] | {acc.n} | {c.mean_tokens:.1f} | {_pct(c.step_rate)} "
            f"| {_pct(c.answered_rate)} |"
        )
    lines += ["", "Accuracy, paired on the same items:", ""]
    lines += [f"- {comp.verdict}" for comp in result.comparisons()]
    lines += ["", "Outputs that show intermediate steps, paired on the same items:", ""]
    lines += [f"- {comp.verdict}" for comp in result.comparisons("shows_steps")]
    return "\n".join(lines)


def alignment_table(diagnostics: AlignmentReport, rep: RepresentationalNull | None = None) -> str:
    """Markdown per Target layer: held-out relative error and centred R², and with ``rep``
    the key's cosine with the Target's own direction against the random band (and the band
    of null-contrast keys)."""
    tests = {} if rep is None else rep.tests
    head, rule = "| target layer | source layer | rel. error | centred R² |", "|---|---|---|---|"
    if "random" in tests:
        head += " cos(key, own CoT) | random 95% band | p (random ≥ key) |"
        rule += "---|---|---|"
    if "null_contrast" in tests:
        head += " null-contrast 95% band | p (null contrast ≥ key) |"
        rule += "---|---|"
    lines = [head, rule]
    for (s, t), err, r2 in zip(
        diagnostics.layer_map, diagnostics.rel_error, diagnostics.r2, strict=True
    ):
        row = f"| {t} | {s} | {err:.3f} | {r2:.3f} |"
        for name, test in tests.items():
            if t not in test.layers:
                row += " – | – | – |" if name == "random" else " – | – |"
                continue
            i = test.layers.index(t)
            c, lo, hi = test.observed[i], test.null_low[i], test.null_high[i]
            if name == "random":
                ex = test.exceed[i]
                p = f"{ex:.3f}" if ex > 0 else f"< {1 / test.num_null:.3f}"
                row += f" {c:+.3f}{' ↑' if c > hi else ''} | [{lo:+.3f}, {hi:+.3f}] | {p} |"
            else:
                row += f" [{lo:+.3f}, {hi:+.3f}] | {test.p_values[i]:.3f} |"
        lines.append(row)
    return "\n".join(lines)


def write_json(data: Any, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return p


def _json_default(o: Any) -> Any:
    for method in ("to_dict", "tolist"):
        if hasattr(o, method):
            return getattr(o, method)()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def write_null_items(
    families: Mapping[str, Iterable[ConditionResult]],
    skip: EvaluationResult,
    path: str | os.PathLike[str],
) -> Path:
    """The per-item outputs of the null keys' conditions but those already in ``skip`` (the
    evaluation's own random condition), one JSON line each."""
    conds = [c for cs in families.values() for c in cs if c is not skip.conditions.get(c.name)]
    return write_items(conds, path)


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


def figure(width: float = 7.0, height: float = 4.2, panels: int = 1) -> tuple[Any, list[Any]]:
    """A matplotlib Figure on the Agg canvas (no display needed) and its panels in a row."""
    require("matplotlib", "plots", "Drawing plots")
    agg = require("matplotlib.backends.backend_agg", "plots", "Drawing plots")
    fig = require("matplotlib.figure", "plots", "Drawing plots").Figure((width, height), dpi=110)
    agg.FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(str(p))
    return p


def finish_axes(ax: Any, legend: dict[str, Any] | None = None, **labels: Any) -> None:
    ax.set(**labels)
    ax.legend(**(legend or {"fontsize": 8}))
    ax.grid(alpha=0.3)


def plot_null_spread(
    result: BehaviouralNull, references: Mapping[str, ConditionResult], path: str | os.PathLike[str]
) -> Path:
    """One panel per measure: each null family's values (dots over a box), the key's value
    (blue star) and the unsteered references (``baseline``, ``cot``) as dashed lines."""
    fig, axes = figure(3.2 * len(METRICS), 4.0, len(METRICS))
    families = list(result.families)
    for j, (ax, metric) in enumerate(zip(axes, METRICS, strict=True)):
        scale = 100.0 if metric in _PCT else 1.0
        key_value = math.nan
        for i, family in enumerate(families):
            t = result.test(family, metric)
            key_value, vals = t.key, [scale * v for v in t.null if not math.isnan(v)]
            if vals:
                ax.boxplot([vals], positions=[i], widths=0.5, showfliers=False)
                jitter = [i + 0.12 * ((k * 0.618) % 1 - 0.5) for k in range(len(vals))]
                ax.scatter(jitter, vals, s=12, color=COLORS.get(family, "gray"), zorder=3)
        if not math.isnan(key_value):
            star = dict(marker="*", s=160, color="tab:blue", zorder=4, label="transferred key")
            ax.scatter([len(families)], [scale * key_value], **star)
        for name in ("baseline", "cot"):
            v = metric_values(references[name])[metric] if name in references else math.nan
            if not math.isnan(v):
                ax.axhline(scale * v, linestyle="--", color=COLORS[name], linewidth=1, label=name)
        ax.set_xticks(list(range(len(families) + 1)))
        ax.set_xticklabels([_FAMILY.get(f, f).replace(" ", "\n") for f in families] + ["key"])
        ax.set_xlim(-0.6, len(families) + 0.6)
        ax.set_title(METRICS[metric] + (" (%)" if metric in _PCT else ""), fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        if j == 0:
            ax.legend(fontsize=7)
    return save_figure(fig, path)
