"""Worker for the two-process tests of kept rows (a module, so spawn can import it)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from unlock_fast.stats import Moments

DX, DY, N = 24, 20, 30


def rows(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N paired rows with a large mean, and positive weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, DX, generator=g) + 4.0
    y = torch.randn(N, DY, generator=g) @ torch.randn(DY, DY, generator=g) - 2.0
    w = torch.rand(N, generator=g) + 0.5
    return x, y, w


def local(rank: int, world: int, limit: int, gram_on: int | None) -> Moments:
    """This process's share of the rows: batches of 4 dealt round-robin; the process
    ``gram_on`` sums from the start."""
    x, y, w = rows()
    m = Moments(DX, DY, dtype=torch.float64, row_limit=0 if rank == gram_on else limit)
    for i, at in enumerate(range(0, N, 4)):
        if i % world == rank:
            m.update(x[at : at + 4], y[at : at + 4], w[at : at + 4])
    return m


def worker(rank: int, world: int, init_file: str, out_file: str, limit: int, gram_on: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = local(rank, world, limit, None if gram_on < 0 else gram_on).all_reduce()
        out = {w: m.gram(w) for w in ("xx", "yy", "xy")}
        out["cxy"] = m.gram("xy", centered=True)
        out["form"] = torch.tensor([m.form == "rows", m.rows, m.count], dtype=torch.float64)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in out.items()}, out_file)
    finally:
        dist.destroy_process_group()
