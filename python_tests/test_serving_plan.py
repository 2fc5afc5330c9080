"""Which rows of a vLLM step are steered, request arguments and cache salts (no vLLM needed)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from unlock_fast.serving.plan import ScheduledRequest, plan_step, rows_to_steer
from unlock_fast.serving.requests import UnlockRequest, cache_salt, parse_request, unlock_params


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


def test_plan_groups_rows_by_key_alpha_and_mode():
    vec = {0: torch.ones(4), 2: torch.full((4,), 2.0)}
    keys = {"a": vec, "b": {1: torch.zeros(4)}}
    scheduled = [
        ScheduledRequest(_req(key="a"), 0, 5, 0, 5),  # last prompt token at row 4
        ScheduledRequest(None, 0, 3, 5, 8),  # unsteered
        ScheduledRequest(_req(key="a"), 9, 9, 8, 9),  # decoding: nothing for last_prompt
        ScheduledRequest(_req(key="a"), 4, 6, 9, 11),  # prompt positions 4, 5: row 10
        ScheduledRequest(_req(key="b", alpha=0.5), 0, 2, 11, 13),  # row 12
        ScheduledRequest(_req(key="missing"), 0, 2, 13, 15),  # skipped
    ]
    plan = plan_step(scheduled, keys, torch.device("cpu"))
    assert sorted(plan) == [0, 1, 2]
    assert [g.rows.tolist() for g in plan[0]] == [[4, 10]]
    assert plan[0][0].vector is vec[0]
    assert plan[2][0].rows.tolist() == [4, 10]
    assert [(g.rows.tolist(), g.alpha) for g in plan[1]] == [([12], 0.5)]


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


def test_add_groups_carry_the_scaled_vector():
    vec = {0: torch.arange(4.0)}
    req = UnlockRequest("k", 0.3, "add", "all")
    plan = plan_step([ScheduledRequest(req, 0, 3, 0, 3)], {"k": vec}, torch.device("cpu"))
    (group,) = plan[0]
    assert group.alpha == 1.0
    assert torch.equal(group.vector, vec[0] * 0.3)
