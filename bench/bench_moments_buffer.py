"""Row blocks in ``Moments``: capture-sized batches with and without the block.

Capture hands a paired accumulator a few rows per batch and layer (the last token of each
prompt). Each contender streams the same N rows, ``--batch`` at a time, into a fresh
``Moments(d, d)`` and reads the centred cross-Gram at the end: ``buffer_rows=0`` updates the
three d×d Grams on every batch (the behaviour before row blocks); the others hold rows in a
block of that many and update once per block. Both are checked against the float64 formula
before any timing counts. Accumulators: fp32 (the compiled kernel) and float64 (torch
matmuls, the alignment's default).

    python bench/bench_moments_buffer.py [--device cpu|cuda] [--repeats 3] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, parse_args, print_table, write_json  # noqa: E402

from unlock_fast.stats import Moments  # noqa: E402


def stream(x: torch.Tensor, y: torch.Tensor, batch: int, dtype: torch.dtype, rows: int):
    m = Moments(x.shape[1], y.shape[1], device=x.device, dtype=dtype, buffer_rows=rows)
    for i in range(0, x.shape[0], batch):
        m.update(x[i : i + batch], y[i : i + batch])
    return m.gram("xy", centered=True)


def run_case(n: int, d: int, dtype: torch.dtype, device: str, args) -> dict:
    g = torch.Generator().manual_seed(d)
    # residual-stream-like rows: a large common mean, unit spread
    x = (torch.randn(n, d, generator=g) + 4 * torch.randn(d, generator=g)).to(device)
    y = (torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5).to(device)
    xd, yd = x.double().cpu(), y.double().cpu()
    want = (xd - xd.mean(0)).T @ (yd - yd.mean(0))
    blocks = [0, *args.blocks]
    for rows in blocks:
        got = stream(x, y, args.batch, dtype, rows).cpu()
        err = float((got - want).abs().max() / want.abs().max())
        if err > (1e-4 if dtype == torch.float32 else 1e-10):
            raise SystemExit(f"buffer_rows={rows} is off by {err:.2e} (relative): not timing")
    fns = {f"rows_{r}": (lambda r=r: stream(x, y, args.batch, dtype, r)) for r in blocks}
    t = interleaved(fns, device, repeats=args.repeats, warmup=args.warmup)
    base = t["rows_0"]["median_s"]
    row = {"n": n, "d": d, "batch": args.batch, "accumulate": str(dtype)[6:], "per_batch_s": base}
    for r in args.blocks:
        row[f"block_{r}_s"] = t[f"rows_{r}"]["median_s"]
        row[f"speedup_{r}"] = base / t[f"rows_{r}"]["median_s"]
    row["timings"] = t
    return row


def main() -> None:
    def extra(p):
        p.add_argument("--batch", type=int, default=16, help="rows per update (prompts/batch)")
        p.add_argument("--rows", type=int, default=2048, help="rows streamed per contender")
        p.add_argument("--dims", default="1024,2048,4096", help="hidden sizes d")
        p.add_argument("--blocks", default="256,1024,4096", help="buffer_rows to compare")

    args = parse_args(__doc__.splitlines()[0], repeats=3, warmup=1, extra=extra)
    args.blocks = [int(v) for v in args.blocks.split(",")]
    dims = [256, 512] if args.quick else [int(v) for v in args.dims.split(",")]
    rows = []
    for d in dims:
        for dtype in (torch.float32, torch.float64):
            rows.append(run_case(args.rows, d, dtype, args.device, args))
            r = rows[-1]
            gains = ", ".join(f"{b}: x{r[f'speedup_{b}']:.2f}" for b in args.blocks)
            print(f"  d={d} {r['accumulate']}: per batch {r['per_batch_s']:.2f} s; {gains}")
    cols = ["n", "d", "batch", "accumulate", "per_batch_s"]
    cols += [c for b in args.blocks for c in (f"block_{b}_s", f"speedup_{b}")]
    print_table(rows, cols)
    suffix = ("-quick" if args.quick else "") + (f"-t{args.threads}" if args.threads else "")
    write_json(
        f"moments-buffer-{args.device}{suffix}",
        {"benchmark": "moments_buffer", "machine": machine(args.device), "results": rows},
        args.out,
    )


if __name__ == "__main__":
    main()
