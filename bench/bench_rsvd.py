"""Top-k eigenpairs of a Gram matrix: ``ops.eigh_topk`` vs ``torch.linalg.eigh`` and
``torch.svd_lowrank``.

The matrix (default 4096 x 4096, fp32) is the Gram XᵀX / n of n random rows whose covariance
has a power-law spectrum (λ_i ∝ 1/i) with a few stronger directions, rotated at random, as
residual-stream activations look. Accuracy is the largest relative error of the top-k
eigenvalues against a float64 ``eigvalsh`` of the same matrix; the pairs' residual
max_i ‖G v_i - λ_i v_i‖ / λ_1 is reported too.

1. Accuracy sweep: for each oversampling p, the smallest number of power iterations that
   brings the eigenvalue error to the target (default 1e-3), for ``eigh_topk`` (n_iter: one
   product with G each) and for ``torch.svd_lowrank`` (niter: two products each, as it
   alternates G and Gᵀ).
2. Timing, interleaved in one process: full ``torch.linalg.eigh``, every configuration found
   in 1, and ``eigh_topk`` with its defaults. Each result is checked against the reference
   (the check is also the warm-up) before its time counts. Median of the rounds.

Writes JSON (default bench/results/rsvd-<device>.json).

    python bench/bench_rsvd.py [--device cpu|cuda] [--d 4096] [--k 64] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, parse_args, print_table, write_json  # noqa: E402

from unlock_fast import ops  # noqa: E402

Result = tuple[torch.Tensor, torch.Tensor]  # (eigenvalues [k] descending, vectors [d, k])


def residual_gram(d: int, n: int, device: str, seed: int = 0) -> torch.Tensor:
    """XᵀX / n for n rows x = R (σ ⊙ z), z standard normal, σ_i² ∝ 1/i with four stronger
    directions, R a random rotation. Float32."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(1, d + 1, dtype=torch.float32)
    sigma = i.rsqrt()
    sigma[:4] *= torch.tensor([4.5, 3.0, 2.2, 1.7])  # eigenvalues 20x, 9x, 5x, 3x
    z = torch.randn(n, d, generator=g).to(device)
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g).to(device))
    x = (z * sigma.to(device)) @ rot.T
    gram = x.T @ x / n
    return (gram + gram.T) / 2


