"""Pipeline benchmark: unlock-fast against steering-vectors and repeng on one model.

Measures, interleaved in one process on a small random-weight llama (default 8 layers,
hidden 512):

1. extracting a per-layer direction from N prompt pairs: our mean difference vs
   steering-vectors' ``train_steering_vector`` (mean aggregator), and our PCA vs repeng's
   ``ControlVector.train`` (``pca_diff``, which is PCA of centred differences too);
2. the per-token cost of steered greedy generation over unsteered generation: our hooks
   (``add`` at every token, the same math as both peers, and ``rotate`` at the last prompt
   token, the paper's rule) vs ``SteeringVector.apply`` and repeng's ``ControlModel``,
   end to end (install included) and for one decoding step with a warm KV cache (finer:
   many interleaved repeats).

Before any timing counts, the results are checked: the mean directions must match
steering-vectors', the PCA axes must match repeng's up to sign, and the three additive
steerers must generate the same tokens. Prompts are right-padded, which all three read
correctly. Writes JSON (default bench/results/pipeline.json).

    python bench/bench_pipeline.py [--prompts 64] [--new-tokens 32] [--repeats 5]

The peers pin older libraries, so it runs in a virtualenv of its own: torch, then
``pip install steering-vectors==0.12.2 repeng==0.4.0 "transformers<5" scipy-openblas32
safetensors`` and ``pip install --no-deps .`` for this package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

import unlock_fast as uf

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "June"]
THINGS = ["apples", "books", "coins", "eggs", "pens", "stamps", "shells", "cards"]


def problems(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b, c = (int(x) for x in rng.integers(2, 99, size=3))
        who, what = rng.choice(NAMES), rng.choice(THINGS)
        out.append(
            f"Question: {who} has {a} {what}, buys {b} more and gives away {c}. Then "
            f"{who} splits them into {int(rng.integers(2, 9))} equal groups. How many "
            f"{what} are in each group?\n"
        )
    return out


def build(hidden: int, layers: int, vocab: int, seed: int = 0):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        problems(400, seed=1) * 2,
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=["<pad>", "<unk>", "<s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<s>",
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    return model, tokenizer


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, after one warm-up, runs interleaved."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--step-repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pipeline.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    import repeng
    from steering_vectors import SteeringVector, train_steering_vector

    model, tok = build(args.hidden, args.layers, args.vocab)
    n_layers = args.layers
    locked = problems(args.prompts, seed=2)
    unlocked = [p + "Answer: Let's think step by step." for p in locked]
    locked = [p + "Answer:" for p in locked]
    bs = args.batch_size

    # -- 1. direction extraction --------------------------------------------------------
    def ours_mean():
        return uf.extract_direction(model, tok, locked, unlocked, batch_size=bs, progress=False)

    def sv_mean():
        return train_steering_vector(
            model,
            tok,
            list(zip(unlocked, locked, strict=True)),
            batch_size=bs,
            show_progress=False,
        )

    def ours_pca():
        return uf.extract_direction(
            model, tok, locked, unlocked, method="pca", batch_size=bs, progress=False
        )

    inner = list(range(1, n_layers - 1))  # repeng reads HF hidden_states (last one normed)

    def rp_pca():
        pairs = zip(unlocked, locked, strict=True)
        entries = [repeng.DatasetEntry(positive=u, negative=lo) for u, lo in pairs]
        return repeng.ControlVector.train(
            model, tok, entries, hidden_layers=inner, batch_size=2 * bs, method="pca_diff"
        )

    d_ours, d_sv = ours_mean(), sv_mean()
    mean_err = max(
        float(
            (d_ours.vector(i) - d_sv.layer_activations[i].float()).norm()
            / d_sv.layer_activations[i].float().norm()
        )
        for i in range(n_layers)
    )
    p_ours, p_rp = ours_pca(), rp_pca()
    pca_cos = min(
        abs(
            float(
                torch.nn.functional.cosine_similarity(
                    p_ours.vector(i), torch.from_numpy(p_rp.directions[i]).float(), dim=0
                )
            )
        )
        for i in inner
    )
    assert mean_err < 1e-4, f"mean directions differ from steering-vectors: {mean_err}"
    assert pca_cos > 0.999, f"PCA axes differ from repeng: |cos| {pca_cos}"

    extraction = interleaved(
        {
            "ours_mean": ours_mean,
            "steering_vectors_mean": sv_mean,
            "ours_pca": ours_pca,
            "repeng_pca": rp_pca,
        },
        args.repeats,
    )

    # -- 2. steered generation -----------------------------------------------------------
    key = d_ours.as_key()
    alpha = 4.0
    prompt = tok([locked[0]], return_tensors="pt")
    gen_kw = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    sv = SteeringVector({i: key.vector(i) for i in range(n_layers)}, "decoder_block")

    def run_plain():
        with torch.inference_mode():
            return model.generate(**prompt, **gen_kw)

    def run_ours_add():
        with uf.steer(model, key, alpha=alpha, mode="add", positions="all"):
            return run_plain()

    def run_ours_rotate():
        with uf.steer(model, key, alpha=0.5):
            return run_plain()

    def run_sv():
        with sv.apply(model, multiplier=alpha):
            return run_plain()

    control = repeng.ControlVector(
        model_type="llama", directions={i: key.vector(i).numpy() for i in range(n_layers)}
    )

    def run_rp():
        cmodel.set_control(control, coeff=alpha)
        try:
            with torch.inference_mode():
                return cmodel.generate(**prompt, **gen_kw)
        finally:
            cmodel.reset()

    def run_rp_plain():  # repeng's wrapped layers with no control set
        with torch.inference_mode():
            return cmodel.generate(**prompt, **gen_kw)

    # repeng wraps the decoder layers in place: it gets its own unsteered baseline, timed
    # while wrapped; the other runs see the unwrapped model.
    cmodel = repeng.ControlModel(model, list(range(n_layers)))
    out_rp = run_rp()
    cmodel.unwrap()
    out_plain, out_add, out_sv = run_plain(), run_ours_add(), run_sv()
    assert torch.equal(out_add, out_sv), "ours (add, all tokens) and steering-vectors differ"
    assert torch.equal(out_add, out_rp), "ours (add, all tokens) and repeng differ"
    assert not torch.equal(out_add, out_plain), "steering had no effect; raise alpha"

    plain_group = {
        "unsteered": run_plain,
        "ours_add_all": run_ours_add,
        "ours_rotate_last_prompt": run_ours_rotate,
        "steering_vectors_add_all": run_sv,
    }
    wrapped_group = {"repeng_unsteered": run_rp_plain, "repeng_add_all": run_rp}
    grows: dict[str, list[float]] = {k: [] for k in [*plain_group, *wrapped_group]}
    for rep in range(args.repeats + 1):  # the first round warms up
        for group, wrapped in ((plain_group, False), (wrapped_group, True)):
            if wrapped:
                cmodel = repeng.ControlModel(model, list(range(n_layers)))
            for name, fn in group.items():
                t0 = time.perf_counter()
                fn()
                if rep:
                    grows[name].append(time.perf_counter() - t0)
            if wrapped:
                cmodel.unwrap()
    gen = {k: statistics.median(v) for k, v in grows.items()}
    per_token_ms = {k: 1e3 * v / args.new_tokens for k, v in gen.items()}
    base = per_token_ms["unsteered"]
    overhead_ms = {k: per_token_ms[k] - base for k in plain_group if k != "unsteered"}
    overhead_ms["repeng_add_all"] = (
        per_token_ms["repeng_add_all"] - per_token_ms["repeng_unsteered"]
    )

    # -- 3. one decoding step with a warm KV cache (hooks already installed) --------------
    cache = DynamicCache()
    with torch.inference_mode():
        model(**prompt, past_key_values=cache, use_cache=True)
    plen = prompt["input_ids"].shape[1]
    step_in = dict(
        input_ids=torch.tensor([[5]]),
        attention_mask=torch.ones(1, plen + 1, dtype=torch.long),
        cache_position=torch.tensor([plen]),
    )

    def step(m):
        with torch.inference_mode():
            m(**step_in, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the step's token (transformers 5 refuses a positive length)

    steerers = {
        "unsteered": contextlib.nullcontext,
        "ours_add_all": lambda: uf.steer(model, key, alpha=alpha, mode="add", positions="all"),
        "ours_rotate_last_prompt": lambda: uf.steer(model, key, alpha=0.5),
        "steering_vectors_add_all": lambda: sv.apply(model, multiplier=alpha),
    }
    srows: dict[str, list[float]] = {k: [] for k in [*steerers, *wrapped_group]}
    for rep in range(args.step_repeats + 1):
        for name, ctx in steerers.items():
            with ctx():
                t0 = time.perf_counter()
                step(model)
                if rep:
                    srows[name].append(time.perf_counter() - t0)
    cmodel = repeng.ControlModel(model, list(range(n_layers)))
    for rep in range(args.step_repeats + 1):
        for name in wrapped_group:
            if name == "repeng_add_all":
                cmodel.set_control(control, coeff=alpha)
            t0 = time.perf_counter()
            step(cmodel)
            if rep:
                srows[name].append(time.perf_counter() - t0)
            cmodel.reset()
    cmodel.unwrap()
    step_ms = {k: 1e3 * statistics.median(v) for k, v in srows.items()}
    step_overhead = {k: step_ms[k] - step_ms["unsteered"] for k in steerers if k != "unsteered"}
    step_overhead["repeng_add_all"] = step_ms["repeng_add_all"] - step_ms["repeng_unsteered"]

    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": args.threads,
        "date": date.today().isoformat(),
        "backends": uf.ops.backends(),
        "model": {
            "arch": "llama",
            "hidden": args.hidden,
            "layers": n_layers,
            "vocab": len(tok),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        },
        "prompts": args.prompts,
        "batch_size": bs,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "checks": {
            "mean_rel_err_vs_steering_vectors": mean_err,
            "pca_min_abs_cos_vs_repeng": pca_cos,
            "add_all_tokens_identical_to_peers": True,
        },
        "extract_s": extraction,
        "extract_speedup": {
            "mean_vs_steering_vectors": extraction["steering_vectors_mean"]
            / extraction["ours_mean"],
            "pca_vs_repeng": extraction["repeng_pca"] / extraction["ours_pca"],
        },
        "generate_ms_per_token": per_token_ms,
        "steering_overhead_ms_per_token": overhead_ms,
        "step_repeats": args.step_repeats,
        "decode_step_ms": step_ms,
        "decode_step_overhead_ms": step_overhead,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
