"""Statistics sharded over two gloo processes equal a single-process run."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from dist_worker import results, worker
from safetensors.torch import load_file

from unlock_fast.distributed import rank_and_world, shard


def test_shard_without_distributed_is_everything():
    assert rank_and_world() == (0, 1)
    assert shard([1, 2, 3]) == [1, 2, 3]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_process_statistics_match_one_process(tmp_path):
    out_file = str(tmp_path / "out.safetensors")
    mp.spawn(worker, args=(2, str(tmp_path / "rendezvous"), out_file), nprocs=2, join=True)
    got = load_file(out_file)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = results(distributed=False)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(got["counts"], want["counts"])
    for name in ("map", "mean", "pca"):
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)