def eig_error(values: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest relative error of the eigenvalues."""
    return ((values.double() - ref).abs() / ref.abs()).max().item()


def pair_residual(gram: torch.Tensor, res: Result) -> float:
    values, vectors = res
    r = gram @ vectors - vectors * values
    return (r.norm(dim=0).max() / values[0]).item()


def run_ours(gram: torch.Tensor, k: int, p: int, q: int) -> Result:
    return ops.eigh_topk(gram, k, oversample=p, n_iter=q, seed=0)


def run_lowrank(gram: torch.Tensor, k: int, p: int, niter: int) -> Result:
    torch.manual_seed(0)  # svd_lowrank draws its test matrix from the global generator
    u, s, _ = torch.svd_lowrank(gram, q=k + p, niter=niter)
    return s[:k], u[:, :k]


def run_eigh(gram: torch.Tensor, k: int) -> Result:
    values, vectors = torch.linalg.eigh(gram)
    return values.flip(0)[:k], vectors.flip(1)[:, :k]


def dense_path(d: int, k: int, p: int, q: int, device: str) -> bool:
    """Whether eigh_topk takes its dense path for these arguments."""
    return ops.core.core_module().rsvd_plan(True, d, d, k, p, q, 0, device == "cuda")[1]


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--n", type=int, default=0, help="rows of X (default: d)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--target", type=float, default=1e-3, help="eigenvalue relative error")
    p.add_argument("--oversample", type=int, nargs="+", default=[10, 32, 64, 128])
    p.add_argument("--max-iter", type=int, default=12, help="most n_iter in the sweep")


def parse() -> argparse.Namespace:
    args = parse_args(__doc__.split("\n\n")[0], repeats=3, extra=_options)
    if args.quick:
        args.d, args.k = 512, 32
    return args


def main() -> None:
    args = parse()
    d, k, target, device = args.d, args.k, args.target, args.device
    n = args.n or d

    t0 = time.perf_counter()
    gram = residual_gram(d, n, device)
    ref = torch.linalg.eigvalsh(gram.double()).flip(0)[:k]
    setup = time.perf_counter() - t0
    # fp32 cannot resolve the small eigenvalues of a badly conditioned Gram to 1e-3 on every
    # device (cuSOLVER's full solver misses by ~3e-3 at d = 8192): the target is never below
    # twice what the full fp32 eigh (with vectors, as here) of this device reaches.
    floor = eig_error(torch.linalg.eigh(gram)[0].flip(0)[:k], ref)
    if 2 * floor > target:
        print(f"target {target:g} is below this device's fp32 floor {floor:.1e}: using twice it")
        target = 2 * floor
    spread = f"λ_1 = {ref[0]:.3g}, λ_{k} = {ref[-1]:.3g}, λ_1/λ_{k} = {ref[0] / ref[-1]:.0f}"
    print(f"Gram {d}x{d} from {n} rows on {device}; {spread} (setup {setup:.0f} s)")

    # -- 1. accuracy sweep --------------------------------------------------------------------
    sweep: list[dict] = []
    chosen: dict[str, Callable[[], Result]] = {}
    for method, runner, max_iter, products in (
        ("eigh_topk", run_ours, args.max_iter, lambda q: q + 2),
        ("svd_lowrank", run_lowrank, args.max_iter // 2, lambda q: 2 * q + 2),
    ):
        for p in args.oversample:
            if k + p > d:
                continue
            for q in range(max_iter + 1):
                err = eig_error(runner(gram, k, p, q)[0], ref)
                sweep.append({"method": method, "oversample": p, "iters": q, "eig_error": err})
                if err <= target:
                    name = f"{method} p={p} iters={q}"
                    cost = f"{products(q)} products of width {k + p}"
                    if method == "eigh_topk" and dense_path(d, k, p, q, device):
                        name += " (dense)"
                        cost = "dense path"
                    chosen[name] = lambda r=runner, p=p, q=q: r(gram, k, p, q)
                    print(f"  {name:32s} error {err:.1e}  ({cost})")
                    break
            else:
                print(f"  {method} p={p}: error {err:.1e} > target after {max_iter} iterations")
    chosen["eigh_topk defaults (p=10 iters=4)"] = lambda: run_ours(gram, k, 10, 4)
    chosen["torch.linalg.eigh (full)"] = lambda: run_eigh(gram, k)

    # -- 2. check every contender (also the warm-up), then time them interleaved ----------------
    checks: dict[str, dict[str, float]] = {}
    for name, fn in chosen.items():
        res = fn()
        checks[name] = {"eig_error": eig_error(res[0], ref), "residual": pair_residual(gram, res)}
        if not name.startswith("eigh_topk defaults") and checks[name]["eig_error"] > target:
            raise SystemExit(f"{name}: eigenvalue error {checks[name]['eig_error']:.2e}")
    timed = interleaved(chosen, device, repeats=args.repeats, warmup=0)

    # -- report ---------------------------------------------------------------------------------
    med = {name: t["median_s"] for name, t in timed.items()}
    eigh_time = med["torch.linalg.eigh (full)"]
    ours = {m: t for m, t in med.items() if m.startswith("eigh_topk p=")}
    peers = {m: t for m, t in med.items() if m.startswith("svd_lowrank")}
    best_ours = min(ours, key=ours.__getitem__) if ours else None
    best_peer = min(peers, key=peers.__getitem__) if peers else None
    rows = [
        {
            "configuration": name,
            "median_s": t,
            "eig_error": checks[name]["eig_error"],
            "residual": checks[name]["residual"],
            "vs_eigh": eigh_time / t,
        }
        for name, t in sorted(med.items(), key=lambda kv: kv[1])
    ]
    print()
    print_table(rows, ["configuration", "median_s", "eig_error", "residual", "vs_eigh"])
    summary: dict[str, float] = {}
    if best_ours:
        summary["speedup_vs_eigh"] = eigh_time / med[best_ours]
        print(f"\nfastest eigh_topk at error <= {target:g}: {best_ours}, ", end="")
        print(f"{summary['speedup_vs_eigh']:.1f}x faster than full eigh (target >= 10x)")
    if best_ours and best_peer:
        summary["speedup_vs_svd_lowrank"] = med[best_peer] / med[best_ours]
        print(f"fastest svd_lowrank at the same error: {best_peer}; ", end="")
        print(f"eigh_topk is {summary['speedup_vs_svd_lowrank']:.2f}x its speed (target >= 1x)")
    elif best_ours:
        print("svd_lowrank reached the target with no configuration of the sweep")

    payload = {
        "benchmark": "rsvd",
        "machine": machine(device),
        "d": d,
        "n": n,
        "k": k,
        "target_eig_error": target,
        "reference_top": [ref[0].item(), ref[-1].item()],
        "sweep": sweep,
        "timed": {name: {**timed[name], **checks[name]} for name in timed},
        "fastest_eigh_topk": best_ours,
        "fastest_svd_lowrank": best_peer,
        **summary,
    }
    write_json(f"rsvd-{device}", payload, args.out)


if __name__ == "__main__":
    main()
