"""One lockstep pass against the two collectors run one after the other.

The chain-of-thought transfer needs the Source on the locked prompts twice over: for the
direction (against the unlocked prompts) and for the alignment (against the Target).
``collect_transfer`` runs that pass once and feeds both accumulators. This benchmark times
it against ``extract_direction`` followed by ``collect_alignment_stats`` on random-weight
llama models (Source 8 layers x 512, Target 6 layers x 384 by default), after checking that
both give the same direction and the same Gram matrices, and counts the Source's forward
passes.

    python bench/bench_transfer.py [--prompts 64] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import torch
from bench_pipeline import build, problems
from common import interleaved, machine, parse_args, print_table, write_json

import unlock_fast as uf
from unlock_fast.layers import decoder_layers


def _extra(p) -> None:
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=5, warmup=1, extra=_extra)
    n = 16 if args.quick else args.prompts
    src, stok = build(512, 8, 2000)
    tgt, ttok = build(384, 6, 1500, seed=1)
    locked = problems(n, seed=2)
    unlocked = [p + "Answer: Let's think step by step." for p in locked]
    common = {"batch_size": args.batch_size, "progress": False}

    def separate():
        d = uf.extract_direction(src, stok, locked, unlocked, **common)
        return d, uf.collect_alignment_stats(src, stok, tgt, ttok, locked, **common)

    def one_pass():
        return uf.collect_transfer(src, stok, tgt, ttok, locked, unlocked, **common)

    calls: list[int] = []
    hook = decoder_layers(src)[0].register_forward_hook(lambda *_: calls.append(1))
    (d1, s1), passes_separate = separate(), len(calls)
    calls.clear()
    (d2, s2), passes_one = one_pass(), len(calls)
    hook.remove()
    torch.testing.assert_close(d2.vectors, d1.vectors, atol=1e-6, rtol=1e-5)
    for a, b in zip(s2.moments, s1.moments, strict=True):
        for which in ("xx", "yy", "xy"):
            torch.testing.assert_close(a.gram(which), b.gram(which), atol=1e-4, rtol=1e-5)

    times = interleaved(
        {"separate": separate, "one_pass": one_pass},
        "cpu",
        repeats=args.repeats,
        warmup=args.warmup,
    )
    ratio = times["separate"]["median_s"] / times["one_pass"]["median_s"]
    rows = [
        {"collector": "extract_direction + collect_alignment_stats",
         "source_batches": passes_separate, "median_s": times["separate"]["median_s"]},
        {"collector": "collect_transfer", "source_batches": passes_one,
         "median_s": times["one_pass"]["median_s"]},
    ]  # fmt: skip
    print_table(rows, ["collector", "source_batches", "median_s"])
    print(f"one pass is {ratio:.2f}x the two collectors")
    write_json(
        "transfer",
        {
            "machine": machine("cpu"),
            "prompts": n,
            "batch_size": args.batch_size,
            "source_forward_batches": {"separate": passes_separate, "one_pass": passes_one},
            "times": times,
            "speedup": ratio,
            "checked": "direction and Grams equal to the two collectors",
        },
        args.out,
    )


if __name__ == "__main__":
    main()
