"""Where the dense eigensolver stops paying: ``eigh_topk`` forced dense vs forced randomized.

``eigh_topk`` (method "auto") runs a dense top-k eigensolver instead of the randomized one
when ``(n_iter + 2) * l >= factor * d`` (l = k + oversample; csrc/include/unlock/rsvd.h,
``kRsvdCpuDenseFactor`` / ``kRsvdCudaDenseFactor``). This benchmark measures the factor
instead of guessing it: for each k and d it times the compiled core with the method forced
(dense: ``RsvdMethod::kExact``; randomized: ``kRandomized``), interleaved, on the Gram of
``bench_rsvd.residual_gram`` (power-law spectrum), after checking both against a float64
``eigvalsh``; ``torch.linalg.eigh`` + slicing is timed alongside as the baseline (up to
``--torch-max-d``). For each k
it reports the crossover d (the smallest d from which the randomized solver is faster at
every larger d measured) and the factor that would put the rule's switch there:
``factor = (n_iter + 2) * l / d_cross``.

Writes JSON (default bench/results/eigh-threshold-<device>.json).

    python bench/bench_eigh_threshold.py [--device cpu|cuda] [--d 512 1024 ...] [--k 16 64 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rsvd import residual_gram  # noqa: E402
from common import interleaved, machine, parse_args, print_table, write_json  # noqa: E402

from unlock_fast.ops import core  # noqa: E402

RANDOMIZED, EXACT = 1, 2  # RsvdMethod codes of csrc/include/unlock/rsvd.h
# the factors the auto rule uses today (rsvd.h)
CURRENT_FACTOR = {"cpu": 1.0, "cuda": 4.0}


def eigh_forced(
    a: torch.Tensor, k: int, method: int, *, oversample: int, n_iter: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.eigh_topk`` with the method forced (same calls into the core, same allocations)."""
    d = a.shape[0]
    values = torch.empty(k, dtype=a.dtype, device=a.device)
    vectors = torch.empty(d, k, dtype=a.dtype, device=a.device)
    code = core.dtype_code(a)
    mod = core.core_module()
    sizes = (d, k, oversample, n_iter)
    if a.device.type == "cpu":
        nbytes = mod.rsvd_eigh_workspace_cpu(*sizes, code, method)
        work = torch.empty(nbytes, dtype=torch.uint8)
        mod.rsvd_eigh_cpu(
            a.data_ptr(), *sizes, seed, code, method,
            values.data_ptr(), vectors.data_ptr(), work.data_ptr(), nbytes,
        )  # fmt: skip
    else:
        index = a.device.index if a.device.index is not None else torch.cuda.current_device()
        nbytes = mod.rsvd_eigh_workspace_cuda(*sizes, code, method, index)
        work = torch.empty(nbytes, dtype=torch.uint8, device=a.device)
        mod.rsvd_eigh_cuda(
            a.data_ptr(), *sizes, seed, code, method,
            values.data_ptr(), vectors.data_ptr(), work.data_ptr(), nbytes,
            index, core.cuda_stream(a.device),
        )  # fmt: skip
    return values, vectors


def eig_error(values: torch.Tensor, ref: torch.Tensor) -> float:
    return ((values.double().cpu() - ref).abs() / ref.abs()).max().item()


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d", type=int, nargs="+", default=None, help="matrix sizes")
    p.add_argument("--k", type=int, nargs="+", default=None, help="eigenpairs wanted")
    p.add_argument("--oversample", type=int, default=10)
    p.add_argument("--n-iter", type=int, default=4)
    p.add_argument(
        "--torch-max-d", type=int, default=4096, help="largest d at which torch.linalg.eigh runs"
    )


