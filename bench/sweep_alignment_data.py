"""How the transferred key depends on the alignment's corpus size and rank, without generation.

For a Source -> Target pair (default the demo's SmolLM2-135M-Instruct -> Gemma-3-270M) and two
behaviours, the ocean topic and chain of thought, each model's own direction is extracted from
the behaviour's train items (unlocked minus locked prompt). The alignment is fitted on nested
prefixes of the generic corpus (on-topic sentences left out), streamed chunk by chunk into one
set of statistics (each new chunk merged into the previous ones), and at each size N and each
rank r <= N the Source direction is sent through the map. The key's per-layer cosine with the
Target's own direction is tested against random Source directions sent through the same map.
The fits on the behaviour's locked prompts (the paper) and on its locked and unlocked prompts
(a ceiling, not a transfer) are the reference points. The run checks its answer: the
statistics hold exactly N rows, the largest-N fit from merged chunks matches a fit of the
same corpus collected in one pass, and the random draws are the test's own.

    python bench/sweep_alignment_data.py --threads 1 [--sizes 256 1024 2048 4096]
        [--ranks 32 64 128 256 512] [--source smollm2-135m-instruct --target gemma-3-270m]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import machine, parse_args, print_table, write_json
from torch import nn

import unlock_fast as uf
from unlock_fast.artifacts.data import data_record
from unlock_fast.corpus import available_sentences, corpus_hash, generic_corpus
from unlock_fast.evaluation.null_keys import random_cosines, representational_null

EVIDENCE = Path(__file__).resolve().parent.parent / "evidence" / "alignment-data"
SIZES = (256, 1024, 2048, 4096)
RANKS = (32, 64, 128, 256, 512)
COLUMNS = ["behaviour", "data", "N", "rank", "k", "mean_cos", "band_hi", "p_mean", "above",
           "max_p", "binom_p", "r2"]  # fmt: skip


@dataclass
class Behaviour:
    """A prompt contrast on train items, and held-out items for the R² of the map.

    ``source_*`` and ``target_*`` are each model's rendering of the same items."""

    name: str
    source_locked: list[str]
    source_unlocked: list[str]
    target_locked: list[str]
    target_unlocked: list[str]
    heldout_source: list[str]
    heldout_target: list[str]


def topic_behaviour() -> Behaviour:
    """The ocean topic: the train split of the pre-registered items, both forms; held out:
    the held-out split, both forms (the test split is never read)."""
    from unlock_fast.demo.topic_items import OCEAN, prompts, topic_splits

    splits = topic_splits({"train": 64, "heldout": 32, "test": 200}, seed=0)
    locked, unlocked = prompts(splits["train"]), prompts(splits["train"], OCEAN)
    heldout = prompts(splits["heldout"]) + prompts(splits["heldout"], OCEAN)
    return Behaviour("topic", locked, unlocked, locked, unlocked, heldout, heldout)


def cot_behaviour(source_tokenizer: Any, target_tokenizer: Any) -> Behaviour:
    """Chain of thought as the demo builds it: its train problems, direct vs CoT prompt, each
    model with its own prompt form; held out: the demo's held-out problems, both forms."""
    from unlock_fast.demo.config import DEFAULTS as D
    from unlock_fast.evaluation.conditions import Runner
    from unlock_fast.evaluation.problems import problem_splits

    splits = problem_splits(
        {"train": D.n_train, "heldout": D.n_heldout, "test": D.n_test}, seed=D.seed
    )
    src = Runner(nn.Identity(), source_tokenizer, D.source_chat)
    tgt = Runner(nn.Identity(), target_tokenizer, D.target_chat)
    train, held = splits["train"], splits["heldout"]
    return Behaviour(
        "cot", src.prompts(train), src.prompts(train, "cot"), tgt.prompts(train),
        tgt.prompts(train, "cot"), src.prompts(held) + src.prompts(held, "cot"),
        tgt.prompts(held) + tgt.prompts(held, "cot"),
    )  # fmt: skip


