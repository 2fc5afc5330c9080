"""What the build compiled, and how a missing backend reports itself."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

import unlock_fast
from unlock_fast import ops, reference

core = ops.core.core_module()


CUDA_ENTRY_POINTS = ["moments_accumulate_cuda", "steer_cuda", "rsvd_eigh_cuda", "rsvd_svd_cuda"]


def test_the_cpu_backend_runs_every_kernel_family_as_the_reference_says(tolerances):
    assert unlock_fast.backends()["cpu"]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 24, generator=g) + 3.0
    vec = torch.randn(24, generator=g)
    pos = torch.tensor([4, 1])
    for mode in ("rotate", "add"):
        got = ops.steer_(h.clone(), vec, 0.7, positions=pos, mode=mode)
        want = reference.steer_reference(h, vec, 0.7, positions=pos, mode=mode)
        torch.testing.assert_close(got, want, **tolerances[torch.float32])
    x = torch.randn(40, 24, generator=g)
    sums, gram = torch.zeros(24), torch.zeros(24, 24)
    ops.moments_accumulate_(x, None, None, torch.zeros(24), None, sums, None, gram, None, None)
    want_m = reference.moments_reference(x)
    torch.testing.assert_close(sums.double(), want_m["sum_x"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gram.double(), want_m["gram_xx"], atol=1e-4, rtol=1e-5)
    m = x.double() * 0.5 ** torch.arange(24.0, dtype=torch.float64)  # a clear spectrum
    a = m.T @ m
    evals, evecs = ops.eigh_topk(a, 3)
    want_e = reference.eigh_topk_reference(a, 3)
    torch.testing.assert_close(evals, want_e[0], atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(evecs, want_e[1], atol=1e-6, rtol=1e-6)
    u, sv, vh = ops.svd_topk(m, 3)
    want_u, want_s, want_vh = reference.svd_topk_reference(m, 3)
    torch.testing.assert_close(sv, want_s, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(u, want_u, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vh, want_vh, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", CUDA_ENTRY_POINTS)
def test_backends_say_whether_the_cuda_entry_points_run(name):
    """A build reports CUDA exactly when its CUDA entry points exist: without it each one
    raises an error naming the missing backend (these arguments are wrong for a real one)."""
    with pytest.raises((RuntimeError, TypeError)) as err:
        getattr(core, name)(0, 0, 0)
    missing = f"{name} needs the CUDA backend" in str(err.value)
    assert missing == (not unlock_fast.backends()["cuda"])
    if missing:
        assert "rebuild with UNLOCK_CUDA=ON" in str(err.value)


def test_a_core_that_cannot_load_reports_no_backend_and_says_how_to_build(monkeypatch):
    monkeypatch.setattr(ops.core, "_core", None)
    monkeypatch.setattr(ops.core, "_core_error", ImportError("undefined symbol: cblas_sgemm"))
    assert unlock_fast.backends() == {"cpu": False, "cuda": False}
    with pytest.raises(ImportError, match=r"undefined symbol: cblas_sgemm.*pip install"):
        ops.steer_(torch.zeros(1, 2, 4), torch.ones(4), 0.1, positions=torch.tensor([0]))


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and unlock_fast.backends()["cuda"]),
    reason="needs a GPU and a build with the CUDA backend",
)
def test_a_cuda_build_steers_on_the_gpu_as_on_the_cpu():
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(3, 6, 40, generator=g) + 2.0).to(torch.bfloat16)
    vec, mask = torch.randn(40, generator=g), torch.rand(3, 6, generator=g) > 0.5
    want = ops.steer_(h.clone(), vec, 0.4, mask=mask)
    got = ops.steer_(h.cuda(), vec.cuda(), 0.4, mask=mask.cuda())
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=1e-2, rtol=1e-2)


def test_cpu_blas_is_openblas_and_takes_the_thread_count():
    assert "OpenBLAS" in core.blas
    n = core.num_threads()
    try:
        core.set_num_threads(1)
        assert core.num_threads() == 1
        if core.openmp and os.cpu_count() and os.cpu_count() > 1:
            core.set_num_threads(2)
            assert core.num_threads() == 2
    finally:
        core.set_num_threads(n)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        core.set_num_threads(0)


@pytest.mark.skipif(
    core.cuda_compiled or not torch.cuda.is_available(),
    reason="needs a GPU and a build without the CUDA backend",
)
def test_cuda_tensors_never_take_the_cpu_path():
    # every input on the GPU and valid, so the only error left is the missing backend
    # (an input on another device would raise ValueError first)
    missing = "built without the CUDA backend"
    h = torch.zeros(1, 1, 4, device="cuda")
    vec = torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError, match=missing):
        ops.steer_(h, vec, 0.1, positions=torch.zeros(1, dtype=torch.long, device="cuda"))
    with pytest.raises(RuntimeError, match=missing):
        ops.steer_(h, vec, 0.1, mask=torch.ones(1, 1, dtype=torch.bool, device="cuda"))
    x = torch.ones(3, 4, device="cuda")
    shift, total = torch.zeros(4, device="cuda"), torch.zeros(4, device="cuda")
    gram = torch.zeros(4, 4, device="cuda")
    with pytest.raises(RuntimeError, match=missing):
        ops.moments_accumulate_(x, None, None, shift, None, total, None, gram, None, None)
    with pytest.raises(RuntimeError, match=missing):
        ops.eigh_topk(torch.eye(4, device="cuda"), 2)
    with pytest.raises(RuntimeError, match=missing):
        ops.svd_topk(torch.ones(4, 3, device="cuda"), 2)


def test_stub_lists_every_public_name():
    stub = Path(unlock_fast.__file__).with_name("_core.pyi")
    tree = ast.parse(stub.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    public = {n for n in dir(core) if not n.startswith("_")}
    assert public == names
    assert Path(unlock_fast.__file__).with_name("py.typed").exists()
