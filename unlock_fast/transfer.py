"""Collect a direction and the alignment statistics in one pass over the locked prompts.

In the paper's chain-of-thought setting the direction contrasts the Source on the locked
prompts ``p0`` with the Source on the unlocked prompts ``p1``, and the alignment pairs the
Source on ``p0`` with the Target on ``p0``. :func:`collect_transfer` runs the three passes
in lockstep, so each locked prompt goes through the Source once and feeds both. Other
alignment data (:mod:`unlock_fast.alignment_data`) joins that pass (the unlocked prompts) or
follows it (a corpus).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from .alignment import LayerMap, plan_alignment
from .alignment_data import CorpusLike, plan_data
from .artifacts import AlignmentStats, Direction
from .collect import Side, lockstep
from .direction import DirectionAccumulator, finish_direction, plan_direction
from .stats import check_accumulate

__all__ = ["collect_transfer"]


def collect_transfer(
    source_model: nn.Module,
    source_tokenizer: Any,
    target_model: nn.Module,
    target_tokenizer: Any,
    prompts_locked: Sequence[str],
    prompts_unlocked: Sequence[str] | None = None,
    *,
    target_prompts: Sequence[str] | None = None,
    target_prompts_unlocked: Sequence[str] | None = None,
    alignment_data: str = "locked",
    corpus: CorpusLike | None = None,
    corpus_limit: int | None = None,
    unlocked_model: nn.Module | None = None,
    unlocked_tokenizer: Any = None,
    method: str = "mean",
    layer_map: LayerMap | None = None,
    source_layer_path: str | None = None,
    unlocked_layer_path: str | None = None,
    target_layer_path: str | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_length: int | None = None,
    progress: bool = True,
    distributed: bool = False,
    group: ProcessGroup | None = None,
    accumulate: torch.dtype = torch.float64,
) -> tuple[Direction, AlignmentStats]:
    """The Source's direction (every layer) and the alignment statistics, in one pass.

    Equal to ``extract_direction(source, ..., prompts_locked, prompts_unlocked, ...)`` and
    ``collect_alignment_stats(source, ..., target, ..., prompts_locked,
    target_prompts=target_prompts, ...)``, with the Source's locked pass shared.
    ``target_prompts`` renders the same items for the Target (default: ``prompts_locked``).

    ``alignment_data`` chooses the alignment's rows, as in
    :func:`~unlock_fast.collect_alignment_stats`: the locked prompts (the paper), the locked
    and the unlocked prompts, a ``corpus``, or the locked prompts and a corpus (streamed
    after the shared pass). ``"locked+unlocked"`` runs the Target on the unlocked prompts
    (``target_prompts_unlocked``, default ``prompts_unlocked``), so the map can learn the
    Source's contrast -> the Target's contrast: a ceiling and a diagnostic, not the paper's
    transfer. It needs a prompt contrast and is refused with ``unlocked_model`` (a model
    contrast, where the Target has no unlocked form). With ``"corpus"`` the Target runs on
    the corpus only. The choice is recorded in ``origin["alignment_data"]``.
    ``accumulate`` is the dtype of the alignment's sums (see
    :func:`~unlock_fast.collect_alignment_stats`). NaN or Inf in a captured row stops the
    pass with a ValueError naming the model, the layer and the prompts.
    """
    check_accumulate(accumulate)
    d = plan_direction(
        source_model,
        source_tokenizer,
        prompts_locked,
        prompts_unlocked,
        unlocked_model=unlocked_model,
        unlocked_tokenizer=unlocked_tokenizer,
        method=method,
        layers=None,
        layer_path=source_layer_path,
        unlocked_layer_path=unlocked_layer_path,
    )
    data = plan_data(
        alignment_data,
        corpus,
        corpus_limit,
        prompts_locked,
        prompts_unlocked,
        target_prompts,
        target_prompts_unlocked,
        model_contrast=unlocked_model is not None,
    )
    a = plan_alignment(
        source_model,
        source_tokenizer,
        target_model,
        target_tokenizer,
        prompts_locked,
        target_prompts=target_prompts,
        layer_map=layer_map,
        source_layer_path=source_layer_path,
        target_layer_path=target_layer_path,
    )
    locked = Side(
        source_model,
        source_tokenizer,
        d.locked.prompts,
        sorted(set(d.layers) | set(a.source.layers)),
        source_layer_path,
    )
    n = len(d.locked.prompts)
    # The Target's sides: the locked prompts unless the rows are the corpus only, and the
    # unlocked prompts for "locked+unlocked" (the Source's unlocked pass is the direction's).
    targets = [replace(a.target, prompts=p) for p in _chunks(data.target_prompts, n)]
    directions = DirectionAccumulator(d.layers, d.info.hidden_size, method)
    alignment = a.accumulator(accumulate)
    kw: dict[str, Any] = dict(
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        max_length=max_length,
        progress=progress,
        distributed=distributed,
        group=group,
    )
    with lockstep([locked, d.unlocked, *targets], desc="direction + alignment", **kw) as batches:
        for lo, hi, *tgt in batches:
            directions.update(lo.rows, hi.rows)
            for src, t in zip((lo, hi), tgt, strict=False):
                alignment.update(src, t)
    record = data.run_corpus(a.source, a.target, alignment.update, **kw)
    stats = alignment.stats(device)
    stats.origin["alignment_data"] = record
    if distributed:
        directions.all_reduce(group, torch.device(device) if device is not None else None)
        stats.all_reduce(group)
    return finish_direction(d, directions), stats


def _chunks(prompts: list[str], n: int) -> list[list[str]]:
    """``prompts`` cut into lists of ``n`` (the locked part, then the unlocked part)."""
    return [prompts[i : i + n] for i in range(0, len(prompts), n)]
