"""Which rows of a vLLM step are steered, request arguments and cache salts (no vLLM needed)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from unlock_fast import ModelInfo
from unlock_fast.ops.steer import STEER_MODES
from unlock_fast.serving.model import SteeringBuffers
from unlock_fast.serving.plan import ScheduledRequest, fill_step, rows_to_steer
from unlock_fast.serving.requests import UnlockRequest, cache_salt, parse_request, unlock_params
from unlock_fast.serving.worker import UnlockWorkerExtension, _Host, _State


def _req(positions: str = "last_prompt", key: str = "k", alpha: float = 0.1) -> UnlockRequest:
    return UnlockRequest(key, alpha, "rotate", positions)


def _steered_positions(prompt: int, total: int, chunk: int, positions: str) -> list[int]:
    """Run a request of ``prompt`` prompt tokens to ``total`` tokens through steps of at most
    ``chunk`` tokens (then one per decode step), placed after another request's rows, and
    collect the positions the plan steers."""
    out, computed = [], 0
    while computed < total:
        n = min(chunk, prompt - computed) if computed < prompt else 1
        start = 3  # another request's rows come first
        r = ScheduledRequest(_req(positions), computed, prompt, start, start + n)
        out += [computed + row - start for row in rows_to_steer(r)]
        computed += n
    return out


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 100])
def test_each_rule_steers_the_same_positions_however_the_prompt_is_chunked(chunk):
    p, total = 13, 18
    assert _steered_positions(p, total, chunk, "last_prompt") == [p - 1]
    assert _steered_positions(p, total, chunk, "prompt") == list(range(p))
    assert _steered_positions(p, total, chunk, "generated") == list(range(p, total))
    assert _steered_positions(p, total, chunk, "all") == list(range(total))


def _buffers(n: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.full(n, -1, np.int32), np.zeros(n, np.float32), np.zeros(n, np.uint8)


def test_fill_step_writes_each_steered_row_its_slot_alpha_and_mode():
    slot_of = {"a": 2, "b": 0}
    scheduled = [
        ScheduledRequest(_req(key="a"), 0, 5, 0, 5),  # last prompt token at row 4
        ScheduledRequest(None, 0, 3, 5, 8),  # unsteered
        ScheduledRequest(_req(key="a"), 9, 9, 8, 9),  # decoding: nothing for last_prompt
        ScheduledRequest(_req(key="a"), 4, 6, 9, 11),  # prompt positions 4, 5: row 10
        ScheduledRequest(UnlockRequest("b", 0.5, "add", "all"), 0, 2, 11, 13),  # rows 11, 12
        ScheduledRequest(_req(key="missing"), 0, 2, 13, 15),  # no slot: skipped
    ]
    slots, alphas, modes = _buffers()
    end = fill_step(scheduled, slot_of, slots, alphas, modes)
    assert end == 13
    assert slots.tolist() == [-1] * 4 + [2] + [-1] * 5 + [2, 0, 0] + [-1] * 3
    assert alphas[[4, 10, 11, 12]].tolist() == pytest.approx([0.1, 0.1, 0.5, 0.5])
    assert modes[[4, 10, 11, 12]].tolist() == [0, 0, 1, 1]
    assert fill_step([scheduled[1], scheduled[2]], slot_of, *_buffers()) == 0


def test_parse_request_refuses_what_the_server_answers_with_400():
    assert parse_request(None) is None
    assert parse_request({"other": 1}) is None
    assert parse_request({"unlock_key": "cot"}) == UnlockRequest(
        "cot", 0.1, "rotate", "last_prompt"
    )
    bad = [
        ({"unlock_key": ""}, "unlock_key"),
        ({"unlock_key": 3}, "unlock_key"),
        ({"unlock_key": "cot", "unlock_alpha": "x"}, "unlock_alpha"),
        ({"unlock_key": "cot", "unlock_alpha": float("nan")}, "unlock_alpha"),
        ({"unlock_key": "cot", "unlock_alpha": True}, "unlock_alpha"),
        ({"unlock_key": "cot", "unlock_mode": "spin"}, "unlock_mode"),
        ({"unlock_key": "cot", "unlock_positions": "first"}, "unlock_positions"),
        ({"unlock_alpha": 0.1}, "without unlock_key"),
    ]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            parse_request(args)
    with pytest.raises(ValueError, match="unknown unlock_key 'x'; loaded keys: cot"):
        parse_request({"unlock_key": "x"}, known_keys={"cot"})


def test_cache_salt_separates_whatever_changes_the_kv():
    r = _req()
    assert cache_salt(None, "p", None) is None
    assert cache_salt(None, "p", "user") == "user"
    salts = {
        cache_salt(r, "p"),
        cache_salt(_req(alpha=0.2), "p"),
        cache_salt(_req(key="other"), "p"),
        cache_salt(UnlockRequest("k", 0.1, "add"), "p"),
        cache_salt(_req(positions="all"), "p"),
        cache_salt(r, "p longer"),
        cache_salt(r, "p", "user"),
    }
    assert len(salts) == 7
    assert cache_salt(r, "p") == cache_salt(_req(), "p")
    assert all(s is not None and len(s) <= 128 for s in salts)


def test_unlock_params_copies_and_sets_extra_args():
    @dataclass
    class Params:  # the one attribute unlock_params relies on
        extra_args: dict[str, object] | None = None

    base = Params({"mine": 1})
    got = unlock_params(base, key="cot", alpha=0.2, positions="all")
    assert base.extra_args == {"mine": 1}
    assert got.extra_args == {
        "mine": 1,
        "unlock_key": "cot",
        "unlock_alpha": 0.2,
        "unlock_mode": "rotate",
        "unlock_positions": "all",
    }
    with pytest.raises(ValueError, match="unlock_mode"):
        unlock_params(base, key="cot", mode="spin")


def _worker(runner: object, rows: int = 8):
    """A worker extension over a stand-in runner, with one key in slot 0."""
    ext = UnlockWorkerExtension()
    ext.model_runner = runner
    buffers = SteeringBuffers(slots=2, layers=3, dim=4, rows=rows)
    hosts = [_Host.make(rows, False), _Host.make(rows, False)]
    info = ModelInfo("m", "f", 4, 3)
    ext._unlock = _State(torch.nn.Linear(1, 1), buffers, info, torch.device("cpu"), hosts)
    ext._unlock.slot_of["k"] = 0
    return ext, buffers


class _Batch:
    def __init__(self, ids, computed, prompt):
        self.req_ids, self.num_reqs = ids, len(ids)
        self.num_computed_tokens_cpu, self.num_prompt_tokens = computed, prompt


class _Runner:
    def __init__(self, batch, qsl, requests):
        self.input_batch, self.requests = batch, requests
        self.query_start_loc = SimpleNamespace(np=np.array(qsl))


def _params(extra):
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))


def _device_rows(buffers: SteeringBuffers) -> list[tuple[int, float, str] | None]:
    """What the steering operator reads for each row of the device buffers: (key slot, alpha,
    mode) for a steered row, None for a row it leaves alone."""
    names = {code: name for name, code in STEER_MODES.items()}
    rows = zip(buffers.slots.tolist(), buffers.alphas.tolist(), buffers.modes.tolist(), strict=True)
    return [None if s < 0 else (s, round(a, 6), names[m]) for s, a, m in rows]


def _step(ext, runner, ids, computed, prompt, qsl):
    runner.input_batch = _Batch(ids, computed, prompt)
    runner.query_start_loc = SimpleNamespace(np=np.array(qsl))
    ext._unlock_step(None)


def test_each_step_copies_every_rows_slot_alpha_and_mode_and_clears_the_last_steps():
    reqs = {
        "r1": _params({"unlock_key": "k", "unlock_alpha": 0.5, "unlock_mode": "add",
                       "unlock_positions": "all"}),
        "r2": _params(None),
        "r3": _params({"unlock_key": "j", "unlock_alpha": 0.25}),  # rotate, last prompt token
        "r4": _params({"unlock_key": "k", "unlock_positions": "generated"}),
    }  # fmt: skip
    runner = _Runner(_Batch([], [], []), [0], reqs)
    ext, buffers = _worker(runner)
    ext._unlock.slot_of["j"] = 1
    add_k, rotate_j, none = (0, 0.5, "add"), (1, 0.25, "rotate"), None
    # r1's prompt (3 rows), r2 unsteered, the first chunk of r3's 4-token prompt
    _step(ext, runner, ["r1", "r2", "r3"], [0, 0, 0], [3, 2, 4], [0, 3, 5, 7])
    assert _device_rows(buffers) == [add_k] * 3 + [none] * 5
    # r1 decodes; r3's second chunk holds its last prompt token (row 2); r2 decodes
    _step(ext, runner, ["r1", "r3", "r2"], [3, 2, 2], [3, 4, 2], [0, 1, 3, 4])
    assert _device_rows(buffers) == [add_k, none, rotate_j] + [none] * 5
    # r1 finished, r3 decodes (its last prompt token is behind it): nothing steered
    _step(ext, runner, ["r3", "r2"], [4, 3], [4, 2], [0, 1, 2])
    assert _device_rows(buffers) == [none] * 8
    _step(ext, runner, ["r3", "r2"], [5, 4], [4, 2], [0, 1, 2])
    assert _device_rows(buffers) == [none] * 8
    # a generated token of r4 after r2's; the host buffers that held r1's rows are reused
    _step(ext, runner, ["r2", "r4"], [5, 5], [2, 3], [0, 1, 2])
    assert _device_rows(buffers) == [none, (0, 0.1, "rotate")] + [none] * 6


def test_a_request_whose_key_is_unloaded_is_served_unsteered(caplog):
    reqs = {"r1": _params({"unlock_key": "k", "unlock_positions": "all"})}
    runner = _Runner(_Batch([], [], []), [0], reqs)
    ext, buffers = _worker(runner)
    ext._unlock.slot_of["j"] = 1  # another key stays loaded
    buffers.table[0] = 1.0  # k's vectors
    _step(ext, runner, ["r1"], [0], [2], [0, 2])
    assert _device_rows(buffers) == [(0, 0.1, "rotate")] * 2 + [None] * 6
    assert ext.unlock_unload_key("k")
    assert not buffers.table[0].any()
    with caplog.at_level("WARNING", logger="unlock_fast.serving"):
        _step(ext, runner, ["r1"], [2], [2], [0, 1])
        _step(ext, runner, ["r1"], [3], [2], [0, 1])
    assert _device_rows(buffers) == [None] * 8
    assert len([r for r in caplog.records if "'k' is not loaded" in r.message]) == 1


def test_a_step_that_cannot_be_planned_is_served_unsteered_and_logged_once(caplog):
    reqs = {"r1": _params({"unlock_key": "k"})}
    runner = _Runner(_Batch(["r1"], [0], [3]), [0, 3], reqs)
    ext, buffers = _worker(runner)
    ext._unlock_step(None)
    assert buffers.slots.tolist()[:3] == [-1, -1, 0]
    del runner.query_start_loc  # a batch layout this module cannot read
    with caplog.at_level("WARNING", logger="unlock_fast.serving"):
        ext._unlock_step(None)
        ext._unlock_step(None)
    assert buffers.slots.tolist() == [-1] * 8
    assert len([r for r in caplog.records if "could not be planned" in r.message]) == 1


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float16])
def test_steering_buffers_keep_their_dtypes_under_the_models_default(default):
    """vLLM builds a bf16 model with torch's default dtype set to bf16."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        b = SteeringBuffers(slots=2, layers=3, dim=4, rows=5)
    finally:
        torch.set_default_dtype(before)
    assert (b.table.dtype, b.alphas.dtype) == (torch.float32, torch.float32)
    assert (b.slots.dtype, b.modes.dtype) == (torch.int32, torch.uint8)
    assert b.slots.tolist() == [-1] * 5
