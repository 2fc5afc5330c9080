"""Worker for the two-process torch.distributed test (a module, so spawn can import it)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tiny_models import PROMPTS, bpe_tokenizer, make_model, word_tokenizer

from unlock_fast import collect_alignment_stats, extract_direction

COT = [p + " Answer: Let's think step by step." for p in PROMPTS]


def build():
    stok, ttok = word_tokenizer(), bpe_tokenizer()
    return stok, ttok, make_model("llama", len(stok)), make_model("qwen2", len(ttok), seed=1)


def results(distributed: bool) -> dict[str, torch.Tensor]:
    stok, ttok, src, tgt = build()
    kw = dict(progress=False, distributed=distributed, batch_size=3)
    stats = collect_alignment_stats(src, stok, tgt, ttok, PROMPTS, **kw)
    mean = extract_direction(src, stok, PROMPTS, COT, **kw)
    pca = extract_direction(src, stok, PROMPTS, COT, method="pca", **kw)
    a = stats.fit(rank=6)
    return {
        "map": torch.stack([a.matrix(t) for t in a.target_layers]),
        "mean": mean.vectors,
        "pca": pca.vectors,
        "counts": torch.tensor([stats.num_rows, stats.num_prompts, mean.num_prompts]),
    }


def worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = results(distributed=True)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in out.items()}, out_file)
    finally:
        dist.destroy_process_group()
