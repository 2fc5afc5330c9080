"""The serving op inside a captured CUDA graph, and what it costs next to a decoder block.

A Llama decoder block of a 7B shape (d 4096, 32 heads, MLP 11008; bf16; 256 tokens by
default, a decode batch) followed by ``unlock_fast::steer_tokens_`` on (hidden, residual), as
vLLM's blocks return them. On CUDA:

1. the block + op is captured once in a ``torch.cuda.graph``; the per-row buffers (slot,
   alpha, mode) are then refilled in place and the graph replayed: no rows, a few rows
   rotated, a few added with another key, every row. Each replay is checked against the same
   block and op run eagerly on the same input (same kernels: the same bits are expected);
2. replay time of the block alone, the block + op with nothing steered (target: <= 1% more),
   and with every row steered, medians over CUDA-event timings, interleaved.

On the CPU (a smoke run) only the eager check and the eager times run.

    python bench/bench_steer_graph.py --device cuda [--tokens 256] [--repeats 50]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, parse_args, print_table, write_json  # noqa: E402

import unlock_fast  # noqa: E402, F401  # registers torch.ops.unlock_fast

SEVEN_B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_key_value_heads": 32, "num_hidden_layers": 1, "vocab_size": 32000}  # fmt: skip


def extra(p: Any) -> None:
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--slots", type=int, default=4)


def seconds(fn: Any, dev: torch.device) -> float:
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], repeats=50, warmup=5, extra=extra)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sizes = dict(SEVEN_B)
    if args.quick or dev.type == "cpu":
        sizes.update(hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                     num_key_value_heads=8)  # fmt: skip
        args.tokens = min(args.tokens, 64)
    cfg = LlamaConfig(**sizes, attn_implementation="sdpa")
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg, layer_idx=0).to(dev, dtype).eval()
    rope = LlamaRotaryEmbedding(cfg).to(dev)
    n, d = args.tokens, cfg.hidden_size
    x = torch.randn(1, n, d, device=dev, dtype=dtype)
    pos = torch.arange(n, device=dev)[None]
    pe = rope(x, pos)
    hidden = torch.empty(n, d, device=dev, dtype=dtype)
    residual = torch.empty(n, d, device=dev, dtype=dtype)
    table = torch.randn(args.slots, 1, d, device=dev)
    slots = torch.full((n,), -1, dtype=torch.int32, device=dev)
    alphas = torch.zeros(n, device=dev)
    modes = torch.zeros(n, dtype=torch.uint8, device=dev)

    def block_only() -> None:
        out = block(x, position_embeddings=pe, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        hidden.copy_((out - x)[0])  # vLLM's split: the block's delta, and the stream before it
        residual.copy_(x[0])

    def block_and_op() -> None:
        block_only()
        torch.ops.unlock_fast.steer_tokens_(hidden, residual, table, 0, slots, alphas, modes)

    def fill(kind: str) -> None:
        slots.fill_(-1)
        if kind == "some":
            slots[: n // 8] = 0
            slots[n // 2 : n // 2 + 4] = 1
            alphas.fill_(0.3)
            modes.zero_()
            modes[n // 2 : n // 2 + 4] = 1
        elif kind == "all":
            slots.fill_(2)
            alphas.fill_(0.1)
            modes.zero_()

    checks: dict[str, float] = {}
    with torch.inference_mode():
        graph = None
        if dev.type == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    block_and_op()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                block_and_op()
        for kind in ("none", "some", "all", "none"):
            fill(kind)
            block_and_op()
            want = (hidden + residual).float().clone()
            if kind == "none":
                assert torch.equal(residual[0], x[0, 0]), "an unsteered row changed"
            if graph is not None:
                hidden.zero_()
                residual.zero_()
                graph.replay()
                torch.cuda.synchronize()
                got = (hidden + residual).float()
                err = (got - want).abs().max().item()
                checks[f"graph_vs_eager_{kind}"] = err
                assert err == 0.0, f"replayed graph ({kind}) differs from eager by {err}"
        fill("none")

        if graph is not None:
            base_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(base_graph):
                block_only()
            block_run, steered_run = base_graph.replay, graph.replay
        else:
            block_run, steered_run = block_only, block_and_op
        runs = [("block", "none", block_run), ("block+op, none steered", "none", steered_run),
                ("block+op, all steered", "all", steered_run)]  # fmt: skip
        for _ in range(args.warmup):
            for _, _, fn in runs:
                fn()
        times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        for _ in range(args.repeats):  # interleaved: one call of each per round
            for name, kind, fn in runs:
                fill(kind)
                times[name].append(seconds(fn, dev))
        fill("none")
    base = statistics.median(times["block"])
    rows = [
        {"run": k, "ms": 1e3 * statistics.median(v), "vs_block": statistics.median(v) / base}
        for k, v in times.items()
    ]
    print_table(rows, ["run", "ms", "vs_block"])
    write_json(
        f"steer-graph-{args.device}",
        {
            "machine": machine(args.device),
            "shape": sizes,
            "tokens": n,
            "dtype": str(dtype),
            "checks": checks,
            "rows": rows,
        },  # fmt: skip
        args.out,
    )


if __name__ == "__main__":
    main()
