"""A dry run at the paper's shapes: Qwen1.5-14B -> Qwen1.5-7B widths, random weights.

Builds the two models from their published configurations (below) with ``--blocks`` decoder
blocks each (default 1: one layer pair), and for each N runs, through the public API,
``collect_transfer`` (direction + alignment statistics in one pass), ``AlignmentStats.fit``
at rank min(512, N) and ``Alignment.transfer``, then saves the statistics. Beside it, in the
same process and on the same rows, it runs:

- the official approach: all rows in memory (fp32), per-sample SVD of each side, the dense
  map T = V_sᵀ pinv(H_s V_sᵀ) (H_t V_tᵀ) V_t and r_t = v_s T;
- the Gram form: the same rows summed into float64 Grams from the start
  (``Moments(row_limit=0)``, what the statistics held before they could keep rows), and
  its fit.

Memory is the peak growth of the process's RSS over each step (sampled every 2 ms; the
process runs with a fixed mmap threshold so freed tensors leave the RSS), and on a GPU the
peak of CUDA's allocated bytes over the step. The transferred keys are compared (relative
difference of r_t) so every contender is checked against the others in the same run.

    python bench/bench_scale.py [--n 64 512 4096] [--blocks 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # freed tensors must leave the RSS
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from common import machine
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

import unlock_fast as uf
from unlock_fast.stats import Moments

# Published configurations (config.json of Qwen/Qwen1.5-14B and Qwen/Qwen1.5-7B).
QWEN15 = {
    "14B": {
        "hidden_size": 5120,
        "intermediate_size": 13696,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "num_hidden_layers": 40,
        "vocab_size": 152064,
    },
    "7B": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "num_hidden_layers": 32,
        "vocab_size": 151936,
    },
}
COMMON = {"max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6}
WORDS = 8192  # prompts draw from this many words (ids below every vocab)
RANK = 512


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, "think": 2} | {f"w{i}": 3 + i for i in range(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", padding_side="left"
    )


def build(name: str, blocks: int, vocab: int | None, device: str, seed: int) -> torch.nn.Module:
    spec = dict(QWEN15[name], num_hidden_layers=blocks)
    if vocab is not None:
        spec["vocab_size"] = vocab
    cfg = Qwen2Config(**spec, **COMMON, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.config._name_or_path = f"random/Qwen1.5-{name}-{blocks}-blocks"
    return model.eval()


def prompts(n: int, seed: int) -> list[str]:
    """n distinct one-token prompts: the statistics see n distinct rows, and the forward
    passes (the same for every contender) stay short."""
    if n > WORDS:
        raise ValueError(f"at most {WORDS} prompts, got {n}")
    g = torch.Generator().manual_seed(seed)
    return [f"w{i}" for i in torch.randperm(WORDS, generator=g)[:n].tolist()]


# ---------------------------------------------------------------------------- measuring


def rss_max() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def measured(device: str) -> Iterator[dict[str, float]]:
    """Seconds, peak RSS growth and (CUDA) peak allocated growth over the block, in MB."""
    gc.collect()
    out: dict[str, float] = {}
    base, peak, stop = rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        if device == "cuda":
            torch.cuda.synchronize()
        out["s"] = time.perf_counter() - t0
        stop.set()
        watcher.join()
        out["rss_peak_mb"] = (max(peak[0], rss()) - base) / 2**20
        out["rss_kept_mb"] = (rss() - base) / 2**20
        if device == "cuda":
            out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20


def best_of(repeats: int, device: str, fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """fn's result and the median time / largest memory of ``repeats`` measured calls."""
    runs, result = [], None
    for _ in range(repeats):
        result = None
        gc.collect()
        with measured(device) as m:
            result = fn()
        runs.append(m)
    agg = {k: max(r[k] for r in runs) for k in runs[0] if k != "s"}
    agg["s"] = statistics.median(r["s"] for r in runs)
    return result, agg


# ---------------------------------------------------------------------------- contenders


def official_fit(hs: torch.Tensor, ht: torch.Tensor, k: int) -> torch.Tensor:
    """METHOD.md §3 as the official release computes it: fp32, per-sample SVDs, dense T."""
    vs = torch.linalg.svd(hs, full_matrices=False).Vh[:k]
    vt = torch.linalg.svd(ht, full_matrices=False).Vh[:k]
    m = torch.linalg.pinv(hs @ vs.T) @ (ht @ vt.T)
    return vs.T @ m @ vt