def corpus_texts(n: int) -> tuple[list[str], dict[str, Any]]:
    """The first ``n`` sentences of the generic corpus (seed 0) with no ocean-topic word: a
    prefix of one fixed order, so smaller sizes are nested in larger ones."""
    from unlock_fast.demo.topic_items import on_topic

    ask = n
    while True:
        ask = min(ask + max(64, n // 16), available_sentences())
        pool = generic_corpus(ask, seed=0)
        kept = [t for t in pool if not on_topic(t)]
        if len(kept) >= n or ask == available_sentences():
            break
    if len(kept) < n:
        raise ValueError(f"the generic corpus has only {len(kept)} sentences off the topic")
    texts = kept[:n]
    read = pool.index(texts[-1]) + 1
    return texts, {
        "source": f"generic_corpus(n={read}, seed=0) without on-topic sentences",
        "read": read,
        "dropped_on_topic": read - n,
    }


Log = Callable[[str], None]


def _collect(models: tuple, prompts: list[str], target_prompts: list[str], **kw: Any):
    return uf.collect_alignment_stats(*models, prompts, target_prompts=target_prompts, **kw)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def evaluate_fit(
    alignment: uf.Alignment,
    direction: uf.Direction,
    own: uf.Direction,
    heldout: uf.AlignmentStats,
    *,
    num_random: int,
    seed: int,
) -> dict[str, Any]:
    """The key of ``direction`` through ``alignment`` against the Target's ``own`` direction
    and ``num_random`` random Source directions through the same map."""
    key = alignment.transfer(direction)
    rn = representational_null(key, own, alignment=alignment, num_random=num_random, seed=seed)
    test = rn.tests["random"]
    draws = random_cosines(alignment, own, rn.layers, num=num_random, seed=seed)
    # The same seeded stream as the test: its per-layer null means must be these draws'.
    torch.testing.assert_close(
        draws.mean(0).tolist(), test.null_mean, rtol=0, atol=1e-12, check_dtype=False
    )
    observed = _mean(rn.cosine)
    draw_means = draws.mean(1)
    band = torch.quantile(draw_means, torch.tensor([0.025, 0.975], dtype=torch.float64))
    r2 = alignment.diagnose(heldout).r2
    return {
        "rank": alignment.rank,
        "k": alignment.k,
        "mean_cos": observed,
        "cosine": rn.cosine,
        "layers": rn.layers,
        "random_mean_band": [float(band[0]), float(band[1])],
        "random_mean_of_means": float(draw_means.mean()),
        "p_mean": (1 + int((draw_means >= observed).sum())) / (1 + num_random),
        "num_above": len(test.above),
        "num_layers": len(rn.layers),
        "above": test.above,
        "max_p": test.max_p,
        "binomial_p": test.binomial_p,
        "expected_above": test.expected,
        "layer_p": test.p_values,
        "null_low": test.null_low,
        "null_high": test.null_high,
        "heldout_r2_mean": _mean(r2),
        "heldout_r2": r2,
    }


def sweep(
    source: tuple[nn.Module, Any],
    target: tuple[nn.Module, Any],
    behaviours: Sequence[Behaviour],
    corpus: Sequence[str],
    *,
    sizes: Sequence[int] = SIZES,
    ranks: Sequence[int] = RANKS,
    num_random: int = 100,
    seed: int = 0,
    batch_size: int = 16,
    budget_s: float | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Directions, reference fits and the nested corpus sweep (module doc). ``corpus`` holds
    at least ``max(sizes)`` texts; a size whose projected collection time (its new texts and
    the one-pass check of all of them) would pass ``budget_s`` (seconds from the start) is
    cut, with every larger one, and listed in ``"cut"``."""
    sizes = sorted(set(sizes))
    ranks = sorted(set(ranks))
    if not sizes or sizes[0] < 1 or len(corpus) < sizes[-1]:
        raise ValueError(f"sizes must be >= 1 and at most len(corpus)={len(corpus)}: {sizes}")
    t0 = time.perf_counter()
    models = (*source, *target)
    kw: dict[str, Any] = dict(batch_size=batch_size, progress=False)
    timings: dict[str, float] = {}

    def lap(name: str, start: float) -> None:
        timings[name] = time.perf_counter() - start
        log(f"[{time.perf_counter() - t0:7.1f}s] {name}: {timings[name]:.1f}s")

    dirs, heldout, rows = {}, {}, []
    for b in behaviours:
        start = time.perf_counter()
        d_src = uf.extract_direction(*source, b.source_locked, b.source_unlocked, **kw)
        d_own = uf.extract_direction(*target, b.target_locked, b.target_unlocked, **kw)
        dirs[b.name] = (d_src, d_own)
        heldout[b.name] = _collect(models, b.heldout_source, b.heldout_target, **kw)
        lap(f"{b.name}: directions and held-out statistics", start)

    def record(b: Behaviour, data: str, n: int, fits: dict[int, uf.Alignment]) -> None:
        for al in fits.values():
            res = evaluate_fit(al, *dirs[b.name], heldout[b.name], num_random=num_random, seed=seed)
            rows.append({"behaviour": b.name, "data": data, "N": n, **res})

    references: dict[str, dict[str, int]] = {}
    for b in behaviours:
        start = time.perf_counter()
        locked = _collect(models, b.source_locked, b.target_locked, **kw)
        both = _collect(
            models, b.source_locked, b.target_locked, alignment_data="locked+unlocked",
            prompts_unlocked=b.source_unlocked, target_prompts_unlocked=b.target_unlocked, **kw,
        )  # fmt: skip
        references[b.name] = {"locked": locked.num_rows, "locked+unlocked": both.num_rows}
        if locked.num_rows != len(b.source_locked) or both.num_rows != 2 * len(b.source_locked):
            raise RuntimeError(f"{b.name}: reference statistics hold {references[b.name]} rows")
        for name, ref in (("locked", locked), ("locked+unlocked", both)):
            record(b, name, ref.num_rows, ref.fit_ranks([r for r in ranks if r <= ref.num_rows]))
        lap(f"{b.name}: reference fits", start)

    stats: uf.AlignmentStats | None = None
    done, cut, chunk_times = 0, [], {}
    rate = None  # seconds per corpus text
    for n in sizes:
        chunk = list(corpus[done:n])
        # This chunk, then the one-pass check of all n texts.
        projected = None if rate is None else rate * (len(chunk) + n)
        elapsed = time.perf_counter() - t0
        if budget_s is not None and projected is not None and elapsed + projected > budget_s:
            cut.extend(x for x in sizes if x >= n)
            log(f"cut N >= {n}: {projected:.0f}s projected, budget {budget_s:.0f}s")
            break
        start = time.perf_counter()
        part = _collect(models, chunk, chunk, alignment_data="corpus", corpus=chunk, **kw)
        if part.num_rows != len(chunk):
            raise RuntimeError(f"a chunk of {len(chunk)} texts gave {part.num_rows} rows")
        prefix = corpus[:n]
        stats = part if stats is None else stats.merge(part)
        # the merged record names each chunk; the prefix's own hash matches a one-pass run
        stats.origin["alignment_data"] = data_record(
            "corpus",
            corpus=n,
            corpus_source="generic corpus prefix",
            corpus_hash=corpus_hash(prefix),
        )
        if stats.num_rows != n or stats.num_prompts != n:
            raise RuntimeError(f"N={n}: the statistics hold {stats.num_rows} rows")
        rate = (time.perf_counter() - start) / len(chunk)
        chunk_times[n] = time.perf_counter() - start
        lap(f"corpus N={n} ({len(chunk)} new texts, {1e3 * rate:.0f} ms/text)", start)
        start = time.perf_counter()
        fits = stats.fit_ranks([r for r in ranks if r <= n])
        for b in behaviours:
            record(b, "corpus", n, fits)
        lap(f"corpus N={n}: fits and tests", start)
        done = n

    check = None
    if stats is not None and done > sizes[0]:
        # The merged statistics against the same texts collected in one pass.
        start = time.perf_counter()
        texts = list(corpus[:done])
        fresh = _collect(models, texts, texts, alignment_data="corpus", corpus=texts, **kw)
        check = compare_fits(stats, fresh, ranks, dirs[behaviours[0].name][0])
        lap(f"check: N={done} collected in one pass", start)
    return {
        "sizes": sizes, "ranks": ranks, "num_random": num_random, "seed": seed,
        "batch_size": batch_size, "references": references, "cut": cut,
        "corpus_seconds": {str(k): v for k, v in chunk_times.items()}, "timings": timings,
        "check": check, "rows": rows, "wall_s": time.perf_counter() - t0,
    }  # fmt: skip


def compare_fits(
    merged: uf.AlignmentStats,
    fresh: uf.AlignmentStats,
    ranks: Sequence[int],
    direction: uf.Direction,
) -> dict[str, Any]:
    """Raise unless ``merged`` and ``fresh`` hold the same rows and give the same keys."""
    if (merged.num_rows, merged.num_prompts) != (fresh.num_rows, fresh.num_prompts):
        raise RuntimeError(
            f"merged statistics hold {merged.num_rows} rows, fresh ones {fresh.num_rows}"
        )
    gram = max(
        float((a.gram(w) - b.gram(w)).norm() / b.gram(w).norm())
        for a, b in zip(merged.moments, fresh.moments, strict=True)
        for w in ("xx", "yy", "xy")
    )
    use = [r for r in ranks if r <= merged.num_rows]
    a, b = merged.fit_ranks(use), fresh.fit_ranks(use)
    key_cos = {}
    for r in use:
        ka, kb = (x[r].transfer(direction).vectors.double() for x in (a, b))
        key_cos[r] = float(torch.nn.functional.cosine_similarity(ka, kb, dim=-1).min())
    worst = min(key_cos.values())
    if gram > 1e-5 or worst < 1 - 1e-4:
        raise RuntimeError(
            f"the merged statistics differ from a one-pass collection: Gram relative "
            f"difference {gram:.2e}, least per-layer key cosine {worst:.8f}"
        )
    return {
        "N": merged.num_rows, "max_gram_rel_diff": gram,
        "min_key_cosine": {str(k): v for k, v in key_cos.items()},
    }  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    """Mean cosine vs N (log axis), one line per rank, one panel per behaviour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["behaviour"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    colours = plt.get_cmap("viridis")
    ranks = result["ranks"]
    for ax, name in zip(axes[0], names, strict=True):
        rows = [r for r in result["rows"] if r["behaviour"] == name]
        corpus = [r for r in rows if r["data"] == "corpus"]
        for i, rank in enumerate(ranks):
            line = sorted((r for r in corpus if r["rank"] == rank), key=lambda r: r["N"])
            if not line:
                continue
            c = colours(i / max(1, len(ranks) - 1))
            xs = [r["N"] for r in line]
            ax.plot(xs, [r["mean_cos"] for r in line], "o-", color=c, label=f"corpus, r={rank}")
            lo = [r["random_mean_band"][0] for r in line]
            hi = [r["random_mean_band"][1] for r in line]
            ax.fill_between(xs, lo, hi, color=c, alpha=0.12, linewidth=0)
        for data, marker, c in (("locked", "s", "C3"), ("locked+unlocked", "^", "C1")):
            refs = [r for r in rows if r["data"] == data]
            for j, r in enumerate(refs):
                x = r["N"] * 2 ** (0.12 * (j - (len(refs) - 1) / 2))  # side by side
                ax.vlines(x, *r["random_mean_band"], color=c, linewidth=5, alpha=0.25)
                ax.plot(x, r["mean_cos"], marker, color=c, markersize=6)
            if refs:
                ranks_txt = ",".join(str(r["rank"]) for r in refs)
                ax.plot([], [], marker, color=c, label=f"{data} (N={refs[0]['N']}), r={ranks_txt}")
        ax.set_xscale("log", base=2)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel("alignment rows N (log scale)")
        ax.set_ylabel("cos(key, Target's own direction), mean over layers")
        ax.set_title(
            f"{name}\nshaded / bars: 95% band of random Source directions through the same map",
            fontsize=9,
        )
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "behaviour": r["behaviour"], "data": r["data"], "N": r["N"], "rank": r["rank"],
            "k": r["k"], "mean_cos": r["mean_cos"], "band_hi": r["random_mean_band"][1],
            "p_mean": r["p_mean"], "above": f"{r['num_above']}/{r['num_layers']}",
            "max_p": r["max_p"], "binom_p": r["binomial_p"], "r2": r["heldout_r2_mean"],
        }
        for r in result["rows"]
    ]  # fmt: skip


def _extra(p) -> None:
    p.add_argument("--source", default="smollm2-135m-instruct")
    p.add_argument("--target", default="gemma-3-270m")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    p.add_argument("--num-random", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--budget-min", type=float, default=None, help="cut sizes that would not fit")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default next to the JSON)")
    p.add_argument("--replot", type=Path, default=None, help="only plot this result JSON again")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=1, extra=_extra)
    if args.replot is not None:
        plot(json.loads(args.replot.read_text()), args.plot or args.replot.with_suffix(".png"))
        return
    from unlock_fast.loading import load_model

    start = time.perf_counter()
    sizes = [256, 512] if args.quick else args.sizes
    smodel, stok = load_model(args.source)
    tmodel, ttok = load_model(args.target)
    texts, corpus = corpus_texts(max(sizes))
    behaviours = [topic_behaviour(), cot_behaviour(stok, ttok)]
    result = sweep(
        (smodel, stok), (tmodel, ttok), behaviours, texts, sizes=sizes, ranks=args.ranks,
        num_random=args.num_random, batch_size=args.batch_size,
        budget_s=None if args.budget_min is None else 60 * args.budget_min,
        log=lambda s: print(s, flush=True),
    )  # fmt: skip
    name = f"{args.source}-to-{args.target}"
    out = args.out or EVIDENCE / f"{name}.json"
    print_table(table(result), COLUMNS)
    payload = {
        "machine": machine(args.device), "source": args.source, "target": args.target,
        "corpus": {**corpus, "hash": corpus_hash(texts)}, **result,
        "total_wall_s": time.perf_counter() - start,
        "token_level": "not measured: the two models' tokenizers differ",
        "checked": "rows = N at every size; reference rows = prompts; merged largest-N "
        "statistics = one-pass collection (Grams and keys); random draws = the test's",
    }  # fmt: skip
    write_json(name, payload, out)
    plot(result, args.plot or out.with_suffix(".png"))


if __name__ == "__main__":
    main()