def crossover(points: list[dict[str, Any]]) -> int | None:
    """Smallest d from which the randomized solver wins at every larger d measured."""
    cross = None
    for p in sorted(points, key=lambda p: -p["d"]):
        if p["randomized_s"] < p["dense_s"]:
            cross = p["d"]
        else:
            break
    return cross


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=5, warmup=1, extra=_options)
    dev = args.device
    if args.d is None:
        args.d = (
            [64, 128, 256, 512]
            if args.quick
            else ([256, 512, 1024, 2048, 4096, 8192] if dev == "cuda" else [256, 512, 1024, 2048])
        )
    if args.k is None:
        args.k = [8, 32] if args.quick else [16, 64, 256]
    os_, it = args.oversample, args.n_iter
    rows: list[dict[str, Any]] = []
    for d in args.d:
        gram = residual_gram(d, d, dev)
        ref = torch.linalg.eigvalsh(gram.double()).flip(0).cpu()
        for k in args.k:
            if 2 * k > d:
                continue
            fns = {
                "dense": lambda g=gram, k=k: eigh_forced(g, k, EXACT, oversample=os_, n_iter=it),
                "randomized": lambda g=gram, k=k: eigh_forced(
                    g, k, RANDOMIZED, oversample=os_, n_iter=it
                ),
            }
            if d <= args.torch_max_d:
                fns["torch_eigh"] = lambda g=gram, k=k: torch.linalg.eigh(g)[1][:, -k:]
            values = fns["dense"]()[0].double().cpu()
            err_dense = eig_error(values, ref[:k])
            err_rand = eig_error(fns["randomized"]()[0], ref[:k])
            # A dense symmetric solver is backward stable: |Δλ| ≤ c·eps·λ_1 for every
            # eigenvalue, which is all the relative error of the small ones can rest on
            # (cuSOLVER's fp32 syevd: 4e-3 relative at d = 512, k = 256, and 5e-7 of λ_1).
            normwise = ((values - ref[:k]).abs().max() / ref[0]).item()
            if normwise > 100 * torch.finfo(gram.dtype).eps:
                raise AssertionError(
                    f"dense top-{k} of d={d}: eigenvalue error {normwise:.2e} of λ_1"
                )
            times = interleaved(fns, dev, repeats=args.repeats, warmup=args.warmup)
            l_ = min(k + os_, d)
            rows.append(
                {
                    "d": d,
                    "k": k,
                    "l": l_,
                    "dense_s": times["dense"]["median_s"],
                    "randomized_s": times["randomized"]["median_s"],
                    "torch_eigh_s": times.get("torch_eigh", {}).get("median_s"),
                    "dense_over_randomized": times["dense"]["median_s"]
                    / times["randomized"]["median_s"],
                    "err_dense": err_dense,
                    "err_randomized": err_rand,
                    "auto_picks": "dense"
                    if core.core_module().rsvd_plan(True, d, d, k, os_, it, 0, dev == "cuda")[1]
                    else "randomized",
                }
            )
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, ["d", "k", "dense_s", "randomized_s", "torch_eigh_s", "auto_picks"])
    summary = []
    for k in args.k:
        pts = [r for r in rows if r["k"] == k]
        if not pts:
            continue
        d_cross = crossover(pts)
        l_ = k + os_
        summary.append(
            {
                "k": k,
                "crossover_d": d_cross,
                "measured_factor": (it + 2) * l_ / d_cross if d_cross else None,
                "current_factor": CURRENT_FACTOR[dev],
                "current_switch_d": (it + 2) * l_ / CURRENT_FACTOR[dev],
            }
        )
    print()
    print_table(summary, list(summary[0]) if summary else [])
    write_json(
        f"eigh-threshold-{dev}",
        {
            "machine": machine(dev),
            "oversample": os_,
            "n_iter": it,
            "dtype": "float32",
            "rule": "dense when (n_iter + 2) * l >= factor * d",
            "points": rows,
            "crossover": summary,
            "checked": "dense eigenvalues within 1e-3 of float64 eigvalsh; randomized error "
            "reported (err_randomized)",
        },
        args.out,
    )


if __name__ == "__main__":
    main()
