"""The CUDA path. A CUDA torch with a CPU-only core: one warning at import naming the
rebuild, and an error naming the missing backend for a CUDA tensor (never a silent CPU
fallback); torch and the compiled core are replaced by stand-ins, so this runs anywhere.
With a GPU and a CUDA build: capture and steering hooks on a model on the GPU give what they
give on the CPU. Building the CUDA backend is checked by ``.ci/cuda_compile_check.sh``.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch
from tiny_models import PROMPTS, make_model, word_tokenizer

from unlock_fast import ModelInfo, SteeringKey, steer
from unlock_fast.capture import iter_activations
from unlock_fast.ops import backends, core

pytestmark = pytest.mark.usefixtures("one_thread")

REBUILD = "UNLOCK_CUDA=ON pip install --no-build-isolation"


@pytest.fixture
def cuda_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reports a CUDA build; the warning has not been given yet in this process."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(core, "_cuda_warned", False)


def fake_core(monkeypatch: pytest.MonkeyPatch, *, cuda: bool) -> None:
    monkeypatch.setattr(core, "_core", types.SimpleNamespace(cuda_compiled=cuda))
    monkeypatch.setattr(core, "_core_error", None)


@pytest.mark.usefixtures("cuda_torch")
def test_cuda_torch_without_backend_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_core(monkeypatch, cuda=False)
    with pytest.warns(UserWarning, match="built without the CUDA backend") as record:
        assert core.warn_if_cuda_backend_missing()
    message = str(record[0].message)
    assert REBUILD in message
    assert "nvidia-cublas" in message
    assert "nvidia-cusolver" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not core.warn_if_cuda_backend_missing()


@pytest.mark.usefixtures("cuda_torch")
def test_cuda_torch_with_backend_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_core(monkeypatch, cuda=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not core.warn_if_cuda_backend_missing()


def test_cpu_torch_neither_warns_nor_loads_the_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(core, "_cuda_warned", False)

    def no_load() -> types.ModuleType:
        raise AssertionError("the compiled core was loaded for a CPU-only torch")

    monkeypatch.setattr(core, "core_module", no_load)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not core.warn_if_cuda_backend_missing()


@pytest.mark.usefixtures("cuda_torch")
def test_missing_core_is_left_to_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "_core", None)
    monkeypatch.setattr(core, "_core_error", ImportError("no _core"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not core.warn_if_cuda_backend_missing()
    with pytest.raises(ImportError, match="could not be imported"):
        core.core_module()


def test_cuda_device_without_backend_names_the_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_core(monkeypatch, cuda=False)
    assert core.backend_of(torch.device("cpu")) == "cpu"
    for device in (torch.device("cuda"), torch.device("cuda", 1)):
        with pytest.raises(RuntimeError, match="built without the CUDA backend") as err:
            core.backend_of(device)
        assert REBUILD in str(err.value)
    fake_core(monkeypatch, cuda=True)
    assert core.backend_of(torch.device("cuda", 0)) == "cuda"


def test_import_warns_once_in_a_fresh_process() -> None:
    # A stand-in core without the CUDA backend, and torch claiming CUDA, before the import.
    code = textwrap.dedent(
        """
        import sys, types, warnings
        import torch
        torch.version.cuda = "13.0"
        fake = types.ModuleType("unlock_fast._core")
        fake.cuda_compiled = False
        sys.modules["unlock_fast._core"] = fake
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import unlock_fast
            import unlock_fast.ops.core as core
            core.warn_if_cuda_backend_missing()
        ours = [str(w.message) for w in caught if "unlock_fast" in str(w.message)]
        print(len(ours))
        print(ours[0] if ours else "")
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    count, message = run.stdout.strip().split("\n", 1)
    assert count == "1", run.stdout
    assert "built without the CUDA backend" in message
    assert REBUILD in message


needs_cuda_build = pytest.mark.skipif(
    not (torch.cuda.is_available() and backends()["cuda"]),
    reason="needs a GPU and a build with the CUDA backend",
)


def _key(model: torch.nn.Module, seed: int = 0) -> SteeringKey:
    info = ModelInfo.of(model)
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(info.num_layers, info.hidden_size, generator=g)
    return SteeringKey(vectors, list(range(info.num_layers)), info)


@pytest.mark.cuda
@needs_cuda_build
def test_capture_on_a_cuda_model_matches_the_cpu() -> None:
    tok = word_tokenizer("left")
    cpu = make_model("llama", len(tok))
    gpu = copy.deepcopy(cpu).cuda()
    layers = [0, 1, 2]
    want = list(iter_activations(cpu, tok, PROMPTS[:6], layers, batch_size=4))
    got = list(iter_activations(gpu, tok, PROMPTS[:6], layers, batch_size=4))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.indices == w.indices
        for i in layers:
            assert g.rows[i].device.type == "cuda"
            torch.testing.assert_close(g.rows[i].cpu(), w.rows[i], atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@needs_cuda_build
@pytest.mark.parametrize("mode", ["rotate", "add"])
@pytest.mark.parametrize("positions", ["last_prompt", "all"])
def test_steering_hooks_on_a_cuda_model_match_the_cpu(mode: str, positions: str) -> None:
    tok = word_tokenizer("left")
    cpu = make_model("llama", len(tok))
    gpu = copy.deepcopy(cpu).cuda()
    inputs = dict(tok(PROMPTS[:4], return_tensors="pt", padding=True))
    on_gpu = {k: v.cuda() for k, v in inputs.items()}
    with torch.no_grad():
        plain = gpu(**on_gpu).logits
    runs = {}
    for name, model, batch in (("cpu", cpu, inputs), ("cuda", gpu, on_gpu)):
        with steer(model, _key(model), 0.5, mode=mode, positions=positions), torch.no_grad():
            logits = model(**batch).logits
            tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
        runs[name] = (logits.cpu(), tokens.cpu())
    assert not torch.allclose(plain.cpu(), runs["cuda"][0], atol=1e-3)  # it did steer
    torch.testing.assert_close(runs["cuda"][0], runs["cpu"][0], atol=1e-4, rtol=1e-4)
    assert torch.equal(runs["cuda"][1], runs["cpu"][1])
