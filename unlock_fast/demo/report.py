"""The demo's report folder: report.md and report.json, per-item outputs, artifacts, plots."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..evaluation.conditions import write_items
from ..evaluation.evidence import CorrespondenceEvidence, Evidence, SubsetEvidence
from ..evaluation.report import (
    alignment_table,
    behavioural_null_table,
    condition_table,
    plot_null_spread,
    write_json,
    write_null_items,
)
from .config import DemoResult
from .plots import (
    key_cosines,
    plot_accuracy_vs_alpha,
    plot_key_cosine,
    plot_layer_correspondence,
    plot_r2_vs_rank,
)
from .topic_report import plot_topic_rates, topic_markdown, write_topic_items

__all__ = ["write_markdown", "write_report"]


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


def evidence_markdown(evidence: Evidence) -> list[str]:
    """The report sections of :class:`Evidence`: chance (representational and behavioural
    null) and where to steer (layer correspondence, layer subset)."""
    lines = [
        "## Is the key distinguishable from chance?",
        "",
        "Cosine with the Target's own CoT direction, per layer, against null draws (a layer "
        "counts when the key's one-sided permutation p is at most 1 − band):",
        "",
        "\n".join(f"- {t.summary()}" for t in evidence.representation.tests.values()),
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


def write_report(result: DemoResult, run: Any, out: Path) -> dict[str, Path]:
    """Tables, per-item outputs and artifacts first, plots last."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "items": write_items(result.evaluation.conditions.values(), out / "items.jsonl"),
        "json": write_json(_payload(result), out / "report.json"),
        "markdown": write_markdown(result, out),
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
    files["plot_cosine"] = plot_key_cosine(ev.representation, out / "key_cosine.png")
    if ev.null_conditions:
        files["null_items"] = write_null_items(
            ev.null_conditions, result.evaluation, out / "null_items.jsonl"
        )
    if ev.behaviour is not None:
        refs = result.evaluation.conditions
        files["plot_null"] = plot_null_spread(ev.behaviour, refs, out / "null_spread.png")
    if ev.correspondence is not None:
        files["plot_layers"] = plot_layer_correspondence(
            ev.correspondence.correspondence, out / "layer_correspondence.png"
        )
    if result.topic is not None:
        files["topic_items"] = write_topic_items(result.topic, out / "topic_items.jsonl")
        files["plot_topic"] = plot_topic_rates(result.topic, out / "topic_rates.png")
    return files


def _payload(result: DemoResult) -> dict[str, Any]:
    return {
        "config": asdict(result.config),
        "alignment_diagnostics": result.diagnostics.to_dict(),
        "key_cosines": key_cosines(result.evidence.representation),
        "rank_sweep": {str(r): rep.to_dict() for r, rep in result.rank_sweep.items()},
        "evaluation": result.evaluation.to_dict(),
        "alpha_curves": result.alpha_curves,
        "evidence": result.evidence.to_dict(),
        "topic": None if result.topic is None else result.topic.to_dict(),
        "timings_s": result.timings,
    }


def write_markdown(result: DemoResult, out: Path) -> Path:
    cfg = result.config
    sel = result.evidence.selection
    rep = result.evidence.representation
    cos = rep.tests["random"]
    above = [x for x, c, hi in zip(cos.layers, cos.observed, cos.null_high, strict=True) if c > hi]
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
        f"(extracted on the held-out problems) against {cos.num_null} random Source "
        "directions sent through the same map (↑: above their 97.5% quantile)"
        + (
            f" and against {result.evidence.representation.tests['null_contrast'].num_null} "
            "null-contrast keys (Source contrast swapped at random per item, same map)."
            if "null_contrast" in result.evidence.representation.tests
            else "."
        ),
        "",
        alignment_table(result.diagnostics, rep),
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
    if result.topic is not None:
        lines += ["", topic_markdown(result.topic).rstrip()]
        lines += ["", "Topic plot: topic_rates.png; its per-item outputs: topic_items.jsonl."]
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