def gram_stats(stats: uf.AlignmentStats, hs: torch.Tensor, ht: torch.Tensor) -> Any:
    """The same rows summed into float64 Grams from the start, 8 at a time."""
    m = Moments(hs.shape[1], ht.shape[1], device=hs.device, dtype=torch.float64)
    for a in range(0, hs.shape[0], 8):
        m.update(hs[a : a + 8], ht[a : a + 8])
    return uf.AlignmentStats(
        stats.layer_map, [m], stats.source, stats.target, num_prompts=stats.num_prompts
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def run_n(n: int, src: Any, tgt: Any, tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    dev = args.device
    locked = prompts(n, seed=n)
    unlocked = [p + " think" for p in locked]
    k = min(RANK, n)
    row: dict[str, Any] = {"n": n, "rank": k}

    with measured(dev) as m:
        direction, stats = uf.collect_transfer(
            src, tok, tgt, tok, locked, unlocked, batch_size=args.batch_size,
            device=dev, progress=False,
        )  # fmt: skip
    row["collect"] = m
    mom = stats.moments[0]
    row["form"] = mom.form
    row["stats_mb"] = sum(x.nbytes for x in stats.moments) / 2**20
    with tempfile.TemporaryDirectory() as d:
        stats.save_pretrained(d)
        row["saved_mb"] = sum(f.stat().st_size for f in Path(d).iterdir()) / 2**20

    reps = args.repeats if n <= 512 else 1
    fit = best_of(reps, dev, lambda: stats.fit(rank=k))
    row["fit"] = fit[1]
    key, row["transfer"] = best_of(reps, dev, lambda: fit[0].transfer(direction))
    ours = key.vectors[0]
    fit = (None, fit[1])

    # the official approach: every row in memory, fp32
    state = mom.state_dict()
    with measured(dev) as m:
        rows = (
            state["rows_x"].to(dev, torch.float32).clone(),
            state["rows_y"].to(dev, torch.float32).clone(),
        )
    state.clear()
    row["official_rows"] = m
    row["official_rows_mb"] = sum(t.numel() * 4 for t in rows) / 2**20
    v = direction.vectors[direction.layers.index(stats.layer_map[0][0])].to(dev, torch.float32)
    theirs, row["official_fit"] = best_of(reps, dev, lambda: v @ official_fit(rows[0], rows[1], k))
    row["ours_vs_official"] = rel(ours, theirs)

    # the Gram form on the same rows
    if not args.skip_gram:
        with measured(dev) as m:
            gstats = gram_stats(stats, *rows)
        row["gram_collect"] = m
        row["gram_stats_mb"] = gstats.moments[0].nbytes / 2**20
        with tempfile.TemporaryDirectory() as d:
            gstats.save_pretrained(d)
            row["gram_saved_mb"] = sum(f.stat().st_size for f in Path(d).iterdir()) / 2**20
        galign, row["gram_fit"] = best_of(1, dev, lambda: gstats.fit(rank=k))
        row["gram_vs_rows"] = rel(galign.transfer(direction).vectors[0], ours)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[64, 512, 4096])
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=None, help="default: the published ones")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="fits up to N = 512: median of")
    ap.add_argument("--skip-gram", action="store_true", help="no Gram-form comparison")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = tokenizer()
    t0 = time.perf_counter()
    src = build("14B", args.blocks, args.vocab, args.device, seed=0)
    tgt = build("7B", args.blocks, args.vocab, args.device, seed=1)
    print(f"built the models in {time.perf_counter() - t0:.0f} s; RSS {rss() / 2**30:.1f} GiB")
    with torch.no_grad():  # warm-up: one-time allocations stay out of the first row
        w = prompts(8, seed=1)
        d, st = uf.collect_transfer(src, tok, tgt, tok, w, [p + " think" for p in w],
                                    device=args.device, progress=False)  # fmt: skip
        st.fit(rank=8).transfer(d)
    rows = []
    for n in args.n:
        with torch.no_grad():
            r = run_n(n, src, tgt, tok, args)
        rows.append(r)
        print(json.dumps(r), flush=True)
    wall = time.perf_counter() - t0
    report = {
        "wall_s": wall,
        "process_max_rss_gib": rss_max() / 2**30,
        "benchmark": "scale",
        "machine": machine(args.device),
        "models": {"source": QWEN15["14B"], "target": QWEN15["7B"], "common": COMMON},
        "blocks": args.blocks,
        "vocab": args.vocab or "published",
        "rows": rows,
    }
    name = f"scale-{args.device}.json"
    out = args.out or Path(__file__).resolve().parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
