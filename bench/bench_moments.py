"""Streaming moments: ``ops.moments_accumulate_`` against the torch composite a user writes.

Baseline: ``torch.addmm`` into fp32 accumulators (``.float()`` first for bf16 input), one
product per Gram (XᵀX, and YᵀY and XᵀY when paired) plus the column sums. Ours: the same
state from one call (shift, convert, syrk/gemm/gemv). Both run with shift 0 so they compute
the same numbers; both are checked against the float64 reference before any timing counts.
The GFLOP/s column counts the baseline's dense products, 2·n·(dx² + dy² + dx·dy), for both,
so the ratio is the ratio of times. Ours needs only half the flops for XᵀX and YᵀY (their
upper triangles); the table says which part of the gain that is.

On CUDA two more contenders run: ``precision="tf32"`` and ``precision="half"`` (tensor
cores; checked against the reference at their own tolerance), with the share of the GPU's
dense bf16 tensor-core peak that the half path reaches (flops it does: full Grams).

    python bench/bench_moments.py [--device cpu|cuda] [--repeats 5] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, parse_args, print_table, write_json  # noqa: E402

from unlock_fast import ops, reference  # noqa: E402

# Dense bf16 tensor-core peak, TFLOP/s (no sparsity), of the GPUs this is meant for.
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
# Largest relative error allowed per precision before timing; fp32 sums of n rows also get
# 4·eps·√n (rounding grows with the number of rows summed).
TOLERANCE = {"fp32": 1e-5, "tf32": 2e-3, "half": 8e-3}


def tolerance(precision: str, n: int) -> float:
    return max(TOLERANCE[precision], 4 * torch.finfo(torch.float32).eps * n**0.5)


def bf16_peak(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def cases(device: str, quick: bool) -> list[tuple[int, int, int, torch.dtype]]:
    if quick:
        sizes = [(256, 256, 0), (256, 192, 128)]
    elif device == "cuda":
        sizes = [(8192, 4096, 0), (8192, 4096, 4096)]
    else:
        sizes = [(2048, 2048, 0), (1024, 2048, 1536)]
    return [(n, dx, dy, dt) for n, dx, dy in sizes for dt in (torch.float32, torch.bfloat16)]


def run_case(n: int, dx: int, dy: int, dtype: torch.dtype, device: str, args) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dx, generator=g).to(dtype).to(device)
    y = torch.randn(n, dy, generator=g).to(dtype).to(device) if dy else None
    f32 = dict(dtype=torch.float32, device=device)

    def state():
        s = {"sum_x": torch.zeros(dx, **f32), "gram_xx": torch.zeros(dx, dx, **f32)}
        if dy:
            s.update(
                sum_y=torch.zeros(dy, **f32),
                gram_yy=torch.zeros(dy, dy, **f32),
                gram_xy=torch.zeros(dx, dy, **f32),
            )
        return s

    shift_x = torch.zeros(dx, **f32)
    shift_y = torch.zeros(dy, **f32) if dy else None
    precisions = ["fp32", "tf32", "half"] if device == "cuda" else ["fp32"]
    states = {p: state() for p in precisions}
    base_state = state()

    def contender(precision: str):
        s = states[precision]

        def run():
            ops.moments_accumulate_(
                x, y, None, shift_x, shift_y, s["sum_x"], s.get("sum_y"), s["gram_xx"],
                s.get("gram_yy"), s.get("gram_xy"), precision=precision,
            )  # fmt: skip

        return run

    runs = {p: contender(p) for p in precisions}
    ours = runs["fp32"]

    def baseline():
        s = base_state
        xf = x if x.dtype == torch.float32 else x.float()
        s["gram_xx"].addmm_(xf.T, xf)
        s["sum_x"].add_(xf.sum(0))
        if y is not None:
            yf = y if y.dtype == torch.float32 else y.float()
            s["gram_yy"].addmm_(yf.T, yf)
            s["gram_xy"].addmm_(xf.T, yf)
            s["sum_y"].add_(yf.sum(0))

    # correctness first: one call each against the float64 reference
    for run in runs.values():
        run()
    baseline()
    ref = reference.moments_reference(x.cpu(), None if y is None else y.cpu())
    checks = [(f"ours ({p})", st, tolerance(p, n)) for p, st in states.items()]
    for name, st, tol in [*checks, ("baseline", base_state, tolerance("fp32", n))]:
        for key, val in st.items():
            want = ref[key]
            if key.startswith("gram") and key != "gram_xy":  # ours fills the upper triangle
                val, want = torch.triu(val), torch.triu(want)
            err = float((val.double().cpu() - want).abs().max() / (want.abs().max() + 1))
            if err > tol:
                raise SystemExit(f"{name} {key} is off by {err:.2e} (relative): not timing")

    fns = {"baseline": baseline, "ours": ours}
    fns.update({f"ours_{p}": runs[p] for p in precisions if p != "fp32"})
    t = interleaved(fns, device, repeats=args.repeats, warmup=args.warmup)
    flops = 2.0 * n * (dx * dx + dy * dy + dx * dy)
    tb, to = t["baseline"]["median_s"], t["ours"]["median_s"]
    row = {
        "n": n,
        "dx": dx,
        "dy": dy,
        "dtype": str(dtype).removeprefix("torch."),
        "baseline_ms": tb * 1e3,
        "ours_ms": to * 1e3,
        "baseline_gflops": flops / tb / 1e9,
        "ours_gflops": flops / to / 1e9,
        "speedup": tb / to,
        "timings": t,
    }
    peak = bf16_peak(device)
    for p in precisions[1:]:
        tp = t[f"ours_{p}"]["median_s"]
        row[f"{p}_ms"] = tp * 1e3
        row[f"{p}_speedup"] = tb / tp
        if peak:  # the tensor-core path computes full Grams: its own flops
            row[f"{p}_pct_bf16_peak"] = 100 * flops / tp / 1e12 / peak
    return row


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=5, warmup=1)
    rows = []
    for n, dx, dy, dtype in cases(args.device, args.quick):
        rows.append(run_case(n, dx, dy, dtype, args.device, args))
        r = rows[-1]
        extra = "".join(
            f", {p} x{r[f'{p}_speedup']:.2f}" for p in ("tf32", "half") if f"{p}_speedup" in r
        )
        print(f"  n={n} dx={dx} dy={dy} {r['dtype']}: x{r['speedup']:.2f}{extra}", flush=True)
    print_table(
        rows,
        ["n", "dx", "dy", "dtype", "baseline_ms", "ours_ms", "baseline_gflops", "ours_gflops",
         "speedup"],
    )  # fmt: skip
    suffix = ("-quick" if args.quick else "") + (f"-t{args.threads}" if args.threads else "")
    write_json(
        f"moments-{args.device}{suffix}",
        {"benchmark": "moments", "machine": machine(args.device), "results": rows},
        args.out,
    )


if __name__ == "__main__":
    main()
