"""Last-token steering: ``ops.steer_`` against the eager torch expression of the rule.

hidden [B, S, d] (default B = 16, S = 128, d = 2048), one position per row (the last real
prompt token), one shared vector, mode rotate (the paper's rule
h <- normalize(h/|h| + alpha r/|r|) |h|). The baseline is what one writes in eager torch:
gather the rows, compute in fp32, scatter them back. Two entries of ours: ``ops.steer_``
(the public op, which checks every argument on every call) and ``ops.steer_unchecked_`` (what
the steering hooks call per layer once the key, alpha, mode and the call's positions were
checked: only hidden is checked per call). All are checked against ``reference.steer_reference``
before any timing counts. CPU: per-call perf_counter; GPU: CUDA events around 100 calls.

    python bench/bench_steer.py [--device cpu|cuda] [--repeats 2000] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, parse_args, print_table, write_json  # noqa: E402

from unlock_fast import ops, reference  # noqa: E402
from unlock_fast.ops.steer import STEER_MODES  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def eager_steer(h: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, alpha: float) -> None:
    rows = torch.arange(h.shape[0], device=h.device)
    x = h[rows, pos].float()
    hn = x.norm(dim=-1, keepdim=True)
    r = v.float()
    u = x / hn.clamp_min(1e-12) + alpha * r / r.norm().clamp_min(1e-12)
    h[rows, pos] = (u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12) * hn).to(h.dtype)


def run_case(b: int, s: int, d: int, dtype: torch.dtype, device: str, args) -> dict:
    g = torch.Generator().manual_seed(0)
    h0 = (torch.randn(b, s, d, generator=g) * 2).to(dtype).to(device)
    v = torch.randn(d, generator=g).to(device)
    pos = torch.randint(s // 2, s, (b,), generator=g).to(device)
    alpha = 0.2

    rotate = STEER_MODES["rotate"]

    # correctness first
    ref = reference.steer_reference(h0, v, alpha, positions=pos).float()
    contenders = {
        "baseline": lambda h: eager_steer(h, v, pos, alpha),
        "ours": lambda h: ops.steer_(h, v, alpha, positions=pos),
        "hook": lambda h: ops.steer_unchecked_(h, v, alpha, rotate, pos, None),
    }
    for name, fn in contenders.items():
        h = h0.clone()
        fn(h)
        err = float((h.float() - ref).abs().max() / ref.abs().max())
        if err > TOL[dtype]:
            raise SystemExit(f"{name} is off by {err:.2e} (relative): not timing")

    h_ours, h_base, h_hook = h0.clone(), h0.clone(), h0.clone()
    inner = 100 if device == "cuda" else 1
    with torch.inference_mode():
        t = interleaved(
            {
                "baseline": lambda: eager_steer(h_base, v, pos, alpha),
                "ours": lambda: ops.steer_(h_ours, v, alpha, positions=pos),
                "hook": lambda: ops.steer_unchecked_(h_hook, v, alpha, rotate, pos, None),
            },
            device,
            repeats=args.repeats,
            warmup=args.warmup,
            inner=inner,
        )
    tb, to, th = (t[k]["median_s"] for k in ("baseline", "ours", "hook"))
    return {
        "B": b,
        "S": s,
        "d": d,
        "dtype": str(dtype).removeprefix("torch."),
        "baseline_us": tb * 1e6,
        "ours_us": to * 1e6,
        "speedup": tb / to,
        "hook_us": th * 1e6,
        "hook_speedup": tb / th,
        "timings": t,
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=2000, warmup=200)
    if args.device == "cuda":
        args.repeats = min(args.repeats, 200)
    b, s, d = (4, 16, 256) if args.quick else (16, 128, 2048)
    rows = [
        run_case(b, s, d, dtype, args.device, args)
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
    ]
    print_table(
        rows,
        ["B", "S", "d", "dtype", "baseline_us", "ours_us", "speedup", "hook_us", "hook_speedup"],
    )
    suffix = ("-quick" if args.quick else "") + (f"-t{args.threads}" if args.threads else "")
    write_json(
        f"steer-{args.device}{suffix}",
        {"benchmark": "steer", "machine": machine(args.device), "results": rows},
        args.out,
    )


if __name__ == "__main__":
    main()
