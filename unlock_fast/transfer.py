"""Collect a direction and the alignment statistics in one pass over the locked prompts.

In the paper's chain-of-thought setting the direction contrasts the Source on the locked
prompts ``p0`` with the Source on the unlocked prompts ``p1``, and the alignment pairs the
Source on ``p0`` with the Target on ``p0``. :func:`collect_transfer` runs the three passes
in lockstep, so each locked prompt goes through the Source once and feeds both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from .alignment import LayerMap, plan_alignment
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
    directions = DirectionAccumulator(d.layers, d.info.hidden_size, method)
    alignment = a.accumulator(accumulate)
    with lockstep(
        [locked, d.unlocked, a.target],
        desc="direction + alignment",
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        max_length=max_length,
        progress=progress,
        distributed=distributed,
        group=group,
    ) as batches:
        for lo, hi, tgt in batches:
            directions.update(lo.rows, hi.rows)
            alignment.update(lo, tgt)
    stats = alignment.stats(device)
    if distributed:
        directions.all_reduce(group, torch.device(device) if device is not None else None)
        stats.all_reduce(group)
    return finish_direction(d, directions), stats
