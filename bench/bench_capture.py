"""End to end: capture throughput, and a whole transfer as N and d grow.

1. Capture, interleaved in one process on a random-weight llama (default 8 layers x 512,
   64 prompts, batch 8): our capture of the last-token rows of every layer
   (``iter_activations``: hooks on the decoder blocks, stopping after the deepest) against
   a plain forward of the same batches through the decoder stack (``get_decoder()``: every
   block, no LM head, which the capture skips too; the hooks' overhead, target <= 5%) and a
   forward with ``output_hidden_states=True`` followed by the same gather (the official
   release's way). Checked first: the captured rows equal ``hidden_states[l + 1]`` at the
   last real token (the last layer's after the model's final norm, which HF applies).
2. A whole transfer (``collect_transfer``, ``fit``, ``Alignment.transfer``) as the number
   of prompts N grows (time per prompt should stay flat) and as the hidden size d grows
   (Source 8 layers x d, Target 6 layers x d), interleaved, medians, with the split
   between collection and fit + transfer.

Writes JSON (default bench/results/capture.json).

    python bench/bench_capture.py [--prompts 64] [--repeats 5] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import build, problems  # noqa: E402
from common import interleaved, machine, parse_args, print_table, write_json  # noqa: E402

import unlock_fast as uf  # noqa: E402
from unlock_fast.capture import iter_activations  # noqa: E402

UNLOCK = "Answer: Let's think step by step."


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--sizes-n", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--sizes-d", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--rank", type=int, default=64)


def _encode(tok: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded batch with the position ids the capture uses."""
    enc = tok(prompts, padding=True, return_tensors="pt")
    mask = enc["attention_mask"]
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": mask,
        "position_ids": (mask.cumsum(1) - 1).clamp_min(0),
        "use_cache": False,
    }


