"""Run several captures over the same prompts in lockstep: the loop every collector shares.

A collector (direction, alignment, or both at once) describes each model's side as a
:class:`Side` and iterates over :func:`lockstep`, which shards the prompts over processes,
plans batches of similar length, runs each side's forward on the same batch, shows a progress
bar, and restores every model's train/eval mode at the end. Each side's rows come back as a
:class:`~unlock_fast.capture.CapturedBatch`, batch by batch, so callers stream them into
accumulators instead of keeping them. A batch with NaN or Inf in any captured row stops the
loop with a ValueError naming the model, the layer and the prompts, before any statistic
sees it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from .capture import CapturedBatch, iter_activations, plan_batches, progress_bar
from .distributed import rank_and_world, require_distributed, shard
from .layers import model_name

__all__ = ["Side", "check_finite_rows", "check_prompts", "lockstep"]


@dataclass
class Side:
    """One model's part of a lockstep capture: its prompts (item i of each side is the same
    item) and the decoder layers to read."""

    model: nn.Module
    tokenizer: Any
    prompts: Sequence[str]
    layers: Sequence[int]
    layer_path: str | None = None


def check_prompts(name: str, prompts: object) -> list[str]:
    """``prompts`` as a list, or TypeError/ValueError naming what was expected."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{name} must not be empty")
    return list(prompts)


@contextmanager
def lockstep(
    sides: Sequence[Side],
    *,
    desc: str,
    batch_size: int = 8,
    token_level: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_length: int | None = None,
    progress: bool = True,
    distributed: bool = False,
    group: ProcessGroup | None = None,
) -> Iterator[Iterator[tuple[CapturedBatch, ...]]]:
    """Yield an iterator of per-batch tuples, one CapturedBatch per side, in side order.

    Batches are planned on the first side's tokenizer. With ``distributed=True`` this process
    reads every world-size-th prompt. Every batch is checked for non-finite rows (one
    synchronisation per side). Hooks are removed and modes restored on exit, also when the
    caller stops early or raises.
    """
    if not sides:
        raise ValueError("lockstep needs at least one side")
    n = len(sides[0].prompts)
    if any(len(s.prompts) != n for s in sides):
        raise ValueError(
            f"every side needs the same number of prompts, got {[len(s.prompts) for s in sides]}"
        )
    if distributed:
        require_distributed()
    rank, _ = rank_and_world(group if distributed else None)
    idx = shard(list(range(n)), group) if distributed else list(range(n))
    first = sides[0]
    batches = (
        plan_batches(first.tokenizer, [first.prompts[i] for i in idx], batch_size, max_length)
        if idx
        else []
    )
    modes = {m: m.training for s in sides for m in s.model.modules()}
    bar = progress_bar(len(idx), desc, progress and rank == 0)
    try:
        with ExitStack() as stack:
            its = []
            for s in sides:
                it = iter_activations(
                    s.model,
                    s.tokenizer,
                    [s.prompts[i] for i in idx],
                    s.layers,
                    batches=batches,
                    layer_path=s.layer_path,
                    token_level=token_level,
                    device=device,
                    dtype=dtype,
                    max_length=max_length,
                )
                its.append(stack.enter_context(closing(it)))
            yield _checked(zip(*its, strict=True), sides, idx, token_level, bar)
    finally:
        bar.close()
        for m, mode in modes.items():  # one model may serve two sides: restore once, at the end
            m.training = mode


def _checked(
    it: Iterator[tuple[CapturedBatch, ...]],
    sides: Sequence[Side],
    idx: list[int],
    token_level: bool,
    bar: Any,
) -> Iterator[tuple[CapturedBatch, ...]]:
    """The batches of ``it``, each checked for non-finite rows, counted on the bar."""
    for number, batch in enumerate(it):
        for side, captured in zip(sides, batch, strict=True):
            check_finite_rows(side.model, captured, number, idx, token_level=token_level)
        yield batch
        bar.update(len(batch[0].indices))


def check_finite_rows(
    model: nn.Module,
    batch: CapturedBatch,
    number: int,
    idx: Sequence[int] | None = None,
    *,
    token_level: bool = False,
) -> None:
    """ValueError naming the model, the first decoder layer with NaN/Inf rows in ``batch``
    (the ``number``-th batch) and its prompts, if there is one. ``idx`` maps the batch's
    prompt indices to the caller's (this process's shard to the whole list); with one row
    per prompt (not ``token_level``) only the prompts whose rows broke are named."""
    layers = sorted(batch.rows)
    if not layers:
        return
    flags = torch.stack([torch.isfinite(batch.rows[layer]).all() for layer in layers])
    if bool(flags.all()):  # the one synchronisation
        return
    layer = next(layer for layer, ok in zip(layers, flags.tolist(), strict=True) if not ok)
    rows = batch.rows[layer]
    prompts = [idx[i] if idx is not None else i for i in batch.indices]
    if not token_level:  # one row per prompt: name the prompts that broke
        bad = (~torch.isfinite(rows)).any(dim=1).tolist()
        prompts = [p for p, b in zip(prompts, bad, strict=True) if b]
    shown = ", ".join(map(str, prompts[:8])) + (", ..." if len(prompts) > 8 else "")
    raise ValueError(
        f"{model_name(model)}: decoder layer {layer} produced NaN or Inf activations in batch "
        f"{number} (prompts {shown}); stopping before they reach the statistics. Check the "
        "model's weights and dtype (float16 often overflows: try bfloat16 or float32)"
    )
