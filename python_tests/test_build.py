"""What the build compiled, and how a missing backend reports itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import unlock_fast
from unlock_fast import ops

core = ops.core.core_module()


def test_backends_report_the_build():
    b = unlock_fast.backends()
    assert b == {"cpu": True, "cuda": bool(core.cuda_compiled)}
    assert isinstance(core.cuda_compiled, bool)
    if core.cuda_compiled:
        archs = core.cuda_architectures.split(",")
        assert archs
        assert all(a.strip() for a in archs)
    else:
        assert core.cuda_architectures == ""


def test_cpu_blas_is_openblas():
    assert "OpenBLAS" in core.blas
    assert isinstance(core.openmp, bool)
    n = core.num_threads()
    assert n >= 1
    core.set_num_threads(n)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        core.set_num_threads(0)


@pytest.mark.skipif(core.cuda_compiled, reason="this build has the CUDA backend")
@pytest.mark.parametrize(
    "name",
    ["moments_accumulate_cuda", "steer_cuda", "rsvd_eigh_cuda", "rsvd_svd_cuda"],
)
def test_cuda_entry_points_name_the_missing_backend(name):
    with pytest.raises(RuntimeError, match=f"{name} needs the CUDA backend"):
        getattr(core, name)(0, 0, 0)


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
