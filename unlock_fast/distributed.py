"""Running the statistics passes on several processes (``torch.distributed``).

Each process reads a strided shard of the prompts; the accumulators are then summed with
``all_reduce``, so every process ends with the statistics of all prompts. The result does
not depend on the number of processes beyond floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank_and_world", "shard", "all_reduce_sum_"]

T = TypeVar("T")


def is_distributed() -> bool:
    """True when torch.distributed is initialised (and so a group can be used)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) in ``group``, or (0, 1) without torch.distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard(items: Sequence[T], group: dist.ProcessGroup | None = None) -> list[T]:
    """This process's share of ``items``: every world-size-th item, from its rank."""
    rank, world = rank_and_world(group)
    return list(items[rank::world])


def all_reduce_sum_(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``t`` over the processes of ``group`` in place (no-op without distributed)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def require_distributed() -> None:
    if not is_distributed():
        raise RuntimeError(
            "distributed=True needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group) in every process"
        )