def _last(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(1) - 1


def capture_section(args: argparse.Namespace, n: int, hidden: int, layers: int) -> dict:
    model, tok = build(hidden, layers, 2000)
    prompts = problems(n, seed=3)
    bs = args.batch_size
    batches = [prompts[i : i + bs] for i in range(0, n, bs)]
    every = list(range(layers))
    decoder = model.get_decoder()  # every block, without the LM head the capture skips too

    def ours(batch: list[str]) -> torch.Tensor:
        (b,) = iter_activations(model, tok, batch, every, batches=[list(range(len(batch)))])
        return torch.stack([b.rows[i] for i in every])

    def plain(batch: list[str]) -> None:
        with torch.inference_mode():
            decoder(**_encode(tok, batch))

    def hidden_states(batch: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            enc = _encode(tok, batch)
            hs = model(**enc, output_hidden_states=True).hidden_states
            rows, last = torch.arange(len(batch)), _last(enc["attention_mask"])
            return torch.stack([h[rows, last] for h in hs[1:]])

    # check: every layer's rows equal hidden_states[l + 1] at the last real token
    with torch.inference_mode():
        for batch in batches:
            g, r = ours(batch), hidden_states(batch)
            torch.testing.assert_close(g[:-1], r[:-1], atol=0, rtol=0)
            if not torch.equal(g[-1], r[-1]):  # HF's last hidden state is after the norm
                torch.testing.assert_close(model.model.norm(g[-1]), r[-1], atol=1e-5, rtol=1e-5)
    fns: dict[str, Callable[[list[str]], Any]] = {
        "plain_forward": plain,
        "ours": ours,
        "output_hidden_states": hidden_states,
    }
    times = paired(fns, batches, repeats=args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {
        k: statistics.median(t / p for t, p in zip(v, times["plain_forward"], strict=True))
        for k, v in times.items()
    }
    rows = [
        {"method": k, "s_per_pass": v, "prompts_per_s": n / v, "vs_plain": ratio[k]}
        for k, v in med.items()
    ]
    print_table(rows, ["method", "s_per_pass", "prompts_per_s", "vs_plain"])
    overhead = ratio["ours"] - 1
    print(f"capture overhead over a plain forward: {overhead:+.1%} (target <= +5%)")
    return {
        "model": f"llama {layers} layers x {hidden}, random weights",
        "prompts": n,
        "batch_size": bs,
        "layers_captured": layers,
        "rounds": args.repeats,
        "s_per_pass_median": med,
        "vs_plain_median_of_round_ratios": ratio,
        "overhead_vs_plain": overhead,
        "hidden_states_over_ours": statistics.median(
            h / o for h, o in zip(times["output_hidden_states"], times["ours"], strict=True)
        ),
        "checked": "rows equal hidden_states[l + 1] at the last real token (last layer: "
        "after the final norm)",
    }


def paired(
    fns: dict[str, Callable[[list[str]], Any]], batches: list[list[str]], *, repeats: int
) -> dict[str, list[float]]:
    """Seconds per pass over all ``batches``, per round. Interleaved batch by batch (every
    contender runs batch b, in a rotating order, before any runs batch b + 1), so a load
    spike on a shared machine falls on all of them alike; one warm-up pass first."""
    names = list(fns)
    for batch in batches:
        for fn in fns.values():
            fn(batch)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        acc = dict.fromkeys(names, 0.0)
        for j, batch in enumerate(batches):
            shift = (r + j) % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                fns[name](batch)
                acc[name] += time.perf_counter() - t0
        for name in names:
            out[name].append(acc[name])
    return out


class Transfer:
    """One whole transfer on fixed models; records the split of its last call."""

    def __init__(self, hidden: int, n: int, rank: int, batch_size: int) -> None:
        self.src, self.stok = build(hidden, 8, 2000)
        self.tgt, self.ttok = build(hidden, 6, 1500, seed=1)
        self.locked = problems(n, seed=2)
        self.unlocked = [p + UNLOCK for p in self.locked]
        self.rank, self.batch_size = min(rank, n), batch_size
        self.parts: dict[str, list[float]] = {"collect_s": [], "fit_transfer_s": []}

    def __call__(self) -> uf.SteeringKey:
        t0 = time.perf_counter()
        direction, stats = uf.collect_transfer(
            self.src, self.stok, self.tgt, self.ttok, self.locked, self.unlocked,
            batch_size=self.batch_size, progress=False,
        )  # fmt: skip
        t1 = time.perf_counter()
        key = stats.fit(rank=self.rank).transfer(direction)
        self.parts["collect_s"].append(t1 - t0)
        self.parts["fit_transfer_s"].append(time.perf_counter() - t1)
        return key


def _slope(xs: list[int], ts: list[float]) -> float:
    """Log-log slope of time against size (1 = linear)."""
    lx, lt = [math.log(x) for x in xs], [math.log(t) for t in ts]
    mx, mt = statistics.fmean(lx), statistics.fmean(lt)
    return sum((a - mx) * (b - mt) for a, b in zip(lx, lt, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def scaling(
    args: argparse.Namespace, label: str, runs: dict[int, Transfer]
) -> tuple[list[dict], dict[str, Any]]:
    fns: dict[str, Callable[[], Any]] = {f"{label}={s}": r for s, r in runs.items()}
    for r in runs.values():
        key = r()
        if not bool(torch.isfinite(key.vectors).all()):
            raise AssertionError(f"non-finite transferred key at {label}")
        r.parts = {k: [] for k in r.parts}
    times = interleaved(fns, "cpu", repeats=args.repeats, warmup=0)
    sizes = list(runs)
    med = [times[f"{label}={s}"]["median_s"] for s in sizes]
    rows = [
        {
            label: s,
            "median_s": t,
            "collect_s": statistics.median(runs[s].parts["collect_s"]),
            "fit_transfer_s": statistics.median(runs[s].parts["fit_transfer_s"]),
            "per_unit_vs_first": (t / s) / (med[0] / sizes[0]),
        }
        for s, t in zip(sizes, med, strict=True)
    ]
    print_table(rows, list(rows[0]))
    slope = _slope(sizes, med)
    print(f"time ~ {label}^{slope:.2f}")
    return rows, {"times": times, "loglog_slope": slope}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=5, warmup=1, extra=_options)
    if args.device != "cpu":
        raise SystemExit("bench_capture runs on the CPU")
    if args.quick:
        args.prompts, args.hidden, args.layers = 16, 256, 4
        args.sizes_n, args.sizes_d = [8, 16], [128, 256]
        args.repeats = min(args.repeats, 2)
    print(f"== capture: {args.layers} layers x {args.hidden}, {args.prompts} prompts")
    capture = capture_section(args, args.prompts, args.hidden, args.layers)
    print(f"== transfer vs N (d={args.hidden})")
    by_n = {n: Transfer(args.hidden, n, args.rank, args.batch_size) for n in args.sizes_n}
    n_rows, n_times = scaling(args, "N", by_n)
    n_fixed = min(args.sizes_n[-1], 32) if args.quick else 32
    print(f"== transfer vs d (N={n_fixed})")
    by_d = {d: Transfer(d, n_fixed, args.rank, args.batch_size) for d in args.sizes_d}
    d_rows, d_times = scaling(args, "d", by_d)
    write_json(
        "capture",
        {
            "machine": machine("cpu"),
            "capture": capture,
            "transfer_vs_n": {"hidden": args.hidden, "points": n_rows, **n_times},
            "transfer_vs_d": {"prompts": n_fixed, "points": d_rows, **d_times},
            "transfer": "collect_transfer + AlignmentStats.fit(rank) + Alignment.transfer; "
            "Source 8 layers x d, Target 6 layers x d",
        },
        args.out,
    )


if __name__ == "__main__":
    main()
